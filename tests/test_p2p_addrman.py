"""The address table and ban list, on a fake clock and a seeded rng."""

import math
import random

import pytest

from p2p.addrman import (
    BACKOFF_CAP,
    FUTURE_SLACK,
    MAX_FAILURES,
    MAX_REASON_LEN,
    SAMPLE_MAX_AGE,
    AddressBook,
    compute_backoff,
    parse_address,
)

T0 = 1_700_000_000.0
A = ("10.0.0.1", 8333)
B = ("10.0.0.2", 8333)
C = ("10.0.0.3", 8333)
D = ("10.0.0.4", 8333)


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_book(clock: Clock, **kwargs: int) -> AddressBook:
    return AddressBook(clock=clock, rng=random.Random(7), **kwargs)


@pytest.fixture
def book(clock: Clock) -> AddressBook:
    return make_book(clock)


def fail(book: AddressBook, addr: tuple[str, int], times: int = 1) -> None:
    for _ in range(times):
        book.attempt(addr)
        book.failed(addr)


# --- parse_address ------------------------------------------------------------


@pytest.mark.parametrize(
    "host, port, expected",
    [
        ("1.2.3.4", 8333, ("1.2.3.4", 8333)),
        (b"10.0.0.1", 1, ("10.0.0.1", 1)),
        ("127.0.0.1", 65535, ("127.0.0.1", 65535)),
        ("::1", 5, ("::1", 5)),
        ("2001:DB8:0:0:0:0:0:1", 80, ("2001:db8::1", 80)),
        ("::ffff:1.2.3.4", 9, ("1.2.3.4", 9)),
        (b"::ffff:7f00:1", 9, ("127.0.0.1", 9)),
    ],
)
def test_parse_address_accepts_and_normalises(host, port, expected):
    assert parse_address(host, port) == expected


@pytest.mark.parametrize(
    "host, port, reason",
    [
        ("[::1]", 80, "brackets"),  # the bare literal only; "[host]:port" is split earlier
        ("example.com", 80, "not an IP literal"),
        ("localhost", 80, "not an IP literal"),
        ("", 80, "not an IP literal"),
        (" 1.2.3.4", 80, "not an IP literal"),
        ("1.2.3.4:80", 80, "not an IP literal"),
        ("01.2.3.4", 80, "not an IP literal"),
        ("1" * 1000, 80, "longer than"),
        (b"\xff\xfe", 80, "not ASCII"),
        (1234, 80, "host must be text"),
        ("fe80::1%eth0", 80, "zone id"),
        ("0.0.0.0", 80, "unspecified"),
        ("::", 80, "unspecified"),
        ("::ffff:0.0.0.0", 80, "unspecified"),
        ("224.0.0.1", 80, "multicast"),
        ("ff02::1", 80, "multicast"),
        ("255.255.255.255", 80, "broadcast"),
        ("1.2.3.4", 0, "outside"),
        ("1.2.3.4", 65536, "outside"),
        ("1.2.3.4", 70000, "outside"),
        ("1.2.3.4", -1, "outside"),
        ("1.2.3.4", True, "port must be an integer"),
        ("1.2.3.4", "80", "port must be an integer"),
        ("1.2.3.4", 80.0, "port must be an integer"),
    ],
)
def test_parse_address_refuses(host, port, reason):
    with pytest.raises(ValueError, match=reason):
        parse_address(host, port)


def test_long_host_is_not_echoed_in_the_error():
    with pytest.raises(ValueError) as info:
        parse_address("x" * 10_000, 80)
    assert len(str(info.value)) < 100


# --- add ----------------------------------------------------------------------


def test_add_new_then_duplicate(book):
    assert A not in book and len(book) == 0
    assert book.add(A) is True
    assert A in book and len(book) == 1
    assert book.add(A) is False
    assert book.add(B) is True
    assert len(book) == 2


def test_add_normalises_and_refuses_invalid(book):
    assert book.add(("::ffff:10.0.0.1", 8333)) is True
    assert A in book
    assert book.add(A) is False  # the same host, spelled the usual way
    with pytest.raises(ValueError, match="multicast"):
        book.add(("224.0.0.1", 1))
    assert len(book) == 1


def test_add_keeps_the_latest_seen(book, clock):
    book.add(A, seen=T0 - 100)
    book.add(A, seen=T0 - 500)  # older news changes nothing
    assert book.sample(10) == [(A, T0 - 100)]
    book.add(A, seen=T0 - 10)
    assert book.sample(10) == [(A, T0 - 10)]


def test_add_clamps_far_future_seen(book):
    book.add(A, seen=T0 + FUTURE_SLACK + 1)
    book.add(B, seen=T0 + FUTURE_SLACK - 1)  # within the slack: kept as given
    book.add(C, seen=math.nan)
    assert dict(book.sample(10)) == {A: T0, B: T0 + FUTURE_SLACK - 1, C: T0}


def test_add_refuses_banned_host(book):
    book.ban("10.0.0.1", 60, "test")
    assert book.add(A) is False
    assert A not in book
    assert book.add(B) is True


