"""Headers-first sync (p2p.sync) against a real chain store on LevelDB, with chains from
the no-proof builder.

The builder does not search nonces, so on DEV (t1 about 2^-16, t2 = MAX/8) its headers
fail check_header_work ("bad-prehash"; one test shows it). SYNC sets t1 and the genesis
t2 to the largest target, so every builder header carries the work the header checks ask
for; its signature is still checked.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest

from consensus.blocks import Block, BlockHeader, compute_block_id, sign_header
from consensus.encoding import Hash, tagged_hash
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey
from consensus.params import DEV, MAX_TARGET, ChainParams
from consensus.proofs import compute_posthash, compute_prehash
from consensus.seal import NoProofEngine
from p2p import sync as sync_module
from p2p.messages import MAX_LOCATOR, ProtocolError
from p2p.peer import KnownSet
from p2p.sync import BlockSync, build_locator, check_header_work, headers_after
from storage.chain import ChainStore
from storage.db import Database
from storage.schema import STATUS_INVALID
from tests.builder import MINER, ChainBuilder, funded_params, transfer

ALICE = PrivateKey(bytes([2]) * 32)
BOB = PrivateKey(bytes([3]) * 32)
SIZE = 1000  # bytes of a block as it arrived
SYNC = funded_params(replace(DEV, t1=MAX_TARGET, t2_genesis=MAX_TARGET), ALICE)


@dataclass(eq=False)
class FakePeer:
    """What BlockSync reads of a peer; compared and hashed by identity, as a Peer is."""

    id: int
    alive: bool = True
    best_height: int = 0
    known_blocks: KnownSet = field(default_factory=lambda: KnownSet(10_000))


def bid(block: Block) -> Hash:
    return compute_block_id(block.header)


def headers(blocks: list[Block]) -> tuple[BlockHeader, ...]:
    return tuple(b.header for b in blocks)


def open_store(path: object, params: ChainParams = SYNC) -> ChainStore:
    return ChainStore(Database(path), params, NoProofEngine())  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: object) -> Iterator[ChainStore]:
    s = open_store(tmp_path)
    yield s
    s.db.close()


@pytest.fixture
def builder() -> ChainBuilder:
    return ChainBuilder(SYNC)


def add_all(store: ChainStore, blocks: list[Block]) -> None:
    for block in blocks:
        store.add_block(block)


def answered(sync: BlockSync, peer: FakePeer, hs: tuple[BlockHeader, ...],
             now: int | None = None) -> bool:
    """add_headers for an answer to a getheaders we sent."""
    assert sync.want_headers(peer)  # type: ignore[arg-type]
    return sync.add_headers(peer, hs, now)  # type: ignore[arg-type]


def consensus_reason(sync: BlockSync, peer: FakePeer, hs: tuple[BlockHeader, ...]) -> str:
    with pytest.raises(ConsensusError) as info:
        answered(sync, peer, hs)
    return info.value.reason


def protocol_reason(sync: BlockSync, peer: FakePeer, hs: tuple[BlockHeader, ...]) -> str:
    with pytest.raises(ProtocolError) as info:
        answered(sync, peer, hs)
    return info.value.reason


# --- header checks --------------------------------------------------------------------

def test_builder_headers_pass_check_header_work_on_sync_params_only(
        builder: ChainBuilder) -> None:
    for block in builder.chain(builder.genesis_id, 25):  # past a retarget
        check_header_work(SYNC, block.header)
    dev = ChainBuilder(DEV)
    dev_block = dev.extend(dev.genesis_id)
    with pytest.raises(ConsensusError) as info:
        check_header_work(DEV, dev_block.header)
    assert info.value.reason == "bad-prehash"


def test_check_header_work_checks_each_lottery_hash_and_the_signature(
        builder: ChainBuilder) -> None:
    header = builder.extend(builder.genesis_id).header
    check_header_work(SYNC, header)
    cases = [
        (replace(SYNC, t1=0), header, "bad-prehash"),
        (SYNC, sign_header(replace(header, target=0), MINER), "bad-posthash"),
        (replace(SYNC, t2_limit=header.target - 1), header, "bad-diffbits"),
        (SYNC, replace(header, timestamp=header.timestamp + 1), "bad-blk-sig"),
    ]
    for params, h, reason in cases:
        with pytest.raises(ConsensusError) as info:
            check_header_work(params, h)
        assert info.value.reason == reason


# --- locator and getheaders answers ---------------------------------------------------

def test_locator_of_genesis_is_genesis(store: ChainStore) -> None:
    assert build_locator(store) == (store.genesis_id,)


def test_locator_is_ten_then_doubling_then_genesis(store: ChainStore,
                                                  builder: ChainBuilder) -> None:
    blocks = builder.chain(builder.genesis_id, 40)
    add_all(store, blocks)
    heights = [*range(40, 30, -1), 29, 25, 17, 1]  # steps 1 ×9, then 2, 4, 8, 16
    assert build_locator(store) == (*(bid(blocks[h - 1]) for h in heights), store.genesis_id)


def test_locator_follows_the_main_chain_after_a_reorg(store: ChainStore,
                                                      builder: ChainBuilder) -> None:
    trunk = builder.chain(builder.genesis_id, 5)
    old = builder.chain(bid(trunk[-1]), 3)
    new = builder.chain(bid(trunk[-1]), 4)
    add_all(store, trunk + old + new)
    assert store.tip_id == bid(new[-1])
    locator = build_locator(store)
    assert locator[:4] == tuple(bid(b) for b in reversed(new))
    assert not set(locator) & {bid(b) for b in old}
    assert all(store.is_main_chain(i) for i in locator)


class TallStore:
    """A chain far too high to build: only what build_locator reads."""

    genesis_id = tagged_hash("genesis")
    height = 1 << 120

    def main_chain_id(self, height: int) -> Hash:
        return tagged_hash("block", height.to_bytes(16, "big"))


def test_locator_length_is_bounded() -> None:
    locator = build_locator(TallStore())  # type: ignore[arg-type]
    assert len(locator) == MAX_LOCATOR
    assert locator[-1] == TallStore.genesis_id
    tall = TallStore()
    assert locator[:10] == tuple(tall.main_chain_id(tall.height - i) for i in range(10))


@pytest.fixture
def chain30(store: ChainStore, builder: ChainBuilder) -> list[Block]:
    blocks = builder.chain(builder.genesis_id, 30)
    add_all(store, blocks)
    return blocks


def heights_of(hs: list[BlockHeader]) -> list[int]:
    return [h.height for h in hs]


def test_headers_after_the_first_locator_entry_on_the_main_chain(
        store: ChainStore, builder: ChainBuilder, chain30: list[Block]) -> None:
    at = {b.header.height: bid(b) for b in chain30}
    none = Hash(bytes(32))
    assert heights_of(headers_after(store, (at[10], at[5]), none)) == list(range(11, 31))
    unknown = tagged_hash("nowhere")
    assert heights_of(headers_after(store, (unknown, at[5]), none)) == list(range(6, 31))
    # A side branch off height 20 (stored, not main): the fork point is where we start.
    side = builder.chain(at[20], 3)
    add_all(store, side)
    assert store.tip_id == at[30] and not store.is_main_chain(bid(side[-1]))
    locator = (*(bid(b) for b in reversed(side)), at[20], at[19], store.genesis_id)
    got = headers_after(store, locator, none)
    assert got == [b.header for b in chain30[20:]]
    # Our tip: nothing after it.
    assert headers_after(store, (at[30],), none) == []


@pytest.mark.parametrize("locator", [(), (tagged_hash("a"), tagged_hash("b"))])
def test_headers_after_an_unknown_locator_start_at_genesis(
        store: ChainStore, chain30: list[Block], locator: tuple[Hash, ...]) -> None:
    assert headers_after(store, locator, Hash(bytes(32))) == [b.header for b in chain30]


def test_headers_after_end_at_stop(store: ChainStore, chain30: list[Block]) -> None:
    got = headers_after(store, (bid(chain30[9]),), bid(chain30[14]))
    assert heights_of(got) == list(range(11, 16))


def test_headers_after_are_capped(store: ChainStore, chain30: list[Block],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_module, "MAX_HEADERS", 7)
    got = headers_after(store, (bid(chain30[9]),), Hash(bytes(32)))
    assert heights_of(got) == list(range(11, 18))
    assert heights_of(headers_after(store, (), Hash(bytes(32)))) == list(range(1, 8))


# --- add_headers ----------------------------------------------------------------------

def test_headers_not_asked_for_are_refused(store: ChainStore, builder: ChainBuilder) -> None:
    sync, peer = BlockSync(SYNC, store), FakePeer(1)
    hs = headers(builder.chain(builder.genesis_id, 3))
    with pytest.raises(ProtocolError) as info:
        sync.add_headers(peer, hs)  # type: ignore[arg-type]
    assert info.value.reason == "unrequested-headers"
    assert answered(sync, peer, hs) is False
    with pytest.raises(ProtocolError) as info:  # one answer per getheaders
        sync.add_headers(peer, hs)  # type: ignore[arg-type]
    assert info.value.reason == "unrequested-headers"
    # Another peer's getheaders does not license this one's answer.
    other = FakePeer(2)
    assert sync.want_headers(other)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        sync.add_headers(FakePeer(3), hs)  # type: ignore[arg-type]


def test_want_headers_once_at_a_time(store: ChainStore) -> None:
    sync, peer = BlockSync(SYNC, store), FakePeer(1)
    assert sync.want_headers(peer, now=5.0)  # type: ignore[arg-type]
    assert not sync.want_headers(peer, now=6.0)  # type: ignore[arg-type]
    assert sync.asked_headers == {1: 5.0}


def test_good_headers_are_kept(store: ChainStore, builder: ChainBuilder) -> None:
    blocks = builder.chain(builder.genesis_id, 10)
    add_all(store, blocks[:3])
    sync, peer = BlockSync(SYNC, store), FakePeer(1)
    assert answered(sync, peer, headers(blocks)) is False  # not a full message
    assert set(sync.headers) == {bid(b) for b in blocks[3:]}  # the stored ones are not kept
    assert all(sync.holders[bid(b)] == {1} for b in blocks[3:])
    assert all(bid(b) in peer.known_blocks for b in blocks)
    assert peer.best_height == 10 and sync.best_height() == 10


@pytest.mark.parametrize("case", ["non-continuous", "unconnected", "skips-one"])
def test_headers_that_do_not_chain_are_a_protocol_error(
        store: ChainStore, builder: ChainBuilder, case: str) -> None:
    blocks = builder.chain(builder.genesis_id, 6)
    hs, reason = {
        "non-continuous": ((blocks[0].header, blocks[2].header), "non-continuous-headers"),
        "unconnected": (headers(blocks[3:]), "unconnected-headers"),
        "skips-one": ((blocks[0].header, blocks[1].header, blocks[3].header),
                      "non-continuous-headers"),
    }[case]
    sync = BlockSync(SYNC, store)
    assert protocol_reason(sync, FakePeer(1), hs) == reason


def test_header_with_the_wrong_height_is_invalid(store: ChainStore,
                                                 builder: ChainBuilder) -> None:
    first = builder.extend(builder.genesis_id)
    child = builder.extend(bid(first)).header
    wrong = sign_header(replace(child, height=child.height + 1), MINER)
    check_header_work(SYNC, wrong)  # the work is fine: only the height is wrong
    sync = BlockSync(SYNC, store)
    assert consensus_reason(sync, FakePeer(1), (first.header, wrong)) == "bad-height"
    assert compute_block_id(wrong) not in sync.headers


@pytest.mark.parametrize("where", ["rejected", "stored-invalid"])
def test_headers_on_a_known_invalid_block_are_invalid(
        store: ChainStore, builder: ChainBuilder, where: str) -> None:
    sync = BlockSync(SYNC, store)
    if where == "rejected":  # the sync found it bad (a fraud proof, say), store or not
        bad = builder.extend(builder.genesis_id)
        add_all(store, [bad])
        sync.reject(bid(bad))
    else:  # the store refused it when connecting it
        bad = builder.extend(builder.genesis_id, (transfer(ALICE, BOB.address, 1, nonce=9),),
                             valid=False)
        with pytest.raises(ConsensusError):
            store.add_block(bad)
        assert store.get_entry(bid(bad)).status >= STATUS_INVALID  # type: ignore[union-attr]
    kids = builder.chain(bid(bad), 2)
    assert consensus_reason(sync, FakePeer(1), headers(kids)) == "bad-prevblk"
    assert consensus_reason(sync, FakePeer(1), (bad.header, *headers(kids))) == "bad-prevblk"
    assert not sync.headers


def test_a_rejected_header_sent_again_is_invalid(store: ChainStore,
                                                 builder: ChainBuilder) -> None:
    blocks = builder.chain(builder.genesis_id, 4)
    sync = BlockSync(SYNC, store)
    answered(sync, FakePeer(1), headers(blocks))
    sync.reject(bid(blocks[1]))
    assert consensus_reason(sync, FakePeer(2), headers(blocks)) == "bad-prevblk"
    assert set(sync.headers) == {bid(blocks[0])}


def test_header_without_its_work_is_invalid_and_not_kept(store: ChainStore,
                                                         builder: ChainBuilder) -> None:
    blocks = builder.chain(builder.genesis_id, 3)
    forged = replace(blocks[2].header, timestamp=blocks[2].header.timestamp + 1)  # unsigned
    sync = BlockSync(SYNC, store)
    reason = consensus_reason(sync, FakePeer(1), (blocks[0].header, blocks[1].header, forged))
    assert reason == "bad-blk-sig"
    assert compute_block_id(forged) not in sync.headers


def test_header_without_its_prehash_work_is_invalid(tmp_path: object) -> None:
    store = open_store(tmp_path, DEV)
    try:
        dev = ChainBuilder(DEV)
        sync = BlockSync(DEV, store)
        hs = headers(dev.chain(dev.genesis_id, 2))
        assert consensus_reason(sync, FakePeer(1), hs) == "bad-prehash"
        assert not sync.headers
    finally:
        store.db.close()


def test_more_is_asked_only_after_a_full_message_with_new_headers(
        store: ChainStore, builder: ChainBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_module, "MAX_HEADERS", 5)
    blocks = builder.chain(builder.genesis_id, 9)
    sync = BlockSync(SYNC, store)
    a, b = FakePeer(1), FakePeer(2)
    assert answered(sync, a, headers(blocks[:5])) is True  # full and new: there may be more
    assert answered(sync, b, headers(blocks[:5])) is False  # full but nothing new
    assert sync.holders[bid(blocks[4])] == {1, 2}
    assert answered(sync, a, headers(blocks[5:])) is False  # not full: that was all
    assert len(sync.headers) == 9
    add_all(store, blocks[:5])
    for block in blocks[:5]:
        sync.done(bid(block))
    assert answered(sync, FakePeer(3), headers(blocks[:5])) is False  # full, all stored


def test_the_header_tree_is_bounded(store: ChainStore, builder: ChainBuilder) -> None:
    blocks = builder.chain(builder.genesis_id, 8)
    sync = BlockSync(SYNC, store, max_headers=5)
    assert answered(sync, FakePeer(1), headers(blocks)) is False
    assert set(sync.headers) == {bid(b) for b in blocks[:5]}
    # Once blocks have drained it, the rest fits.
    add_all(store, blocks[:3])
    for block in blocks[:3]:
        sync.done(bid(block))
    answered(sync, FakePeer(1), headers(blocks[2:]))
    assert set(sync.headers) == {bid(b) for b in blocks[3:]}


# --- block requests -------------------------------------------------------------------

def synced(store: ChainStore, builder: ChainBuilder, n: int, *peers: FakePeer,
           **kw: object) -> tuple[BlockSync, list[Block]]:
    """A BlockSync holding the headers of `n` new blocks, each peer having sent them all."""
    blocks = builder.chain(builder.genesis_id, n)
    sync = BlockSync(SYNC, store, **kw)  # type: ignore[arg-type]
    for peer in peers:
        answered(sync, peer, headers(blocks))
    return sync, blocks


def ids(blocks: list[Block]) -> list[Hash]:
    return [bid(b) for b in blocks]


def test_requests_lowest_first_up_to_per_peer(store: ChainStore,
                                              builder: ChainBuilder) -> None:
    a = FakePeer(1)
    sync, blocks = synced(store, builder, 20, a, per_peer=6)
    assert sync.requests([a], now=0.0) == {a: ids(blocks[:6])}  # type: ignore[list-item]
    assert sync.requests([a], now=0.0) == {}  # its six are in flight
    assert sync.on_block(a, blocks[2], SIZE)  # type: ignore[arg-type]
    assert sync.requests([a], now=0.0) == {a: ids(blocks[6:7])}  # type: ignore[list-item]


def test_requests_stay_within_the_window(store: ChainStore, builder: ChainBuilder) -> None:
    a = FakePeer(1)
    sync, blocks = synced(store, builder, 20, a, window=4)
    assert sync.requests([a], now=0.0) == {a: ids(blocks[:4])}  # type: ignore[list-item]
    add_all(store, blocks[:2])  # the tip moved: the window with it
    for block in blocks[:2]:
        sync.done(bid(block))
    assert sync.requests([a], now=0.0) == {a: ids(blocks[4:6])}  # type: ignore[list-item]


def test_requests_go_only_to_live_holders(store: ChainStore, builder: ChainBuilder) -> None:
    a, b, c = FakePeer(1), FakePeer(2), FakePeer(3, alive=False)
    blocks = builder.chain(builder.genesis_id, 6)
    sync = BlockSync(SYNC, store)
    answered(sync, a, headers(blocks[:3]))
    answered(sync, c, headers(blocks))
    assert sync.requests([a, b, c], now=0.0) == {a: ids(blocks[:3])}  # type: ignore[list-item]
    c.alive = True
    assert sync.requests([b, c], now=0.0) == {c: ids(blocks[3:])}  # type: ignore[list-item]


def test_requests_spread_across_peers(store: ChainStore, builder: ChainBuilder) -> None:
    a, b, c = FakePeer(1), FakePeer(2), FakePeer(3)
    sync, blocks = synced(store, builder, 12, a, b, c, per_peer=16)
    out = sync.requests([a, b, c], now=0.0)  # type: ignore[list-item]
    assert {p: len(v) for p, v in out.items()} == {a: 4, b: 4, c: 4}
    flat = [i for v in out.values() for i in v]
    assert sorted(flat) == sorted(ids(blocks))  # each block asked once, of one peer
    for v in out.values():  # each peer's share is in height order
        assert v == sorted(v, key=lambda i: sync.headers[i].height)


def test_block_from_a_peer_not_asked_is_refused(store: ChainStore,
                                                builder: ChainBuilder) -> None:
    a, b = FakePeer(1), FakePeer(2)
    sync, blocks = synced(store, builder, 3, a, b, per_peer=1)
    out = sync.requests([a, b], now=0.0)  # type: ignore[list-item]
    assert out == {a: [bid(blocks[0])], b: [bid(blocks[1])]}
    assert not sync.on_block(b, blocks[0], SIZE)  # type: ignore[arg-type]  # asked of a
    assert not sync.on_block(a, blocks[2], SIZE)  # type: ignore[arg-type]  # asked of nobody
    assert sync.on_block(a, blocks[0], SIZE)  # type: ignore[arg-type]
    assert not sync.on_block(a, blocks[0], SIZE)  # type: ignore[arg-type]  # not twice


def test_blocks_are_handed_on_parent_first_and_once(store: ChainStore,
                                                    builder: ChainBuilder) -> None:
    a = FakePeer(1)
    sync, blocks = synced(store, builder, 5, a)
    assert sync.requests([a], now=0.0) == {a: ids(blocks)}  # type: ignore[list-item]
    for block in reversed(blocks[1:]):
        assert sync.on_block(a, block, SIZE)  # type: ignore[arg-type]
        assert sync.next_ready() is None  # block 1 is missing: nothing can be added
    assert sync.on_block(a, blocks[0], SIZE)  # type: ignore[arg-type]
    order = []
    while (item := sync.next_ready()) is not None:
        block, peer = item
        assert peer is a
        assert sync.next_ready() is None  # its child waits until it is stored
        assert sync.requests([a], now=0.0) == {}  # nothing handed on is asked for again
        store.add_block(block)
        sync.done(bid(block))
        order.append(bid(block))
    assert order == ids(blocks)
    assert not sync.headers and not sync.in_flight and not sync.arrived and not sync.adding


def test_a_peer_delivering_big_blocks_one_by_one_is_not_a_staller(
        store: ChainStore, builder: ChainBuilder) -> None:
    """Four blocks asked at once, each taking 15 s to arrive: 60 s for the last, yet the
    peer delivered within every stall timeout; once it stops delivering, it stalls."""
    a = FakePeer(1)
    sync, blocks = synced(store, builder, 4, a, stall_timeout=20.0)
    assert sync.requests([a], now=0.0) == {a: ids(blocks)}  # type: ignore[list-item]
    for i, block in enumerate(blocks[:3], start=1):
        assert sync.stallers(now=15.0 * i - 1) == []
        assert sync.on_block(a, block, SIZE, now=15.0 * i)  # type: ignore[arg-type]
    assert sync.stallers(now=64.0) == []
    assert sync.stallers(now=66.0) == [a]  # nothing for 21 s


def test_no_requests_while_arrived_blocks_fill_the_memory_budget(
        store: ChainStore, builder: ChainBuilder) -> None:
    a = FakePeer(1)
    sync, blocks = synced(store, builder, 6, a, per_peer=2, max_arrived_bytes=3 * SIZE)
    assert sync.requests([a], now=0.0) == {a: ids(blocks[:2])}  # type: ignore[list-item]
    for block, after in ((blocks[1], blocks[2]), (blocks[2], blocks[3])):  # blocks[0] lags
        assert sync.on_block(a, block, SIZE)  # type: ignore[arg-type]
        assert sync.requests([a], now=0.0) == {a: [bid(after)]}  # type: ignore[list-item]
    assert sync.on_block(a, blocks[3], SIZE)  # type: ignore[arg-type]
    assert sync.requests([a], now=0.0) == {}  # type: ignore[list-item]  # 3 × SIZE waiting
    assert sync.on_block(a, blocks[0], SIZE)  # type: ignore[arg-type]
    for room in (False, True):  # added: 3 × SIZE still arrived; then 2 × SIZE
        block, _ = sync.next_ready()  # type: ignore[misc]
        store.add_block(block)
        sync.done(bid(block))
        assert sync.requests([a], now=0.0) == (  # type: ignore[list-item]
            {a: ids(blocks[4:6])} if room else {})


def test_not_found_asks_another_holder(store: ChainStore, builder: ChainBuilder) -> None:
    a, b = FakePeer(1), FakePeer(2)
    sync, blocks = synced(store, builder, 1, a, b)
    first = sync.requests([a, b], now=0.0)  # type: ignore[list-item]
    (asked, [block_id]), = first.items()
    other = b if asked is a else a
    sync.not_found(other, block_id)  # type: ignore[arg-type]  # not its request: ignored
    assert block_id in sync.in_flight
    sync.not_found(asked, block_id)
    assert block_id not in sync.in_flight
    assert sync.requests([a, b], now=0.0) == {other: [block_id]}  # type: ignore[list-item]
    sync.not_found(other, block_id)  # type: ignore[arg-type]
    assert sync.requests([a, b], now=0.0) == {}  # type: ignore[list-item]  # nobody has it


def test_stallers_after_the_stall_timeout(store: ChainStore, builder: ChainBuilder) -> None:
    a, b = FakePeer(1), FakePeer(2)
    sync, blocks = synced(store, builder, 2, a, b, per_peer=1, stall_timeout=20.0)
    out = sync.requests([a], now=100.0)  # type: ignore[list-item]
    out |= sync.requests([b], now=110.0)  # type: ignore[list-item]
    assert set(out) == {a, b}
    assert sync.stallers(now=119.0) == []
    assert sync.stallers(now=121.0) == [a]
    assert set(sync.stallers(now=131.0)) == {a, b}
    assert sync.want_headers(a, now=100.0)  # type: ignore[arg-type]
    peers = {1: a, 2: b}
    assert sync.late_headers(peers, now=119.0) == []  # type: ignore[arg-type]
    assert sync.late_headers(peers, now=121.0) == [a]  # type: ignore[arg-type]


def test_forget_peer_requeues_its_requests(store: ChainStore, builder: ChainBuilder) -> None:
    a, b = FakePeer(1), FakePeer(2)
    blocks = builder.chain(builder.genesis_id, 4)
    sync = BlockSync(SYNC, store)
    answered(sync, a, headers(blocks))
    answered(sync, b, headers(blocks[:2]))
    assert sync.requests([a], now=0.0) == {a: ids(blocks)}  # type: ignore[list-item]
    assert sync.want_headers(a)  # type: ignore[arg-type]
    sync.forget_peer(a)  # type: ignore[arg-type]
    assert not sync.in_flight and a.id not in sync.asked_headers
    assert all(a.id not in h for h in sync.holders.values())
    assert sync.requests([a, b], now=0.0) == {b: ids(blocks[:2])}  # type: ignore[list-item]


def test_reject_drops_and_marks_every_descendant(store: ChainStore,
                                                 builder: ChainBuilder) -> None:
    a = FakePeer(1)
    sync, blocks = synced(store, builder, 6, a)
    side = builder.chain(bid(blocks[1]), 2)  # a branch off block 2, beside block 3
    answered(sync, a, headers(blocks[:2] + side))
    sync.requests([a], now=0.0)  # type: ignore[list-item]
    for block in blocks[:5]:  # block 6 stays in flight
        assert sync.on_block(a, block, SIZE)  # type: ignore[arg-type]
    for block in blocks[:2]:
        item = sync.next_ready()
        assert item is not None and item[0] == block
        store.add_block(block)
        sync.done(bid(block))
    item = sync.next_ready()  # block 3, handed on: its checks fail
    assert item is not None and item[0] == blocks[2]
    sync.reject(bid(blocks[2]))
    gone = ids(blocks[2:])
    assert all(i in sync.invalid for i in gone)
    assert set(sync.headers) == set(ids(side))  # the side branch is not built on block 3
    assert not set(gone) & (set(sync.in_flight) | set(sync.arrived) | set(sync.holders)
                            | sync.adding)
    assert set(sync.in_flight) == set(ids(side))
    assert not any(i in sync.invalid for i in ids(side))
    assert sync.next_ready() is None
    # Announcing the branch again does not bring it back.
    assert consensus_reason(sync, a, headers(blocks[2:])) == "bad-prevblk"
    assert consensus_reason(sync, a, headers(blocks[3:])) == "bad-prevblk"
    assert set(sync.headers) == set(ids(side))


def test_drop_forgets_without_marking_invalid(store: ChainStore,
                                              builder: ChainBuilder) -> None:
    a = FakePeer(1)
    sync, blocks = synced(store, builder, 5, a)
    sync.requests([a], now=0.0)  # type: ignore[list-item]
    for block in blocks:
        assert sync.on_block(a, block, SIZE)  # type: ignore[arg-type]
    item = sync.next_ready()
    assert item is not None and bid(item[0]) == bid(blocks[0])
    sync.drop(bid(blocks[0]))  # its artifacts could not be had
    assert not sync.headers and not sync.arrived and not sync.adding
    assert not any(i in sync.invalid for i in ids(blocks))
    # A later announcement starts over.
    assert answered(sync, a, headers(blocks)) is False
    assert set(sync.headers) == set(ids(blocks))
    assert sync.requests([a], now=0.0) == {a: ids(blocks)}  # type: ignore[list-item]


# --- found in review: a departed peer's headers held the tree full ------------------------

def test_headers_of_a_departed_peer_do_not_hold_the_tree_full(
        store: ChainStore, builder: ChainBuilder) -> None:
    sync = BlockSync(SYNC, store, max_headers=5)
    junk = builder.chain(builder.genesis_id, 5, dt=7)  # a branch only the attacker has
    honest = builder.chain(builder.genesis_id, 3)
    attacker, friend = FakePeer(1), FakePeer(2)
    answered(sync, attacker, headers(junk))
    assert len(sync.headers) == 5
    sync.forget_peer(attacker)  # type: ignore[arg-type]
    assert sync.requests([friend], now=0.0) == {}  # type: ignore[list-item]  # nobody has them
    answered(sync, friend, headers(honest))
    assert set(ids(honest)) <= set(sync.headers)


@pytest.mark.parametrize("at_retarget", [False, True])
def test_header_with_a_target_off_the_retarget_rule_is_invalid(
        store: ChainStore, builder: ChainBuilder, at_retarget: bool) -> None:
    """A peer cannot name a target of its own: t2 is the parent's between retargets and
    the retarget rule's at one, worked out from the headers below (stored or waiting)."""
    n = SYNC.retarget_interval - 1 if at_retarget else 3
    blocks = builder.chain(builder.genesis_id, n)
    sync = BlockSync(SYNC, store)
    assert answered(sync, FakePeer(1), headers(blocks)) is False
    child = builder.extend(bid(blocks[-1])).header
    assert (child.height % SYNC.retarget_interval == 0) is at_retarget
    h1 = compute_prehash(child.prev_id, child.proof)
    h2 = int.from_bytes(compute_posthash(h1, child.proof.steps, child.proof.n_correct), "big")
    other = sign_header(replace(child, target=h2), MINER)  # as easy as its own h2 allows
    assert other.target != child.target
    check_header_work(SYNC, other)  # the lottery hashes pass: only t2 is off
    assert consensus_reason(sync, FakePeer(1), (other,)) == "bad-diffbits"
    answered(sync, FakePeer(1), (child,))  # the rule's own target is kept
    assert compute_block_id(child) in sync.headers


