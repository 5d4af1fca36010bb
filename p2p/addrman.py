"""The table of peer addresses we may dial, and the list of banned hosts (PROTOCOL.md §11).

A much smaller cousin of Bitcoin Core's addrman and banman: one flat table instead of
new/tried buckets, so it does not try to resist an attacker who floods us with
addresses from many networks; it only keeps that flood bounded. No I/O: the caller
feeds it what happened (learned, dialling, connected, failed, disconnected, banned)
and asks it whom to dial next and what to answer to `getaddr`.

Every Address in the table comes out of `parse_address`, so one host always has one
spelling and a ban on it matches every port it listens on.
"""

import ipaddress
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

Address = tuple[str, int]  # (IP literal in normal form, port)

# The longest IP literal we accept: a full IPv6 address with an IPv4 tail, 45 chars.
# Checked before parsing so an error never echoes a huge string from a peer.
MAX_HOST_LEN = 45

DEFAULT_CAPACITY = 1000
DEFAULT_MAX_BANS = 10_000
MAX_REASON_LEN = 200

# A peer's clock, or a lie, can stamp an address in the future; past this slack
# (Bitcoin Core uses the same 10 minutes) the stamp is replaced by our own now.
FUTURE_SLACK = 10 * 60

# Retry backoff after the last attempt: 1 s, 2 s, 4 s, ... capped at 10 minutes.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 10 * 60
# This many failures in a row and the address is forgotten: with the backoff above
# that is about 17 minutes of trying a host that never answered.
MAX_FAILURES = 10

# `sample` answers `getaddr` with addresses seen within this window only. Long
# enough to cover a node that restarted or dropped its connections a while ago,
# short enough that most of what we hand out still answers.
SAMPLE_MAX_AGE = 3 * 3600


def _parse_host(host: str | bytes) -> str:
    """The normal text form of an IP literal; ValueError with the reason if refused."""
    if isinstance(host, bytes):
        try:
            host = host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("host is not ASCII") from None
    if not isinstance(host, str):
        raise ValueError(f"host must be text, not {type(host).__name__}")
    if len(host) > MAX_HOST_LEN:
        raise ValueError(f"host longer than {MAX_HOST_LEN} characters")
    # Brackets belong to "[host]:port" text (a config file, the CLI); whoever splits
    # that text strips them. Here the host is always the bare literal.
    if host.startswith("["):
        raise ValueError(f"brackets around host {host!r}: pass the bare IP literal")
    # An IPv6 zone ("fe80::1%eth0") names an interface of the sender's machine and
    # means nothing on ours.
    if "%" in host:
        raise ValueError(f"zone id in host {host!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP literal: {host!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # one host, one spelling: ::ffff:1.2.3.4 is 1.2.3.4
    if ip.is_unspecified:
        raise ValueError(f"unspecified address {ip}")
    if ip.is_multicast:
        raise ValueError(f"multicast address {ip}")
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"broadcast address {ip}")
    # Loopback and private ranges stay allowed: dev networks and tests live there.
    return str(ip)


def parse_address(host: str | bytes, port: int) -> Address:
    """The Address for `host` and `port`; ValueError with the reason if either is refused."""
    # bool is an int, but a peer sending `true` for a port has sent garbage.
    if not isinstance(port, int) or isinstance(port, bool):
        raise ValueError(f"port must be an integer, not {type(port).__name__}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} outside 1..65535")
    return _parse_host(host), port


def compute_backoff(failures: int) -> float:
    """Seconds to wait after the last attempt before dialling an address again."""
    # The exponent is clamped so a large count cannot overflow the float.
    return min(BACKOFF_BASE * 2.0 ** min(failures, 32), BACKOFF_CAP)


@dataclass(slots=True)
class _Entry:
    seen: float  # when the address was last known to be alive
    last_try: float | None = None  # start of the last dial, or time of the last failure
    failures: int = 0  # in a row; connected() resets it
    connected: bool = False