def test_full_table_evicts_least_recently_seen(clock):
    book = make_book(clock, capacity=3)
    book.add(A, seen=T0 - 30)
    book.add(B, seen=T0 - 10)
    book.add(C, seen=T0 - 20)
    assert book.add(D) is True
    assert len(book) == 3
    assert A not in book
    assert {B, C, D} == {addr for addr, _ in book.sample(10)}


def test_eviction_never_takes_a_connected_entry(clock):
    book = make_book(clock, capacity=2)
    book.add(A)
    book.connected(A)  # seen at T0, the stalest entry, but in use
    clock.advance(100)
    book.add(B)
    assert book.add(C) is True
    assert A in book and C in book and B not in book


def test_full_table_of_connected_entries_refuses_newcomers(clock):
    book = make_book(clock, capacity=2)
    for addr in (A, B):
        book.add(addr)
        book.connected(addr)
    assert book.add(C) is False
    assert C not in book and len(book) == 2


def test_full_table_refuses_a_newcomer_staler_than_all(clock):
    book = make_book(clock, capacity=2)
    book.add(A, seen=T0 - 10)
    book.add(B, seen=T0 - 20)
    assert book.add(C, seen=T0 - 30) is False
    assert C not in book and A in book and B in book


def test_connected_learns_an_unknown_address(book):
    book.connected(("::ffff:10.0.0.1", 8333))
    assert A in book
    assert book.pick() is None  # in use


# --- pick ---------------------------------------------------------------------


def test_pick_on_an_empty_book_is_none(book):
    assert book.pick() is None
    assert book.pick(exclude={A}) is None


def test_pick_is_random_among_the_eligible(book):
    for addr in (A, B, C):
        book.add(addr)
    assert {book.pick() for _ in range(50)} == {A, B, C}


def test_pick_respects_exclude(book):
    book.add(A)
    book.add(B)
    assert {book.pick(exclude=[A]) for _ in range(20)} == {B}
    assert book.pick(exclude={A, B}) is None


def test_pick_skips_connected_until_disconnected(book, clock):
    book.add(A)
    book.attempt(A)
    book.connected(A)
    clock.advance(3600)
    assert book.pick() is None
    book.disconnected(A)
    clock.advance(compute_backoff(0))
    assert book.pick() == A


def test_pick_skips_banned_hosts_on_every_port(book):
    book.add(("10.0.0.1", 1))
    book.add(("10.0.0.1", 2))
    book.add(B)
    book.ban("10.0.0.1", 60, "misbehaved")
    assert {book.pick() for _ in range(20)} == {B}
    assert book.pick(exclude={B}) is None


def test_attempt_in_flight_waits_for_the_base_backoff(book, clock):
    book.add(A)
    book.attempt(A)
    assert book.pick() is None
    clock.advance(compute_backoff(0) - 0.5)
    assert book.pick() is None
    clock.advance(0.5)
    assert book.pick() == A


def test_backoff_doubles_with_each_failure(book, clock):
    book.add(A)
    for failures in range(1, MAX_FAILURES):
        fail(book, A)
        delay = 2.0**failures
        clock.advance(delay - 0.5)
        assert book.pick() is None, f"due too early after {failures} failures"
        clock.advance(0.5)
        assert book.pick() == A, f"not due after {failures} failures"


def test_backoff_counts_from_the_failure_not_the_dial(book, clock):
    book.add(A)
    book.attempt(A)
    clock.advance(30)  # a handshake that timed out slowly
    book.failed(A)
    assert book.pick() is None
    clock.advance(compute_backoff(1))
    assert book.pick() == A


@pytest.mark.parametrize(
    "failures, delay",
    [(0, 1.0), (1, 2.0), (3, 8.0), (9, 512.0), (10, BACKOFF_CAP), (10_000, BACKOFF_CAP)],
)
def test_compute_backoff(failures, delay):
    assert compute_backoff(failures) == delay


def test_connected_resets_the_backoff(book, clock):
    book.add(A)
    fail(book, A, times=5)  # next due in 32 s
    book.attempt(A)
    book.connected(A)
    book.disconnected(A)
    clock.advance(compute_backoff(0))
    assert book.pick() == A


def test_pick_prefers_never_failed_addresses(book, clock):
    book.add(A)
    book.add(B)
    fail(book, A)
    clock.advance(BACKOFF_CAP)  # both are due
    assert {book.pick() for _ in range(30)} == {B}
    assert book.pick(exclude={B}) == A


def test_repeated_failures_forget_the_address(book):
    book.add(A)
    fail(book, A, times=MAX_FAILURES - 1)
    assert A in book
    fail(book, A)
    assert A not in book and len(book) == 0


def test_failures_must_be_in_a_row_to_forget(book):
    book.add(A)
    fail(book, A, times=MAX_FAILURES - 1)
    book.connected(A)
    book.disconnected(A)
    fail(book, A, times=MAX_FAILURES - 1)
    assert A in book


# --- sample -------------------------------------------------------------------


def test_sample_bounds(book):
    addrs = [(f"10.1.0.{i}", 8333) for i in range(1, 11)]
    for addr in addrs:
        book.add(addr)
    three = book.sample(3)
    assert len(three) == 3 and len({a for a, _ in three}) == 3
    assert sorted(a for a, _ in book.sample(100)) == sorted(addrs)
    assert book.sample(0) == []
    assert book.sample(-5) == []