def test_headers_of_a_convicted_block_are_skipped_not_held_against_the_peer(
        store: ChainStore, builder: ChainBuilder) -> None:
    """A block convicted by a private audit or fraud proof passed an honest relay's own
    audits: its headers are ignored, while a block invalid for everyone is an offence."""
    blocks = builder.chain(builder.genesis_id, 3)
    sync = BlockSync(SYNC, store)
    sync.reject(bid(blocks[0]), convicted=True)
    assert answered(sync, FakePeer(1), headers(blocks)) is False
    assert not sync.headers
    other = builder.chain(builder.genesis_id, 3, dt=3)  # another branch, bad for everyone
    sync.reject(bid(other[0]))
    assert consensus_reason(sync, FakePeer(2), headers(other)) == "bad-prevblk"


def test_a_late_answer_to_a_dropped_request_is_marked_cancelled(
        store: ChainStore, builder: ChainBuilder) -> None:
    blocks = builder.chain(builder.genesis_id, 3)
    sync = BlockSync(SYNC, store)
    peer = FakePeer(1)
    answered(sync, peer, headers(blocks))
    sync.requests([peer], now=0.0)  # type: ignore[list-item]
    assert sync.on_block(peer, blocks[0], SIZE)  # type: ignore[arg-type]
    assert sync.next_ready() is not None
    sync.drop(bid(blocks[0]))  # its artifacts could not be had
    assert bid(blocks[1]) in sync.cancelled and bid(blocks[2]) in sync.cancelled
    assert not sync.on_block(peer, blocks[1], SIZE)  # type: ignore[arg-type]


