"""The mempool on a real chain store (LevelDB in tmp_path) under the no-proof engine."""

import logging
from dataclasses import replace

import pytest

from consensus.blocks import Block, block_size, compute_block_id
from consensus.difficulty import compute_mtx_target
from consensus.encoding import ZERO_HASH, Hash, encode, tagged_hash
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey
from consensus.params import COIN, DEV, ChainParams
from consensus.proofs import Proof
from consensus.seal import MissingArtifact, Need, NoProofEngine
from consensus.state import SCHEDULE_KEY
from consensus.tasks import Task, compute_task_id
from consensus.transactions import ModelTx, TaskTx, Transaction, compute_tx_id, sign_tx
from node.mempool import BLOCK_OVERHEAD, Mempool
from storage.chain import AddResult, ChainStore
from storage.db import Database
from tests.builder import ChainBuilder, funded_params, transfer

ALICE, BOB, CAROL, DAVE = (PrivateKey(bytes([n]) * 32) for n in (2, 3, 4, 5))
FUNDS = 10**12
PARAMS = funded_params(DEV, ALICE, BOB, CAROL, DAVE, balance=FUNDS)
TASK = PARAMS.genesis_task


def bid(block: Block) -> Hash:
    return compute_block_id(block.header)


def size_of(tx: Transaction) -> int:
    return len(encode(tx, Transaction))


class FakeEngine(NoProofEngine):
    """Accepts block seals; answers model transactions as told, recording each target."""

    def __init__(self) -> None:
        self.refuse: Exception | None = None
        self.min_target = 0
        self.mtx_targets: list[int] = []

    def validate_mtx_seal(self, params: ChainParams, tx: ModelTx, task: Task,
                          target: int) -> None:
        assert task == TASK
        self.mtx_targets.append(target)
        if self.refuse is not None:
            raise self.refuse
        if target < self.min_target:
            raise ConsensusError("bad-posthash", "h2 above t2_mtx")


class Chain:
    """A chain store and the builder that predicts its blocks' states."""

    def __init__(self, path, params: ChainParams = PARAMS) -> None:
        self.store = ChainStore(Database(path), params, NoProofEngine())
        self.builder = ChainBuilder(params)

    def mine(self, txs: tuple[Transaction, ...] = (), parent: Hash | None = None,
             **kw) -> tuple[Block, AddResult]:
        block = self.builder.extend(self.store.tip_id if parent is None else parent, txs, **kw)
        return block, self.store.add_block(block)

    def mtx(self, key: PrivateKey, prev_id: Hash, n: int, fee: int = 1) -> ModelTx:
        proof = Proof(task_id=self.store.get_state(SCHEDULE_KEY).active, ref_model=b"",
                      miner=key.pubkey, nonce=n, steps=TASK.s_min, n_correct=TASK.t_acc,
                      model_id=tagged_hash("mempool-test-model", n), ckpt_root=ZERO_HASH)
        return sign_tx(ModelTx(prev_id=prev_id, proof=proof, fee=fee), key)  # type: ignore[return-value]

    def state(self) -> dict:
        return dict(self.store.iterate_state())


@pytest.fixture
def chain(tmp_path):
    c = Chain(tmp_path)
    yield c
    c.store.close()


def refused(pool: Mempool, tx: Transaction, reason: str) -> None:
    """`tx` is refused for `reason` and the pool is exactly as before."""
    before = (pool.ids(), pool.info(), pool.select())
    with pytest.raises(ConsensusError) as err:
        pool.add(tx)
    assert err.value.reason == reason, err.value
    assert (pool.ids(), pool.info(), pool.select()) == before