def test_sample_is_random(book):
    for addr in (A, B, C):
        book.add(addr)
    assert {book.sample(1)[0][0] for _ in range(50)} == {A, B, C}


def test_sample_leaves_out_stale_addresses(book):
    book.add(A, seen=T0 - SAMPLE_MAX_AGE)  # just inside the window
    book.add(B, seen=T0 - SAMPLE_MAX_AGE - 1)
    assert book.sample(10) == [(A, T0 - SAMPLE_MAX_AGE)]
    assert B in book  # stale for gossip, still worth dialling


def test_sample_leaves_out_banned_hosts(book):
    book.add(A)
    book.add(B)
    book.ban("10.0.0.2", 60, "test")
    assert book.sample(10) == [(A, T0)]


def test_sample_reports_a_connected_peer_as_seen_now(book, clock):
    book.add(A)
    book.connected(A)
    clock.advance(SAMPLE_MAX_AGE * 2)
    assert book.sample(10) == [(A, clock.now)]


# --- bans ---------------------------------------------------------------------


def test_ban_expires(book, clock):
    book.ban("10.0.0.1", 60, "bad-block")
    assert book.is_banned("10.0.0.1")
    assert not book.is_banned("10.0.0.2")
    clock.advance(59.5)
    assert book.is_banned("10.0.0.1")
    clock.advance(0.5)
    assert not book.is_banned("10.0.0.1")
    assert book.bans() == []


def test_ban_matches_any_spelling_of_the_host(book):
    book.ban("::ffff:10.0.0.1", 60, "test")
    assert book.is_banned("10.0.0.1")
    assert book.bans() == [("10.0.0.1", T0 + 60, "test")]


def test_unban(book):
    book.ban("10.0.0.1", 60, "test")
    assert book.unban("10.0.0.1") is True
    assert not book.is_banned("10.0.0.1")
    assert book.unban("10.0.0.1") is False


def test_bans_lists_soonest_to_expire_first(book, clock):
    book.ban("10.0.0.2", 300, "bad-tx")
    book.ban("2001:db8::1", 100, "bad-block")
    book.ban("10.0.0.3", 5, "spam")
    clock.advance(10)  # the third has expired
    assert book.bans() == [
        ("2001:db8::1", T0 + 100, "bad-block"),
        ("10.0.0.2", T0 + 300, "bad-tx"),
    ]


def test_a_shorter_ban_does_not_shorten_a_longer_one(book):
    book.ban("10.0.0.1", 3600, "first")
    book.ban("10.0.0.1", 60, "second")
    assert book.bans() == [("10.0.0.1", T0 + 3600, "first")]
    book.ban("10.0.0.1", 7200, "third")
    assert book.bans() == [("10.0.0.1", T0 + 7200, "third")]


@pytest.mark.parametrize("seconds", [0, -1, math.nan, math.inf])
def test_ban_refuses_bad_durations(book, seconds):
    with pytest.raises(ValueError, match="duration"):
        book.ban("10.0.0.1", seconds, "test")
    assert book.bans() == []


@pytest.mark.parametrize("host", ["example.com", "[::1]", "0.0.0.0"])
def test_ban_refuses_bad_hosts(book, host):
    with pytest.raises(ValueError):
        book.ban(host, 60, "test")
    assert book.is_banned(host) is False  # never raises: such a host cannot be banned
    assert book.bans() == []


def test_ban_refuses_a_duration_too_big_for_a_float(book):
    with pytest.raises(ValueError, match="too long"):
        book.ban("10.0.0.1", 10**400, "test")
    book.ban("10.0.0.1", 10**300, "test")  # big, but a float
    assert book.is_banned("10.0.0.1")


def test_ban_reason_is_bounded(book):
    book.ban("10.0.0.1", 60, "x" * 10_000)
    [(_, _, reason)] = book.bans()
    assert len(reason) == MAX_REASON_LEN


def test_full_ban_list_drops_the_soonest_to_expire(clock):
    book = make_book(clock, max_bans=3)
    book.ban("10.0.0.1", 10, "a")
    book.ban("10.0.0.2", 30, "b")
    book.ban("10.0.0.3", 20, "c")
    book.ban("10.0.0.4", 40, "d")
    assert [host for host, _, _ in book.bans()] == ["10.0.0.3", "10.0.0.2", "10.0.0.4"]
    # A new ban always lands, even when it would expire before the others.
    book.ban("10.0.0.5", 1, "e")
    assert [host for host, _, _ in book.bans()] == ["10.0.0.5", "10.0.0.2", "10.0.0.4"]
    # Re-banning a listed host evicts nobody.
    book.ban("10.0.0.4", 50, "d2")
    assert len(book.bans()) == 3 and book.is_banned("10.0.0.5")


def test_bounds_must_be_positive(clock):
    with pytest.raises(ValueError):
        AddressBook(capacity=0, clock=clock)
    with pytest.raises(ValueError):
        AddressBook(max_bans=0, clock=clock)