# --- found in review: cheap headers filled the tree -----------------------------------

def test_header_not_after_the_median_time_past_is_invalid(store: ChainStore,
                                                          builder: ChainBuilder) -> None:
    """The median of the 11 headers below (stored and waiting alike) must be passed."""
    blocks = builder.chain(builder.genesis_id, 12)  # 5 s apart
    add_all(store, blocks[:6])
    sync = BlockSync(SYNC, store)
    answered(sync, FakePeer(1), headers(blocks[6:]))
    median = blocks[6].header.timestamp  # of heights 2..12, the middle one
    at = builder.extend(bid(blocks[-1]), dt=median - blocks[-1].header.timestamp).header
    assert at.timestamp == median
    assert consensus_reason(sync, FakePeer(1), (at,)) == "time-too-old"
    assert compute_block_id(at) in sync.invalid and compute_block_id(at) not in sync.headers
    assert consensus_reason(sync, FakePeer(2), (at,)) == "bad-prevblk"  # known invalid
    after = builder.extend(bid(blocks[-1]), dt=median + 1 - blocks[-1].header.timestamp)
    answered(sync, FakePeer(1), (after.header,))
    assert bid(after) in sync.headers


def test_header_too_far_ahead_of_the_clock_waits_without_blame(
        store: ChainStore, builder: ChainBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bitcoin Core's BLOCK_TIME_FUTURE: the header may be valid later, so the headers
    before it are kept and no more are asked for, but it is neither punished nor cached."""
    monkeypatch.setattr(sync_module, "MAX_HEADERS", 5)
    blocks = builder.chain(builder.genesis_id, 3)
    blocks += builder.chain(bid(blocks[-1]), 2, dt=100)
    now = blocks[3].header.timestamp - SYNC.max_future_time - 1  # the 4th is 1 s too new
    sync, peer = BlockSync(SYNC, store), FakePeer(1)
    assert answered(sync, peer, headers(blocks), now) is False  # full, but stop asking
    assert set(sync.headers) == set(ids(blocks[:3]))
    assert not any(i in sync.invalid for i in ids(blocks))
    assert peer.best_height == 3
    assert answered(sync, peer, headers(blocks), now + 1) is False  # the 5th is too new now
    assert set(sync.headers) == set(ids(blocks[:4]))
    assert answered(sync, peer, headers(blocks), now + 101) is True  # all in: maybe more
    assert set(sync.headers) == set(ids(blocks)) and peer.best_height == 5


def test_full_tree_evicts_the_lowest_branch_for_a_higher_header(
        store: ChainStore, builder: ChainBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    main = builder.chain(builder.genesis_id, 6)
    low = builder.chain(builder.genesis_id, 2, dt=7)  # ends at 2
    mid = builder.chain(builder.genesis_id, 3, dt=9)  # ends at 3
    busy = builder.chain(builder.genesis_id, 1, dt=11)  # ends at 1, its block in flight
    sync = BlockSync(SYNC, store, max_headers=9)
    a, b, c = FakePeer(1), FakePeer(2), FakePeer(3)
    answered(sync, a, headers(main[:3]))
    answered(sync, b, headers(low))
    answered(sync, b, headers(mid))
    answered(sync, c, headers(busy))
    assert sync.requests([c], now=0.0) == {c: ids(busy)}  # type: ignore[list-item]
    assert len(sync.headers) == 9
    plans: list[Hash] = []
    evictable = sync._evictable

    def counted(keep: Hash) -> list[tuple[int, Hash]]:
        plans.append(keep)
        return evictable(keep)

    monkeypatch.setattr(sync, "_evictable", counted)
    assert answered(sync, a, headers(main[3:5])) is False
    assert plans == [bid(main[2])]  # the tree was sorted out once for the whole message
    assert set(sync.headers) == set(ids(main[:5] + mid + busy))
    assert not set(ids(low)) & set(sync.holders)
    assert not any(i in sync.invalid for i in ids(low))  # forgotten, not convicted
    answered(sync, a, headers(main[5:]))  # at 6, above the branch ending at 3: tip first
    assert set(sync.headers) == set(ids(main + mid[:2] + busy))
    assert sync.requests([a, b, c], now=0.0) == {  # type: ignore[list-item]
        a: ids(main), b: ids(mid[:2])}


def test_full_tree_of_higher_or_busy_branches_refuses(store: ChainStore,
                                                      builder: ChainBuilder) -> None:
    ours = builder.chain(builder.genesis_id, 3)
    add_all(store, ours[:2])
    high = builder.chain(builder.genesis_id, 3, dt=7)  # ends at 3: as high as ours[2]
    busy = builder.chain(builder.genesis_id, 2, dt=9)  # ends at 2, lower, but fetching
    sync = BlockSync(SYNC, store, max_headers=5)
    a, b = FakePeer(1), FakePeer(2)
    answered(sync, a, headers(high))
    answered(sync, b, headers(busy))
    assert sync.requests([b], now=0.0) == {b: ids(busy)}  # type: ignore[list-item]
    assert sync.on_block(b, busy[0], SIZE)  # type: ignore[arg-type]  # arrived, the other in flight
    before = set(sync.headers)
    assert answered(sync, FakePeer(3), (ours[2].header,)) is False
    assert set(sync.headers) == before and bid(ours[2]) not in sync.holders
