"""The data directory: everything one node keeps on disk, for one network.

Layout (the names are the constants below):

    dpodl.toml       optional configuration (node/config.py)
    .lock            flock'ed while a node runs; holds that node's pid
    .cookie          the RPC cookie, written by the RPC server
    chain/           the chain store: give this directory to storage.db.Database, which
                     keeps its LevelDB in chain/chaindata and its own chain/.lock
    keys/miner.key   the miner's key
    debug.log        the log file

A key file is the key's 32-byte Ed25519 seed as 64 lowercase hex digits and a newline;
surrounding whitespace is ignored when it is read back.
"""

import fcntl
import os
import tempfile
from pathlib import Path

from consensus.keys import PrivateKey

CONFIG_NAME = "dpodl.toml"
LOCK_NAME = ".lock"
COOKIE_NAME = ".cookie"
CHAIN_DIR = "chain"
KEYS_DIR = "keys"
KEY_NAME = "miner.key"
LOG_NAME = "debug.log"

_SEED_HEX_DIGITS = 64


class DataDirError(Exception):
    """The data directory or a file in it cannot be used."""


class DataDir:
    """A node's data directory, created on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.chain_path = path / CHAIN_DIR
        self.log_path = path / LOG_NAME
        self.cookie_path = path / COOKIE_NAME
        self.key_path = path / KEYS_DIR / KEY_NAME
        self.config_path = path / CONFIG_NAME
        self._lock_fd: int | None = None
        try:
            # Only the directories we create get 0700; an existing one keeps the mode
            # its owner chose.
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.key_path.parent.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DataDirError(f"cannot create data directory {path}: {exc.strerror}") from None

    def lock(self) -> None:
        """Hold the directory for this process, or raise naming the process that holds it."""
        lock_path = self.path / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # flock, unlike fcntl's record locks, also refuses a second open of the
            # file in the same process, so two DataDirs on one path conflict too.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_path.read_text().strip() or "unknown"
            os.close(fd)
            raise DataDirError(f"another dpodl node is using {self.path} (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def load_or_create_key(self, path: Path | None = None) -> tuple[PrivateKey, bool]:
        """The key in `path` (default: keys/miner.key), made on first start; (key, created)."""
        path = path or self.key_path
        if path.exists():
            return read_key_file(path), False
        key = PrivateKey.generate()
        write_key_file(path, key)
        return key, True


def read_key_file(path: Path) -> PrivateKey:
    """The key in a key file."""
    try:
        text = path.read_bytes().decode("ascii").strip()
    except OSError as exc:
        raise DataDirError(f"cannot read key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DataDirError(f"key file {path} is not hex text") from None
    if len(text) != _SEED_HEX_DIGITS:
        raise DataDirError(f"key file {path} holds {len(text)} characters, "
                           f"expected {_SEED_HEX_DIGITS} hex digits")
    try:
        return PrivateKey(bytes.fromhex(text))
    except ValueError:
        raise DataDirError(f"key file {path} is not hex") from None


def write_key_file(path: Path, key: PrivateKey) -> None:
    """Write `key` to a new file, mode 0600; an existing file is never replaced."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    except OSError as exc:
        raise DataDirError(f"cannot write key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.seed.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        # link, not os.replace: it is just as atomic, and fails instead of replacing a
        # key that appeared meanwhile (losing a key loses its coins).
        os.link(tmp, path)
        _fsync_dir(path.parent)
    except FileExistsError:
        raise DataDirError(f"key file {path} already exists; not overwriting it") from None
    except OSError as exc:
        raise DataDirError(f"cannot write key file {path}: {exc.strerror}") from None
    finally:
        os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
