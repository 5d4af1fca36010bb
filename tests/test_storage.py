"""Chain storage on real LevelDB files: genesis, locking, import, reorganisations."""

import random
import subprocess
import sys
from dataclasses import replace

import pytest

from consensus.blocks import compute_block_id
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey
from consensus.params import DEV, TESTNET
from consensus.seal import NoProofEngine
from consensus.transactions import compute_tx_id
from storage import schema
from storage.chain import ChainStore, MissingParent
from storage.db import Database, DataDirLocked, StorageError
from storage.schema import STATUS_INVALID, STATUS_INVALID_PARENT, STATUS_VALID
from tests.builder import MINER, ChainBuilder, funded_params, transfer

ALICE = PrivateKey(bytes([2]) * 32)
BOB = PrivateKey(bytes([3]) * 32)
PARAMS = funded_params(DEV, ALICE)


def bid(block):
    return compute_block_id(block.header)


def open_store(path, params=PARAMS):
    return ChainStore(Database(path), params, NoProofEngine())


def state_of(store):
    return dict(store.iterate_state())


def test_fresh_datadir_starts_at_genesis_and_reopens(tmp_path):
    store = open_store(tmp_path)
    assert store.height == 0 and store.tip_id == store.genesis_id
    assert store.account(ALICE.address).balance == 10**12
    genesis_state = state_of(store)
    store.db.close()
    store = open_store(tmp_path)
    assert store.tip_id == store.genesis_id and state_of(store) == genesis_state
    store.db.close()


def test_other_networks_datadir_is_refused(tmp_path):
    open_store(tmp_path).db.close()
    with pytest.raises(StorageError, match="holds the 'dev' chain"):
        open_store(tmp_path, TESTNET)


def test_second_open_is_refused_with_clear_error(tmp_path):
    db = Database(tmp_path)
    with pytest.raises(DataDirLocked, match="in use by another dpodl process"):
        Database(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from storage.db import Database\n"
         "try: Database(sys.argv[1])\nexcept Exception as e: print(type(e).__name__, e)",
         str(tmp_path)], capture_output=True, text=True, check=True)
    assert probe.stdout.startswith("DataDirLocked")
    db.close()
    Database(tmp_path).close()  # released on close


def test_has_matches_exactly_one_key(tmp_path):
    with Database(tmp_path) as db:
        db.db.put(b"ab", b"1")
        db.db.put(b"ab\0", b"2")
        db.db.put(b"abc", b"3")
        assert [db.has(k) for k in (b"a", b"ab", b"ab\0", b"abc", b"abd", b"b")] == [
            False, True, True, True, False, False]
        db.db.delete(b"ab")
        assert not db.has(b"ab")  # a longer key after it is not it


def test_linear_chain_with_transfers_matches_replay(tmp_path):
    builder = ChainBuilder(PARAMS)
    parent, nonce = builder.genesis_id, 0
    blocks = []
    for _ in range(45):  # crosses two retargets (interval 20)
        txs = (transfer(ALICE, BOB.address, 7, nonce), transfer(ALICE, MINER.address, 3, nonce + 1))
        nonce += 2
        blocks.append(builder.extend(parent, txs, dt=3))
        parent = bid(blocks[-1])
    assert blocks[39].header.target != blocks[0].header.target  # retargeted (3 s blocks)
    store = open_store(tmp_path)
    for block in blocks:
        assert store.add_block(block).status == "connected"
    assert store.tip_id == parent and store.height == 45
    assert state_of(store) == builder.states[parent].entries
    assert store.account(BOB.address).balance == 45 * 7
    assert [store.main_chain_id(h) for h in range(1, 46)] == [bid(b) for b in blocks]
    assert store.add_block(blocks[10]).status == "duplicate"
    store.db.close()