class AddressBook:
    """Peer addresses we know, how dialling them went, and the hosts we refuse."""

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_bans: int = DEFAULT_MAX_BANS,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if capacity < 1 or max_bans < 1:
            raise ValueError("capacity and max_bans must be at least 1")
        self.capacity = capacity
        self.max_bans = max_bans
        self._clock = clock
        # Seeded from the OS by default, so nodes do not all pick the same peers.
        self._rng = rng if rng is not None else random.Random()
        # Insertion-ordered, so a seeded rng gives the same picks every run.
        self._entries: dict[Address, _Entry] = {}
        self._bans: dict[str, tuple[float, str]] = {}  # host -> (until, reason)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, addr: object) -> bool:
        return addr in self._entries

    # --- addresses -------------------------------------------------------------

    def add(self, addr: Address, *, seen: float | None = None) -> bool:
        """Learn an address (from `addr` gossip or a handshake); True if it is new.

        Raises ValueError if `addr` is not a valid address.
        """
        addr = parse_address(*addr)
        now = self._clock()
        if seen is None or not math.isfinite(seen) or seen > now + FUTURE_SLACK:
            seen = now
        entry = self._entries.get(addr)
        if entry is not None:
            entry.seen = max(entry.seen, seen)
            return False
        if self._is_banned(addr[0], now):
            return False  # we would neither dial it nor pass it on
        if len(self._entries) >= self.capacity:
            # The scan is O(capacity); at a thousand entries that is cheaper than
            # keeping a heap in step with every `seen` update.
            evictable = [(e.seen, a) for a, e in self._entries.items() if not e.connected]
            if not evictable:
                return False
            oldest_seen, oldest = min(evictable)
            # A newcomer staler than everything we could evict is not worth a slot.
            if seen < oldest_seen:
                return False
            del self._entries[oldest]
        self._entries[addr] = _Entry(seen=seen)
        return True

    def attempt(self, addr: Address) -> None:
        """We are dialling `addr` now; its backoff counts from here."""
        entry = self._entries.get(addr)
        if entry is not None:
            entry.last_try = self._clock()

    def connected(self, addr: Address) -> None:
        """The handshake with `addr` is done: it is alive and in use."""
        addr = parse_address(*addr)  # it may be new to us, so it must be valid
        if addr not in self._entries:
            # A handshake is the best evidence an address works. If the table is
            # full of connected entries it stays unrecorded: the connection itself
            # is the peer pool's business, not ours.
            self.add(addr)
        entry = self._entries.get(addr)
        if entry is not None:
            entry.failures = 0
            entry.connected = True
            entry.seen = self._clock()

    def disconnected(self, addr: Address) -> None:
        """The connection to `addr` ended; it was alive until now."""
        entry = self._entries.get(addr)
        if entry is not None:
            entry.connected = False
            entry.seen = self._clock()

    def failed(self, addr: Address) -> None:
        """Dialling or the handshake with `addr` failed; after MAX_FAILURES in a row, forget it."""
        entry = self._entries.get(addr)
        if entry is None:
            return
        entry.failures += 1
        # Anchor the backoff at the failure, not the dial: a handshake that timed out
        # after many seconds should not leave the address due again at once.
        entry.last_try = self._clock()
        if entry.failures >= MAX_FAILURES and not entry.connected:
            del self._entries[addr]

    def pick(self, exclude: Collection[Address] = ()) -> Address | None:
        """A random address to dial, or None if none is due.

        Eligible: not connected, not in `exclude` (the caller puts dials in flight
        there), host not banned, and past its backoff. Addresses that never failed are
        preferred, so one that answered (or was never tried) goes before one that did not.
        """
        now = self._clock()
        fresh: list[Address] = []
        retry: list[Address] = []
        for addr, entry in self._entries.items():
            if entry.connected or addr in exclude or self._is_banned(addr[0], now):
                continue
            due = entry.last_try is None or now - entry.last_try >= compute_backoff(entry.failures)
            if not due:
                continue
            (fresh if entry.failures == 0 else retry).append(addr)
        candidates = fresh or retry
        return self._rng.choice(candidates) if candidates else None

    def sample(self, n: int) -> list[tuple[Address, float]]:
        """Up to `n` random (address, seen) pairs for an `addr` answer: recent, not banned."""
        now = self._clock()
        recent: list[tuple[Address, float]] = []
        for addr, entry in self._entries.items():
            # A connected peer is alive right now, however long ago it connected.
            seen = now if entry.connected else entry.seen
            if now - seen <= SAMPLE_MAX_AGE and not self._is_banned(addr[0], now):
                recent.append((addr, seen))
        return self._rng.sample(recent, max(0, min(n, len(recent))))

    # --- bans, keyed by host: a peer that misbehaves is refused on any port -----

    def ban(self, host: str, seconds: float, reason: str) -> None:
        """Refuse `host` for `seconds`; ValueError if the host or duration is invalid.

        If the host is already banned, whichever ban ends later stands. When the list
        is full, the listed ban that expires soonest makes room: a new ban always lands.
        """
        host = _parse_host(host)
        try:
            seconds = float(seconds)  # an RPC caller's int may be too big for a float
        except OverflowError:
            raise ValueError("ban duration too long") from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"ban duration must be positive and finite, not {seconds}")
        now = self._clock()
        until = now + seconds
        old = self._bans.get(host)
        if old is not None and old[0] >= until:
            return
        if old is None and len(self._bans) >= self.max_bans:
            # Expired bans have the smallest `until`, so they are the first to go.
            del self._bans[min(self._bans, key=lambda h: self._bans[h][0])]
        self._bans[host] = (until, reason[:MAX_REASON_LEN])

    def unban(self, host: str) -> bool:
        """Lift the ban on `host`; True if there was one."""
        return self._bans.pop(_parse_host(host), None) is not None

    def is_banned(self, host: str) -> bool:
        """Whether `host` is refused now."""
        try:
            host = _parse_host(host)
        except ValueError:
            # ban() refuses such a host, so it cannot be on the list; answering
            # rather than raising keeps an odd peername from breaking an accept loop.
            return False
        return self._is_banned(host, self._clock())

    def bans(self) -> list[tuple[str, float, str]]:
        """The bans in force as (host, until, reason), soonest to expire first."""
        self._drop_expired_bans(self._clock())
        return sorted(
            ((host, until, reason) for host, (until, reason) in self._bans.items()),
            key=lambda b: (b[1], b[0]),
        )

    def _is_banned(self, host: str, now: float) -> bool:
        ban = self._bans.get(host)
        if ban is None:
            return False
        if ban[0] <= now:
            del self._bans[host]  # expired bans are dropped when next looked at
            return False
        return True

    def _drop_expired_bans(self, now: float) -> None:
        for host in [h for h, (until, _) in self._bans.items() if until <= now]:
            del self._bans[host]
