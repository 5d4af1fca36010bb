"""RPC authentication as in Bitcoin Core: a cookie file for local tools, rpcauth lines for users.

The node writes a fresh random password to <datadir>/.cookie at start (readable by its owner
only) and removes it at shutdown; the CLI on the same machine reads it. Other users are listed
as rpcauth lines "user:salt$hash", hash = hex HMAC-SHA256(key=salt, msg=password), so that the
configuration never holds a password (Core's share/rpcauth/rpcauth.py makes the same lines).
"""

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

COOKIE_USER = "__cookie__"
COOKIE_FILE = ".cookie"


class CookieError(Exception):
    """The cookie file is missing or unreadable."""


class Authenticator:
    """Checks HTTP Basic credentials against the cookie and the rpcauth users."""

    def __init__(self, cookie: tuple[str, str] | None, users: Iterable[str]) -> None:
        self._cookie = cookie
        self._users = [_parse_rpcauth(line) for line in users]

    def check(self, header: str | None) -> bool:
        """Whether an Authorization header value holds valid credentials."""
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        # Every entry is compared, without short cuts, so timing shows neither which
        # user names exist nor how much of a password was right.
        valid = False
        if self._cookie is not None:
            valid |= _equal(user, self._cookie[0]) & _equal(password, self._cookie[1])
        for name, salt, digest in self._users:
            valid |= _equal(user, name) & _equal(_hash(salt, password), digest)
        return valid


def write_cookie(datadir: Path) -> tuple[str, str]:
    """Write a fresh cookie, mode 0600, atomically; returns its (user, password)."""
    password = secrets.token_hex(32)
    path = datadir / COOKIE_FILE
    tmp = path.with_name(COOKIE_FILE + ".tmp")
    # A fresh file (O_EXCL) is sure to get mode 0600; a leftover one could have any mode.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(f"{COOKIE_USER}:{password}")
    os.replace(tmp, path)
    return COOKIE_USER, password


def read_cookie(datadir: Path) -> tuple[str, str]:
    """The (user, password) of the running node's cookie."""
    path = datadir / COOKIE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CookieError(f"no cookie at {path}: is the node running?") from None
    except OSError as exc:
        raise CookieError(f"cannot read cookie at {path}: {exc.strerror}") from None
    user, colon, password = text.strip().partition(":")
    if not colon:
        raise CookieError(f"malformed cookie at {path}")
    return user, password


def remove_cookie(datadir: Path) -> None:
    """Remove the cookie at shutdown, so that tools stop trying a dead node's password."""
    (datadir / COOKIE_FILE).unlink(missing_ok=True)


def make_rpcauth(user: str, password: str | None = None) -> tuple[str, str]:
    """An rpcauth line for `user` and its password, a random one if none is given."""
    if not user or ":" in user:
        raise ValueError("an RPC user name must be non-empty and have no ':'")
    if password is None:
        password = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    return f"{user}:{salt}${_hash(salt, password)}", password


def _parse_rpcauth(line: str) -> tuple[str, str, str]:
    user, colon, rest = line.partition(":")
    salt, dollar, digest = rest.partition("$")
    if not (user and colon and salt and dollar and len(digest) == 64 and _is_hex(digest)):
        raise ValueError(f"rpcauth for user {user!r} is not of the form user:salt$hex_sha256")
    return user, salt, digest.lower()


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    """The (user, password) of an HTTP Basic Authorization value, or None."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError both are
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def _hash(salt: str, password: str) -> str:
    return hmac.new(salt.encode(), password.encode(), hashlib.sha256).hexdigest()


def _equal(a: str, b: str) -> bool:
    # compare_digest takes str only when it is ASCII; credentials may be any UTF-8.
    return hmac.compare_digest(a.encode(), b.encode())


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)