def test_orphan_and_invalid_blocks_store_nothing(tmp_path):
    builder = ChainBuilder(PARAMS)
    a1, a2 = builder.chain(builder.genesis_id, 2)
    store = open_store(tmp_path)
    with pytest.raises(MissingParent):
        store.add_block(a2)
    forged = replace(a1, header=replace(a1.header, timestamp=a1.header.timestamp + 1))
    with pytest.raises(ConsensusError) as err:
        store.add_block(forged)
    assert err.value.reason == "bad-blk-sig"
    assert store.get_entry(bid(forged)) is None and store.get_block(bid(forged)) is None
    assert store.height == 0
    store.db.close()


def test_reorg_to_longer_branch_undoes_and_applies(tmp_path):
    builder = ChainBuilder(PARAMS)
    a = builder.chain(builder.genesis_id, 2)
    main = builder.chain(bid(a[-1]), 3, txs=())
    # The fork spends ALICE's nonce 0 differently from nothing on main.
    fork = [builder.extend(bid(a[-1]), (transfer(ALICE, BOB.address, 100, 0),))]
    fork += builder.chain(bid(fork[-1]), 3)
    store = open_store(tmp_path)
    for block in a + main:
        store.add_block(block)
    assert store.tip_id == bid(main[-1])
    results = [store.add_block(block) for block in fork]
    assert [r.status for r in results] == ["stored", "stored", "stored", "connected"]
    assert results[-1].disconnected == tuple(bid(b) for b in reversed(main))
    assert results[-1].connected == tuple(bid(b) for b in fork)
    assert store.tip_id == bid(fork[-1])
    assert state_of(store) == builder.states[bid(fork[-1])].entries
    assert store.account(BOB.address).balance == 100
    assert store.is_main_chain(bid(fork[0])) and not store.is_main_chain(bid(main[0]))
    assert store.main_chain_id(6) == bid(fork[-1]) and store.main_chain_id(7) is None
    store.db.close()
    store = open_store(tmp_path)  # the reorganised chain is what is on disk
    assert store.tip_id == bid(fork[-1]) and state_of(store) == builder.states[store.tip_id].entries
    assert {i for i, _ in store.chain_tips()} == {bid(main[-1]), bid(fork[-1])}
    store.db.close()


def test_equal_weight_keeps_first_seen(tmp_path):
    builder = ChainBuilder(PARAMS)
    left = builder.chain(builder.genesis_id, 3)
    right = builder.chain(builder.genesis_id, 3)
    store = open_store(tmp_path)
    for block in right + left:
        store.add_block(block)
    assert store.tip_id == bid(right[-1])
    store.db.close()


def test_accuracy_rule_prefers_the_more_useful_chain(tmp_path):
    params = replace(PARAMS, fork_rule="accuracy")
    task = params.genesis_task
    builder = ChainBuilder(params)
    weak = builder.chain(builder.genesis_id, 3, n_correct=task.t_min)
    strong = builder.chain(builder.genesis_id, 1, n_correct=task.dataset.val_size)
    store = open_store(tmp_path, params)
    for block in weak:
        store.add_block(block)
    assert store.tip_id == bid(weak[-1])
    assert store.add_block(strong[0]).status == "connected"  # 1 block at 100% > 3 at t_min
    assert store.tip_id == bid(strong[0]) and store.height == 1
    assert state_of(store) == builder.states[bid(strong[0])].entries
    store.db.close()


def test_longest_rule_rejects_blocks_below_t_acc(tmp_path):
    builder = ChainBuilder(PARAMS)
    (low,) = builder.chain(builder.genesis_id, 1, n_correct=PARAMS.genesis_task.t_acc - 1)
    store = open_store(tmp_path)
    with pytest.raises(ConsensusError) as err:
        store.add_block(low)
    assert err.value.reason == "bad-accuracy"
    store.db.close()