def test_valid_transfer_accepted(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    tx = transfer(ALICE, BOB.address, 5, 0)
    tx_id = pool.add(tx)
    assert tx_id == compute_tx_id(tx)
    assert tx_id in pool and b"other" not in pool and None not in pool
    assert pool.get(tx_id) == tx and pool.get(Hash(bytes(32))) is None
    assert pool.ids() == [tx_id] and len(pool) == 1
    assert pool.info() == {"size": 1, "bytes": size_of(tx), "max_txs": 5000,
                           "max_bytes": 32 << 20}


def test_consecutive_nonces_in_order_and_gap_or_replay_refused(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    txs = [transfer(ALICE, BOB.address, 5, n) for n in range(3)]
    assert [pool.add(tx) for tx in txs] == [compute_tx_id(tx) for tx in txs]
    refused(pool, transfer(ALICE, BOB.address, 5, 4), "bad-txn-nonce")  # gap: 3 expected
    refused(pool, transfer(ALICE, BOB.address, 6, 1), "bad-txn-nonce")  # nonce 1 is pooled
    refused(pool, transfer(BOB, ALICE.address, 1, 1), "bad-txn-nonce")  # BOB's first is 0
    # Mined, then offered again: its nonce is spent on the chain.
    _, result = chain.mine((txs[0],))
    pool.update_for_tip(result)
    assert pool.ids() == [compute_tx_id(tx) for tx in txs[1:]]
    refused(pool, txs[0], "bad-txn-nonce")


def test_overspend_refused_alone_and_together_with_pooled(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    refused(pool, transfer(ALICE, BOB.address, FUNDS, 0, fee=1), "bad-txn-balance")
    pool.add(transfer(ALICE, BOB.address, FUNDS // 2, 0))
    # Valid alone on the tip, not after the pooled spend.
    refused(pool, transfer(ALICE, BOB.address, FUNDS // 2, 1), "bad-txn-balance")
    pool.add(transfer(ALICE, BOB.address, FUNDS // 2 - 2, 1))  # exactly what is left


def test_bad_signature_refused(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    tx = transfer(ALICE, BOB.address, 5, 0)
    other = transfer(ALICE, BOB.address, 6, 0)
    refused(pool, replace(tx, signature=other.signature), "bad-txn-sig")
    refused(pool, replace(tx, signature=BOB.sign(compute_tx_id(tx))), "bad-txn-sig")
    refused(pool, replace(tx, amount=6), "bad-txn-sig")
    pool.add(tx)


def test_duplicate_refused(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    tx = transfer(ALICE, BOB.address, 5, 0)
    pool.add(tx)
    refused(pool, tx, "txn-already-in-mempool")
    assert len(pool) == 1


@pytest.mark.parametrize("bound", ["max_txs", "max_bytes"])
def test_full_pool_refuses_and_is_unchanged(chain, bound):
    txs = [transfer(ALICE, BOB.address, 5, n) for n in range(3)]
    limits = {"max_txs": 2} if bound == "max_txs" else {"max_bytes": 2 * size_of(txs[0])}
    pool = Mempool(PARAMS, chain.store, NoProofEngine(), **limits)
    pool.add(txs[0])
    pool.add(txs[1])
    refused(pool, txs[2], "mempool-full")
    assert pool.info()["size"] == 2 and pool.info()["bytes"] == 2 * size_of(txs[0])
    # Room again once a block takes one; the refused one then applies (ALICE nonce 2).
    pool.update_for_tip(chain.mine((txs[0],))[1])
    pool.add(txs[2])
    assert pool.ids() == [compute_tx_id(txs[1]), compute_tx_id(txs[2])]


def test_transaction_larger_than_a_block_allows_is_refused(chain):
    tx = transfer(ALICE, BOB.address, 5, 0)
    tight = replace(PARAMS, max_block_bytes=BLOCK_OVERHEAD + size_of(tx) - 1)
    refused(Mempool(tight, chain.store, NoProofEngine()), tx, "bad-txn-oversize")
    fits = replace(PARAMS, max_block_bytes=BLOCK_OVERHEAD + size_of(tx))
    Mempool(fits, chain.store, NoProofEngine()).add(tx)


def test_select_returns_arrival_order_and_makes_a_valid_block(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    txs = [transfer(BOB, ALICE.address, 7, 0), transfer(ALICE, CAROL.address, 3, 0),
           transfer(BOB, DAVE.address, 2, 1), transfer(CAROL, BOB.address, 1, 0),
           transfer(ALICE, BOB.address, 4, 1)]
    for tx in txs:
        pool.add(tx)
    selected = pool.select()
    assert selected == tuple(txs)
    assert pool.select(max_bytes=2 * size_of(txs[0])) == tuple(txs[:2])
    assert pool.select(max_bytes=0) == ()
    block, result = chain.mine(selected)
    assert result.status == "connected" and chain.store.tip_id == bid(block)
    assert chain.state() == chain.builder.states[bid(block)].entries


def test_select_stays_within_the_block_size_limit(chain):
    txs = [transfer(ALICE, BOB.address, 5, n) for n in range(3)]
    limit = BLOCK_OVERHEAD + 2 * size_of(txs[0])
    pool = Mempool(replace(PARAMS, max_block_bytes=limit), chain.store, NoProofEngine())
    for tx in txs:
        pool.add(tx)
    selected = pool.select()
    assert selected == tuple(txs[:2])
    block = chain.builder.extend(chain.store.tip_id, selected)
    assert block_size(block) <= limit


def test_update_for_tip_drops_included_and_conflicting_keeps_the_rest(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    a0, a1, a2 = (transfer(ALICE, BOB.address, 5, n) for n in range(3))
    b0, c0, d0 = (transfer(k, ALICE.address, 1, 0) for k in (BOB, CAROL, DAVE))
    for tx in (a0, a1, b0, c0, d0):
        pool.add(tx)
    b0_other = transfer(BOB, CAROL.address, 9, 0)  # spends BOB's nonce 0 differently
    _, result = chain.mine((a0, c0, b0_other))
    assert result.status == "connected"
    pool.update_for_tip(result)
    assert pool.ids() == [compute_tx_id(a1), compute_tx_id(d0)]
    assert pool.info()["bytes"] == size_of(a1) + size_of(d0)
    pool.add(a2)  # the cached state follows the new tip: ALICE's next is 2
    block, result = chain.mine(pool.select())
    assert result.status == "connected" and block.txs == (a1, d0, a2)


def test_side_branch_block_changes_nothing(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    pool.update_for_tip(chain.mine()[1])
    a0 = transfer(ALICE, BOB.address, 5, 0)
    pool.add(a0)
    _, result = chain.mine((a0,), parent=chain.builder.genesis_id)
    assert result.status == "stored"
    pool.update_for_tip(result)
    assert pool.ids() == [compute_tx_id(a0)]


def test_reorg_returns_disconnected_txs_first_and_drops_conflicts(chain, caplog):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    a1, _ = chain.mine()
    t0, t1, t2 = (transfer(ALICE, BOB.address, 5, n) for n in range(3))
    b0, c0, d0 = (transfer(k, ALICE.address, 1, 0) for k in (BOB, CAROL, DAVE))
    for tx in (t0, t1, b0, d0):
        pool.add(tx)
    a2, result = chain.mine(pool.select())
    pool.update_for_tip(result)
    assert len(pool) == 0
    pool.add(t2)
    pool.add(c0)
    # A rival branch from a1 spends ALICE's nonces 0 and 1 differently and includes d0.
    x0, x1 = (transfer(ALICE, CAROL.address, 8, n) for n in range(2))
    f2, result = chain.mine((x0, x1, d0), parent=bid(a1))
    assert result.status == "stored"
    pool.update_for_tip(result)
    f3, result = chain.mine(parent=bid(f2))
    assert result.status == "connected"
    assert result.disconnected == (bid(a2),) and result.connected == (bid(f2), bid(f3))
    with caplog.at_level(logging.DEBUG, logger="node.mempool"):
        pool.update_for_tip(result)
    # b0 comes back ahead of the pool's own; t0, t1 conflict with x0, x1; d0 is mined.
    assert pool.ids() == [compute_tx_id(tx) for tx in (b0, t2, c0)]
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 2 and all("bad-txn-nonce" in m for m in dropped)
    block, result = chain.mine(pool.select())
    assert result.status == "connected" and block.txs == (b0, t2, c0)
    assert chain.state() == chain.builder.states[bid(block)].entries


def test_pool_follows_a_tip_that_moved_before_update_for_tip(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    a0, b0 = transfer(ALICE, BOB.address, 5, 0), transfer(BOB, ALICE.address, 5, 0)
    pool.add(a0)
    pool.add(b0)
    rival = transfer(ALICE, CAROL.address, FUNDS - 10, 0)  # ALICE's nonce 0, nearly all
    chain.mine((rival,))  # the pool has not been told yet
    with pytest.raises(ConsensusError) as err:  # checked on the new tip, not on a0's pool
        pool.add(transfer(ALICE, BOB.address, 100, 1))
    assert err.value.reason == "bad-txn-balance"
    assert pool.ids() == [compute_tx_id(b0)]  # a0 lost its nonce to the rival
    pool.add(transfer(ALICE, BOB.address, 5, 1))
    _, result = chain.mine(pool.select())
    assert result.status == "connected"


def test_task_transaction_accepted_and_duplicate_task_refused(chain):
    pool = Mempool(PARAMS, chain.store, NoProofEngine())
    task = replace(TASK, publisher=ALICE.address, bounty=5 * COIN)
    publish = sign_tx(TaskTx(pubkey=ALICE.pubkey, task=task, fee=1, nonce=0), ALICE)
    pool.add(publish)
    again = sign_tx(TaskTx(pubkey=ALICE.pubkey, task=task, fee=2, nonce=1), ALICE)
    refused(pool, again, "bad-task-dup")
    not_theirs = sign_tx(TaskTx(pubkey=BOB.pubkey, task=task, fee=1, nonce=0), BOB)
    refused(pool, not_theirs, "bad-task-publisher")
    _, result = chain.mine(pool.select())
    assert result.status == "connected"
    assert chain.store.get_state(SCHEDULE_KEY).queue == (compute_task_id(task),)
    pool.update_for_tip(result)
    assert len(pool) == 0
    refused(pool, again, "bad-task-dup")  # now published on the chain


def test_model_tx_refused_with_the_engines_reason_then_accepted(chain):
    engine = FakeEngine()
    pool = Mempool(PARAMS, chain.store, engine)
    mtx = chain.mtx(ALICE, chain.store.tip_id, 1)
    engine.refuse = ConsensusError("bad-posthash", "h2 above t2_mtx")
    refused(pool, mtx, "bad-posthash")
    engine.refuse = MissingArtifact(Need("model", mtx.proof.model_id))
    with pytest.raises(MissingArtifact):  # not a verdict: the caller fetches and retries
        pool.add(mtx)
    assert len(pool) == 0
    engine.refuse = None
    pool.add(mtx)  # the refusals registered nothing (else: bad-model-dup)
    expected = compute_mtx_target(PARAMS, chain.store.next_context().expected_target)
    assert engine.mtx_targets == [expected] * 3
    same_model = chain.mtx(ALICE, chain.store.tip_id, 1, fee=2)
    refused(pool, same_model, "bad-model-dup")
    block, result = chain.mine(pool.select())
    assert result.status == "connected" and block.txs == (mtx,)


@pytest.mark.parametrize("harder_passes", [True, False])
def test_pooled_mtx_rechecked_when_retarget_makes_it_harder(chain, harder_passes):
    engine = FakeEngine()
    pool = Mempool(PARAMS, chain.store, engine)
    for block in chain.builder.chain(chain.builder.genesis_id, 18, dt=1):  # fast blocks
        chain.store.add_block(block)
    pool.update_for_tip(AddResult("connected", chain.store.tip_id))
    easy = compute_mtx_target(PARAMS, chain.store.tip.header.target)
    mtx = chain.mtx(ALICE, chain.store.tip_id, 1)
    pool.add(mtx)
    _, result = chain.mine(dt=1)  # height 19: the block at 20 retargets
    if not harder_passes:
        engine.min_target = easy
    pool.update_for_tip(result)
    hard = compute_mtx_target(PARAMS, chain.store.next_context().expected_target)
    assert hard < easy
    assert engine.mtx_targets == [easy, hard]
    assert (compute_tx_id(mtx) in pool) is harder_passes
    if harder_passes:  # the target holds from here: no new check
        _, result = chain.mine(dt=1)
        pool.update_for_tip(result)
        assert engine.mtx_targets == [easy, hard] and compute_tx_id(mtx) in pool


@pytest.mark.parametrize("verdict", ["valid", "missing", "invalid"])
def test_disconnected_mtx_readmitted_only_if_its_seal_validates(chain, verdict):
    engine = FakeEngine()
    pool = Mempool(PARAMS, chain.store, engine)
    a1, result = chain.mine()
    pool.update_for_tip(result)
    mtx = chain.mtx(ALICE, bid(a1), 1)
    pool.add(mtx)
    a2, result = chain.mine(pool.select())
    pool.update_for_tip(result)
    assert len(pool) == 0
    engine.refuse = {"valid": None, "missing": MissingArtifact(Need("model", mtx.proof.model_id)),
                     "invalid": ConsensusError("bad-posthash")}[verdict]
    f2, _ = chain.mine(parent=bid(a1))
    _, result = chain.mine(parent=bid(f2))
    assert result.disconnected == (bid(a2),)
    checks = len(engine.mtx_targets)
    pool.update_for_tip(result)
    assert len(engine.mtx_targets) == checks + 1
    assert pool.ids() == ([compute_tx_id(mtx)] if verdict == "valid" else [])