@pytest.mark.parametrize("fork_rule", ["longest", "accuracy"])
def test_any_arrival_order_of_a_tree_ends_on_the_heaviest_tip(tmp_path, fork_rule):
    params = replace(PARAMS, fork_rule=fork_rule)
    task = params.genesis_task
    rng = random.Random(7)
    builder = ChainBuilder(params)
    blocks = []
    for _ in range(40):  # a random tree: each block extends a random earlier one
        parent = rng.choice([builder.genesis_id] + [bid(b) for b in blocks])
        low = task.t_acc if fork_rule == "longest" else task.t_min
        blocks.append(builder.extend(parent, n_correct=rng.randint(low, task.dataset.val_size)))
    reference = open_store(tmp_path / "ref", params)
    for block in blocks:
        reference.add_block(block)
    weights = {i: reference.get_entry(i).chain_weight for i in builder.blocks}
    heaviest = max(weights.values())
    assert weights[reference.tip_id] == heaviest
    reference.db.close()
    for trial in range(3):
        order, placed, pending = [], {builder.genesis_id}, list(blocks)
        rng.shuffle(pending)
        while pending:  # a random order in which every parent comes before its child
            ready = [b for b in pending if b.header.prev_id in placed]
            pick = rng.choice(ready)
            pending.remove(pick)
            placed.add(bid(pick))
            order.append(pick)
        store = open_store(tmp_path / str(trial), params)
        for block in order:
            store.add_block(block)
        assert weights[store.tip_id] == heaviest
        first = min((i for i, w in weights.items() if w == heaviest), key=lambda i: next(
            n for n, b in enumerate(order) if bid(b) == i))
        assert store.tip_id == first  # first seen among the heaviest
        assert state_of(store) == builder.states[store.tip_id].entries
        store.db.close()


def test_invalid_block_on_heavier_branch_falls_back_to_best_valid(tmp_path):
    builder = ChainBuilder(PARAMS)
    main = builder.chain(builder.genesis_id, 3)
    fork = builder.chain(builder.genesis_id, 3)
    bad = builder.extend(bid(fork[-1]), (transfer(ALICE, BOB.address, 1, nonce=5),), valid=False)
    after_bad = builder.extend(bid(bad))
    store = open_store(tmp_path)
    for block in main + fork:
        store.add_block(block)
    assert store.tip_id == bid(main[-1])
    with pytest.raises(ConsensusError) as err:
        store.add_block(bad)  # makes the fork heavier, but its state transition fails
    assert err.value.reason == "bad-txn-nonce"
    assert store.get_entry(bid(bad)).status == STATUS_INVALID
    # The fork's valid prefix weighs the same as main, seen later: stay on main.
    assert store.tip_id == bid(main[-1])
    assert state_of(store) == builder.states[bid(main[-1])].entries
    with pytest.raises(ConsensusError) as err:
        store.add_block(after_bad)
    assert err.value.reason == "bad-prevblk"
    store.db.close()


def test_invalid_block_marks_stored_descendants(tmp_path):
    builder = ChainBuilder(PARAMS)
    main = builder.chain(builder.genesis_id, 2)
    bad = builder.extend(builder.genesis_id, (transfer(ALICE, BOB.address, 1, nonce=9),),
                         valid=False)
    kids = builder.chain(bid(bad), 3)
    store = open_store(tmp_path)
    for block in main + [bad] + kids[:1]:
        store.add_block(block)  # bad's branch is not heavier yet: stored, not connected
    assert store.tip_id == bid(main[-1])
    with pytest.raises(ConsensusError) as err:
        store.add_block(kids[1])  # now heavier: connecting it finds `bad` invalid
    assert err.value.reason == "bad-txn-nonce"
    with pytest.raises(ConsensusError) as err:
        store.add_block(kids[2])
    assert err.value.reason == "bad-prevblk"
    assert store.get_entry(bid(bad)).status == STATUS_INVALID
    assert {store.get_entry(bid(k)).status for k in kids[:2]} == {STATUS_INVALID_PARENT}
    assert store.get_entry(bid(kids[2])) is None
    assert store.get_entry(bid(main[-1])).status == STATUS_VALID
    assert store.tip_id == bid(main[-1])
    store.db.close()
    store = open_store(tmp_path)  # invalidity survives a restart
    assert store.get_entry(bid(kids[1])).status == STATUS_INVALID_PARENT
    assert store.tip_id == bid(main[-1])
    store.db.close()


def test_invalidate_main_chain_block_moves_to_best_valid_chain(tmp_path):
    builder = ChainBuilder(PARAMS)
    main = builder.chain(builder.genesis_id, 4)
    side = builder.chain(bid(main[0]), 2)  # forks after main[0]: height 3, lighter
    store = open_store(tmp_path)
    for block in main + side:
        store.add_block(block)
    assert store.tip_id == bid(main[-1])
    result = store.invalidate_block(bid(main[2]))  # convicted by a fraud proof, say
    assert result.status == "connected"
    assert result.disconnected == tuple(bid(b) for b in reversed(main[1:]))
    assert result.connected == tuple(bid(b) for b in side)
    assert store.tip_id == bid(side[-1])
    assert state_of(store) == builder.states[bid(side[-1])].entries
    assert store.get_entry(bid(main[2])).status == STATUS_INVALID
    assert store.get_entry(bid(main[3])).status == STATUS_INVALID_PARENT
    assert store.get_entry(bid(main[1])).status == STATUS_VALID
    store.db.close()
    store = open_store(tmp_path)
    assert store.tip_id == bid(side[-1])
    assert state_of(store) == builder.states[bid(side[-1])].entries
    with pytest.raises(ConsensusError) as err:
        store.add_block(builder.extend(bid(main[3])))
    assert err.value.reason == "bad-prevblk"
    store.db.close()


def test_invalidate_tip_without_rival_rewinds_to_its_parent(tmp_path):
    builder = ChainBuilder(PARAMS)
    main = builder.chain(builder.genesis_id, 3)
    store = open_store(tmp_path)
    for block in main:
        store.add_block(block)
    result = store.invalidate_block(bid(main[-1]))
    assert result.status == "connected" and result.connected == ()
    assert result.disconnected == (bid(main[-1]),)
    assert store.tip_id == bid(main[1])
    assert state_of(store) == builder.states[bid(main[1])].entries
    off_chain = builder.chain(builder.genesis_id, 1)[0]
    store.add_block(off_chain)
    assert store.invalidate_block(bid(off_chain)).status == "stored"
    with pytest.raises(ValueError):
        store.invalidate_block(builder.genesis_id)
    store.db.close()


def test_transaction_index_follows_the_main_chain_and_is_built_for_an_older_datadir(tmp_path):
    builder = ChainBuilder(PARAMS)
    base = builder.chain(builder.genesis_id, 1)
    both, main_only = transfer(ALICE, BOB.address, 5, 0), transfer(ALICE, BOB.address, 6, 1)
    ids = [compute_tx_id(tx) for tx in (both, main_only)]
    main = [builder.extend(bid(base[-1]), (both, main_only))]
    main += builder.chain(bid(main[-1]), 1)
    fork = [builder.extend(bid(base[-1]))]
    fork += [builder.extend(bid(fork[-1]), (both,))]
    fork += builder.chain(bid(fork[-1]), 1)
    store = open_store(tmp_path)
    for block in base + main:
        store.add_block(block)
    assert [store.tx_block(i) for i in ids] == [bid(main[0])] * 2
    for block in fork:
        store.add_block(block)
    assert store.tip_id == bid(fork[-1])
    assert [store.tx_block(i) for i in ids] == [bid(fork[1]), None]
    store.invalidate_block(bid(fork[1]))
    assert store.tip_id == bid(main[-1])
    assert [store.tx_block(i) for i in ids] == [bid(main[0])] * 2
    index = dict(store.db.iterate(schema.TXINDEX))
    assert len(index) == 3 and index[schema.TXINDEX] == store.tip_id  # and the two transfers
    # A datadir written before the index existed gets it when opened; one whose tip an
    # older version moved, with an entry left behind, gets it again.
    with store.db.write_batch() as batch:
        for key in index:
            batch.delete(key)
    store.db.close()
    store = open_store(tmp_path)
    assert dict(store.db.iterate(schema.TXINDEX)) == index
    with store.db.write_batch() as batch:
        batch.put(schema.tx_key(bytes(32)), bid(fork[0]))
        batch.put(schema.TXINDEX, bid(fork[0]))
    store.db.close()
    store = open_store(tmp_path)
    assert dict(store.db.iterate(schema.TXINDEX)) == index
    store.db.close()
