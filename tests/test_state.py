"""The state transition: rewards, transactions, tasks, models and the proof restrictions
(PROTOCOL.md §7, §10), over an in-memory state built from DEV's genesis."""

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest

from consensus.blocks import (
    BLOCK_VERSION,
    Block,
    BlockHeader,
    compute_block_id,
    compute_tx_root,
    sign_header,
)
from consensus.encoding import Address, Hash
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey
from consensus.params import COIN, DEV, ChainParams, genesis_block
from consensus.proofs import Proof
from consensus.state import (
    MAX_TASK_QUEUE,
    SCHEDULE_KEY,
    U64_MAX,
    Account,
    BlockRecord,
    MemoryState,
    ModelRecord,
    Schedule,
    Span,
    StateDiff,
    StateKey,
    StateOverlay,
    apply_block,
    apply_transaction,
    compute_genesis_state,
    compute_schedule,
    span_key,
)
from consensus.tasks import Task, compute_task_id
from consensus.transactions import ModelTx, TaskTx, Transaction, Transfer, sign_tx

KEY = PrivateKey(seed=bytes(range(32)))  # funded at genesis
MINER = PrivateKey(seed=b"\x07" * 32)
OTHER = PrivateKey(seed=b"\x09" * 32)
FUNDS = 1_000 * COIN
PARAMS = replace(DEV, allocations=((KEY.address, FUNDS),))
GENESIS_TASK = PARAMS.genesis_task
GENESIS_TASK_ID = compute_task_id(GENESIS_TASK)
SUBSIDY = PARAMS.subsidy
K, S_MIN, S_MAX, L_REF = GENESIS_TASK.k, GENESIS_TASK.s_min, GENESIS_TASK.s_max, GENESIS_TASK.l_ref
STEPS = -(-S_MIN // K) * K  # the fewest own steps that reach s_min alone

_model_counter = itertools.count(1)


def fresh_model_id() -> Hash:
    return Hash(hashlib.sha256(b"model-%d" % next(_model_counter)).digest())


def make_proof(task: Task, miner: PrivateKey = MINER, **fields: Any) -> Proof:
    """A proof for `task` that meets its step and accuracy rules, with a fresh model id;
    `fields` override any of it."""
    proof = Proof(task_id=compute_task_id(task), ref_model=b"", miner=miner.pubkey, nonce=0,
                  steps=-(-task.s_min // task.k) * task.k, n_correct=task.t_acc,
                  model_id=fresh_model_id(), ckpt_root=bytes(32))
    return replace(proof, **fields)


def make_block(params: ChainParams, prev_id: Hash, height: int, proof: Proof,
               txs: Iterable[Transaction] = (), miner: PrivateKey = MINER) -> Block:
    txs = tuple(txs)
    header = BlockHeader(version=BLOCK_VERSION, height=height, prev_id=prev_id,
                         timestamp=params.genesis_time + params.target_block_time * height,
                         target=params.t2_genesis, tx_root=compute_tx_root(txs), proof=proof)
    return Block(sign_header(header, miner), txs)


class Chain:
    """One chain in memory: its state after the tip, and the next block's makings."""

    def __init__(self, params: ChainParams = PARAMS) -> None:
        self.params = params
        self.state = MemoryState().applied(compute_genesis_state(params))
        self.tip = compute_block_id(genesis_block(params).header)
        self.height = 0

    def active(self) -> tuple[Task, Hash]:
        """The task the next block must work on."""
        schedule, task = compute_schedule(self.params, self.state, self.height + 1)
        return task, schedule.active

    def proof(self, miner: PrivateKey = MINER, **fields: Any) -> Proof:
        task, task_id = self.active()
        return make_proof(task, miner, **{"task_id": task_id, **fields})

    def block(self, txs: Iterable[Transaction] = (), miner: PrivateKey = MINER,
              **proof_fields: Any) -> Block:
        return make_block(self.params, self.tip, self.height + 1,
                          self.proof(miner, **proof_fields), txs, miner)

    def connect(self, block: Block) -> StateDiff:
        diff = apply_block(self.params, self.state, block)
        self.state = self.state.applied(diff)
        self.tip, self.height = compute_block_id(block.header), block.header.height
        return diff

    def mine(self, txs: Iterable[Transaction] = (), **kw: Any) -> Block:
        block = self.block(txs, **kw)
        self.connect(block)
        return block

    def mine_empty(self, n: int) -> None:
        for _ in range(n):
            self.mine()

    def reject(self, block: Block, reason: str) -> None:
        before = dict(self.state.entries)
        with pytest.raises(ConsensusError) as exc:
            apply_block(self.params, self.state, block)
        assert exc.value.reason == reason, exc.value
        assert self.state.entries == before

    def account(self, who: PrivateKey | Address) -> Account:
        address = who.address if isinstance(who, PrivateKey) else who
        return self.state.get(("account", address)) or Account()

    def total_balance(self) -> int:
        return sum(v.balance for (kind, _), v in self.state.entries.items() if kind == "account")

    def mtx(self, key: PrivateKey = KEY, fee: int = 0, prev_id: Hash | None = None,
            **proof_fields: Any) -> ModelTx:
        tx = ModelTx(prev_id=self.tip if prev_id is None else prev_id,
                     proof=self.proof(key, **proof_fields), fee=fee)
        return sign_tx(tx, key)


def transfer(key: PrivateKey = KEY, to: Address | None = None, amount: int = 1, fee: int = 0,
             nonce: int = 0) -> Transfer:
    tx = Transfer(pubkey=key.pubkey, to=OTHER.address if to is None else to, amount=amount,
                  fee=fee, nonce=nonce)
    return sign_tx(tx, key)


def new_task(publisher: PrivateKey = KEY, **fields: Any) -> Task:
    fields.setdefault("bounty", 10 * COIN)
    return replace(GENESIS_TASK, publisher=publisher.address, **fields)


def publish(task: Task, key: PrivateKey = KEY, fee: int = 0, nonce: int = 0) -> TaskTx:
    return sign_tx(TaskTx(pubkey=key.pubkey, task=task, fee=fee, nonce=nonce), key)


# ---------------------------------------------------------------------------------------
# Genesis and rewards
# ---------------------------------------------------------------------------------------


def test_genesis_state() -> None:
    chain = Chain()
    assert chain.state.entries == {
        ("account", KEY.address): Account(FUNDS, 0),
        ("task", GENESIS_TASK_ID): GENESIS_TASK,
        SCHEDULE_KEY: Schedule(GENESIS_TASK_ID, 1, GENESIS_TASK.duration),
        span_key(1): Span(GENESIS_TASK_ID, GENESIS_TASK.duration),
        ("block", compute_block_id(genesis_block(PARAMS).header)): BlockRecord(0),
    }


def test_subsidy_to_miner_and_block_and_model_registered() -> None:
    chain = Chain()
    block = chain.mine()
    assert chain.account(MINER) == Account(SUBSIDY, 0)
    assert chain.state.get(("block", compute_block_id(block.header))) == BlockRecord(1)
    assert chain.state.get(("model", block.header.proof.model_id)) == ModelRecord(
        1, GENESIS_TASK_ID, STEPS)
    chain.mine()
    assert chain.account(MINER) == Account(2 * SUBSIDY, 0)
    assert chain.total_balance() == FUNDS + 2 * SUBSIDY


def test_fees_of_every_kind_go_to_the_miner() -> None:
    chain = Chain()
    txs = [transfer(fee=11, nonce=0), publish(new_task(), fee=13, nonce=1), chain.mtx(fee=17)]
    chain.mine(txs)
    assert chain.account(MINER) == Account(SUBSIDY + 11 + 13 + 17, 0)
    assert chain.total_balance() == FUNDS + SUBSIDY - 10 * COIN  # the bounty is escrowed


def test_apply_transaction_returns_fee_and_writes_overlay() -> None:
    chain = Chain()
    overlay = StateOverlay(chain.state)
    schedule = chain.state.get(SCHEDULE_KEY)
    assert apply_transaction(PARAMS, overlay, schedule, 1, transfer(amount=5, fee=3)) == 3
    assert overlay.get(("account", KEY.address)) == Account(FUNDS - 8, 1)
    assert overlay.get(("account", OTHER.address)) == Account(5, 0)
    assert {key for key, _, _ in overlay.diff().changes} == {
        ("account", KEY.address), ("account", OTHER.address)}
    assert chain.state.get(("account", OTHER.address)) is None


# ---------------------------------------------------------------------------------------
# Transfers
# ---------------------------------------------------------------------------------------


def test_transfer_moves_balance_and_bumps_nonce() -> None:
    chain = Chain()
    chain.mine([transfer(amount=3 * COIN, fee=1_000, nonce=0)])
    assert chain.account(KEY) == Account(FUNDS - 3 * COIN - 1_000, 1)
    assert chain.account(OTHER) == Account(3 * COIN, 0)
    chain.mine([transfer(amount=1, nonce=1), transfer(amount=2, nonce=2)])
    assert chain.account(KEY) == Account(FUNDS - 3 * COIN - 1_000 - 3, 3)
    assert chain.account(OTHER) == Account(3 * COIN + 3, 0)


def test_transfer_to_self() -> None:
    chain = Chain()
    chain.mine([transfer(to=KEY.address, amount=FUNDS - 5, fee=5)])
    assert chain.account(KEY) == Account(FUNDS - 5, 1)


def test_received_funds_spendable_in_the_same_block() -> None:
    chain = Chain()
    chain.mine([transfer(amount=10, fee=1), transfer(OTHER, to=KEY.address, amount=9, fee=1)])
    assert chain.account(OTHER) == Account(0, 1)
    assert chain.account(KEY) == Account(FUNDS - 2, 1)


@pytest.mark.parametrize(("nonces", "reason"), [
    ([0, 1, 2], None),
    ([1], "bad-txn-nonce"),
    ([0, 0], "bad-txn-nonce"),
    ([0, 2], "bad-txn-nonce"),
    ([1, 0], "bad-txn-nonce"),
    ([2**64 - 1], "bad-txn-nonce"),
])
def test_transfer_nonce(nonces: list[int], reason: str | None) -> None:
    chain = Chain()
    block = chain.block([transfer(amount=1 + i, nonce=n) for i, n in enumerate(nonces)])
    if reason is None:
        chain.connect(block)
        assert chain.account(KEY).nonce == len(nonces)
    else:
        chain.reject(block, reason)


def test_nonce_cannot_be_replayed_in_a_later_block() -> None:
    chain = Chain()
    tx = transfer(amount=1)
    chain.mine([tx])
    chain.reject(chain.block([tx]), "bad-txn-nonce")


@pytest.mark.parametrize(("sender", "amount", "fee", "reason"), [
    (KEY, FUNDS - 1, 1, None),
    (KEY, FUNDS, 0, None),
    (KEY, FUNDS, 1, "bad-txn-balance"),
    (KEY, FUNDS + 1, 0, "bad-txn-balance"),
    (KEY, 0, FUNDS + 1, "bad-txn-balance"),
    (KEY, U64_MAX, U64_MAX, "bad-txn-balance"),
    (OTHER, 1, 0, "bad-txn-balance"),
    (OTHER, 0, 0, None),
])
def test_transfer_balance(sender: PrivateKey, amount: int, fee: int, reason: str | None) -> None:
    chain = Chain()
    to = MINER.address if sender == OTHER else OTHER.address
    block = chain.block([transfer(sender, to=to, amount=amount, fee=fee)])
    if reason is None:
        chain.connect(block)
        assert chain.account(sender).balance == (FUNDS if sender == KEY else 0) - amount - fee
    else:
        chain.reject(block, reason)


def test_credit_overflow() -> None:
    chain = Chain(replace(PARAMS, allocations=PARAMS.allocations + ((OTHER.address, U64_MAX),)))
    chain.reject(chain.block([transfer(amount=1)]), "bad-txn-overflow")
    rich_miner = replace(PARAMS, allocations=((MINER.address, U64_MAX - SUBSIDY + 1),))
    chain = Chain(rich_miner)
    chain.reject(chain.block(), "bad-txn-overflow")
    chain = Chain(replace(rich_miner, allocations=((MINER.address, U64_MAX - SUBSIDY),)))
    chain.mine()
    assert chain.account(MINER).balance == U64_MAX


# ---------------------------------------------------------------------------------------
# Task transactions
# ---------------------------------------------------------------------------------------


def test_task_tx_escrows_bounty_and_queues() -> None:
    chain = Chain()
    task = new_task(bounty=10 * COIN)
    chain.mine([publish(task, fee=7)])
    task_id = compute_task_id(task)
    assert chain.account(KEY) == Account(FUNDS - 10 * COIN - 7, 1)
    assert chain.state.get(("task", task_id)) == task
    assert chain.state.get(SCHEDULE_KEY) == Schedule(GENESIS_TASK_ID, 1, GENESIS_TASK.duration,
                                                     (task_id,))
    second = new_task(bounty=COIN)
    chain.mine([publish(second, nonce=1)])
    assert chain.state.get(SCHEDULE_KEY).queue == (task_id, compute_task_id(second))


def test_task_dup_in_same_block() -> None:
    chain = Chain()
    task = new_task()
    chain.reject(chain.block([publish(task, nonce=0), publish(task, nonce=1)]), "bad-task-dup")


def test_task_dup_in_later_block() -> None:
    chain = Chain()
    task = new_task()
    chain.mine([publish(task, nonce=0)])
    chain.reject(chain.block([publish(task, nonce=1)]), "bad-task-dup")


def test_genesis_task_cannot_be_republished() -> None:
    params = replace(PARAMS, genesis_task=replace(GENESIS_TASK, publisher=KEY.address))
    chain = Chain(params)
    chain.reject(chain.block([publish(params.genesis_task)]), "bad-task-dup")


def test_task_publisher_mismatch() -> None:
    chain = Chain()
    chain.reject(chain.block([publish(new_task(publisher=OTHER), key=KEY)]), "bad-task-publisher")


@pytest.mark.parametrize(("dataset", "reason"), [
    ({"name": b"cifar10"}, "bad-task-dataset"),  # a reader exists, but no agreed hashes
    ({"name": b"nosuch"}, "bad-task-dataset"),
    ({"test_hash": Hash(bytes(32))}, "bad-task-dataset-hash"),
    ({"val_size": 200, "train_size": 1347}, "bad-task-dataset-hash"),  # another split
], ids=["cifar10", "unknown", "test-hash", "split-sizes"])
def test_task_on_a_dataset_nobody_agreed_is_refused(dataset: dict, reason: str) -> None:
    chain = Chain()
    task = new_task(dataset=replace(GENESIS_TASK.dataset, **dataset))
    chain.reject(chain.block([publish(task)]), reason)


@pytest.mark.parametrize("fields", [
    {"t_min": 0},
    {"t_min": GENESIS_TASK.t_acc + 1},
    {"t_acc": GENESIS_TASK.dataset.val_size + 1},
    {"k": 0},
    {"k": 30},  # does not divide s_max = 400
    {"duration": 0},
    {"wm_ppm": 1_000_000},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_task_bad_params(fields: dict[str, int]) -> None:
    chain = Chain()
    chain.reject(chain.block([publish(new_task(**fields))]), "bad-task-params")


def test_task_bounty_needs_balance() -> None:
    chain = Chain()
    chain.reject(chain.block([publish(new_task(bounty=FUNDS + 1))]), "bad-txn-balance")
    chain.reject(chain.block([publish(new_task(bounty=FUNDS - 1), fee=2)]), "bad-txn-balance")
    chain.mine([publish(new_task(bounty=FUNDS - 1), fee=1)])
    assert chain.account(KEY) == Account(0, 1)


def test_task_queue_full() -> None:
    chain = Chain()
    tasks = [new_task(bounty=i) for i in range(MAX_TASK_QUEUE + 1)]
    txs = [publish(task, nonce=i) for i, task in enumerate(tasks)]
    chain.reject(chain.block(txs), "bad-task-queue-full")
    chain.mine(txs[:-1])
    assert len(chain.state.get(SCHEDULE_KEY).queue) == MAX_TASK_QUEUE


def test_task_tx_shares_the_account_nonce() -> None:
    chain = Chain()
    chain.mine([transfer(nonce=0), publish(new_task(), nonce=1), transfer(nonce=2)])
    assert chain.account(KEY).nonce == 3
    chain.reject(chain.block([publish(new_task(bounty=1), nonce=0)]), "bad-txn-nonce")


# ---------------------------------------------------------------------------------------
# Model transactions
# ---------------------------------------------------------------------------------------


def test_mtx_registers_model() -> None:
    chain = Chain()
    chain.mine()
    tx = chain.mtx(fee=5)
    chain.mine([tx])
    assert chain.state.get(("model", tx.proof.model_id)) == ModelRecord(2, GENESIS_TASK_ID, STEPS)
    assert chain.account(KEY) == Account(FUNDS - 5, 0)  # an mtx uses no nonce
    assert chain.account(MINER).balance == 2 * SUBSIDY + 5


def test_mtx_dup_in_same_block() -> None:
    chain = Chain()
    tx = chain.mtx()
    chain.reject(chain.block([tx, chain.mtx(model_id=tx.proof.model_id)]), "bad-model-dup")


def test_mtx_dup_of_the_including_block() -> None:
    chain = Chain()
    block = chain.block()
    tx = chain.mtx(model_id=block.header.proof.model_id)
    chain.reject(chain.block([tx], model_id=block.header.proof.model_id), "bad-model-dup")


def test_model_dup_across_blocks() -> None:
    chain = Chain()
    earlier = chain.mine()
    model_id = earlier.header.proof.model_id
    chain.reject(chain.block([chain.mtx(model_id=model_id)]), "bad-model-dup")
    chain.reject(chain.block(model_id=model_id), "bad-model-dup")
    tx = chain.mtx()
    chain.mine([tx])
    chain.reject(chain.block(model_id=tx.proof.model_id), "bad-model-dup")
    chain.reject(chain.block([chain.mtx(model_id=tx.proof.model_id)]), "bad-model-dup")


def test_mtx_on_unknown_prev() -> None:
    chain = Chain()
    chain.reject(chain.block([chain.mtx(prev_id=Hash(bytes(32)))]), "bad-mtx-prev")


@pytest.mark.parametrize(("extra", "reason"), [(0, None), (1, "bad-mtx-prev")])
def test_mtx_prev_window(extra: int, reason: str | None) -> None:
    chain = Chain()
    genesis_id = chain.tip
    chain.mine_empty(L_REF - 1 + extra)
    block = chain.block([chain.mtx(prev_id=genesis_id)])  # at height l_ref + extra
    if reason is None:
        chain.connect(block)
    else:
        chain.reject(block, reason)


def test_mtx_wrong_task() -> None:
    chain = Chain()
    chain.reject(chain.block([chain.mtx(task_id=compute_task_id(new_task()))]), "bad-mtx-task")


def test_mtx_fee_needs_balance() -> None:
    chain = Chain()
    chain.reject(chain.block([chain.mtx(OTHER, fee=1)]), "bad-txn-balance")
    chain.mine([chain.mtx(OTHER, fee=0)])


def test_mtx_steps_restricted() -> None:
    chain = Chain()
    chain.reject(chain.block([chain.mtx(steps=K)]), "bad-steps-total")
    chain.reject(chain.block([chain.mtx(steps=S_MAX + K)]), "bad-steps")


def test_mtx_reference_chain_accumulates_steps() -> None:
    chain = Chain()
    first = chain.mine()
    tx = chain.mtx(ref_model=first.header.proof.model_id, steps=K)
    chain.mine([tx])
    assert chain.state.get(("model", tx.proof.model_id)).total_steps == STEPS + K
    block = chain.mine(ref_model=tx.proof.model_id, steps=K)
    assert chain.state.get(("model", block.header.proof.model_id)).total_steps == STEPS + 2 * K


# ---------------------------------------------------------------------------------------
# The proof's restrictions on a block
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "reason"), [
    (0, "bad-steps"),
    (K // 2, "bad-steps"),
    (S_MIN + K // 2, "bad-steps"),
    (S_MAX + K, "bad-steps"),
    (2**32 - 1, "bad-steps"),
    (S_MIN - K, "bad-steps-total"),
    (STEPS, None),
    (S_MAX, None),
])
def test_block_steps(steps: int, reason: str | None) -> None:
    chain = Chain()
    block = chain.block(steps=steps)
    if reason is None:
        chain.connect(block)
        assert chain.state.get(("model", block.header.proof.model_id)).total_steps == steps
    else:
        chain.reject(block, reason)


def test_ref_unknown() -> None:
    chain = Chain()
    chain.reject(chain.block(ref_model=fresh_model_id()), "bad-ref-unknown")


def test_ref_of_another_task() -> None:
    chain = Chain()
    chain.mine()
    model_id = fresh_model_id()
    chain.state.entries[("model", model_id)] = ModelRecord(1, compute_task_id(new_task()), 400)
    chain.reject(chain.block(ref_model=model_id, steps=K), "bad-ref-task")


@pytest.mark.parametrize(("gap", "reason"), [
    (0, None), (L_REF, None), (L_REF + 1, "bad-ref-window"),
])
def test_ref_window(gap: int, reason: str | None) -> None:
    chain = Chain()
    model_id = chain.mine().header.proof.model_id  # registered at height 1
    chain.mine_empty(gap)
    block = chain.block(ref_model=model_id, steps=K)  # its parent is `gap` blocks above
    if reason is None:
        chain.connect(block)
    else:
        chain.reject(block, reason)


def test_ref_to_mtx_in_window() -> None:
    chain = Chain()
    tx = chain.mtx()
    chain.mine([tx])
    chain.mine(ref_model=tx.proof.model_id, steps=K)


def test_ref_lets_fewer_own_steps_reach_s_min() -> None:
    chain = Chain()
    chain.reject(chain.block(steps=K), "bad-steps-total")
    model_id = chain.mine().header.proof.model_id
    chain.mine(ref_model=model_id, steps=K)


@pytest.mark.parametrize("task_id", [
    Hash(hashlib.sha256(b"no such task").digest()), compute_task_id(new_task()),
], ids=["unknown", "not-yet-active"])
def test_wrong_task(task_id: Hash) -> None:
    chain = Chain()
    chain.mine([publish(new_task())])  # queued, not active
    chain.reject(chain.block(task_id=task_id), "bad-task")


# ---------------------------------------------------------------------------------------
# The task schedule and the bounty
# ---------------------------------------------------------------------------------------

SHORT = replace(PARAMS, genesis_task=replace(GENESIS_TASK, duration=3))
SHORT_GENESIS_ID = compute_task_id(SHORT.genesis_task)


@pytest.mark.parametrize(("bounty", "duration"), [(10, 3), (9, 3), (2, 3), (0, 2), (1, 1),
                                                   (U64_MAX, 4)])
def test_bounty_shares_sum_to_bounty(bounty: int, duration: int) -> None:
    params = replace(SHORT, allocations=((KEY.address, U64_MAX),))
    chain = Chain(params)
    task = new_task(bounty=bounty, duration=duration)
    task_id = compute_task_id(task)
    chain.mine([publish(task)])
    chain.mine_empty(2)
    assert chain.active()[1] == task_id
    shares = []
    for height in range(4, 4 + duration):
        miner = PrivateKey(seed=height.to_bytes(32, "big"))
        chain.mine(miner=miner)
        assert chain.state.get(SCHEDULE_KEY) == Schedule(task_id, 4, 3 + duration, ())
        shares.append(chain.account(miner).balance - SUBSIDY)
    assert sum(shares) == bounty
    assert max(shares) - min(shares) <= bounty % duration  # equal shares, the last the rest
    assert chain.active()[1] == SHORT_GENESIS_ID


def test_schedule_advances_through_the_queue() -> None:
    chain = Chain(SHORT)
    first, second = new_task(duration=3, bounty=10), new_task(duration=2, bounty=7)
    first_id, second_id = compute_task_id(first), compute_task_id(second)
    chain.mine([publish(first, nonce=0), publish(second, nonce=1)])
    assert chain.state.get(SCHEDULE_KEY) == Schedule(SHORT_GENESIS_ID, 1, 3, (first_id, second_id))
    chain.mine_empty(2)
    chain.reject(chain.block(task_id=SHORT_GENESIS_ID), "bad-task")  # height 4: its span ended
    chain.mine()
    assert chain.state.get(SCHEDULE_KEY) == Schedule(first_id, 4, 6, (second_id,))
    chain.mine_empty(2)
    chain.reject(chain.block(task_id=first_id), "bad-task")
    chain.mine()
    assert chain.state.get(SCHEDULE_KEY) == Schedule(second_id, 7, 8, ())
    chain.mine()
    chain.mine()  # height 9: the queue is empty, the genesis task comes back
    assert chain.state.get(SCHEDULE_KEY) == Schedule(SHORT_GENESIS_ID, 9, 11, ())
    # every span on record, the genesis task's twice
    spans = {k: v for k, v in chain.state.entries.items() if k[0] == "span"}
    assert spans == {span_key(1): Span(SHORT_GENESIS_ID, 3), span_key(4): Span(first_id, 6),
                     span_key(7): Span(second_id, 8), span_key(9): Span(SHORT_GENESIS_ID, 11)}
    # every coin accounted for: allocations, subsidies, and both bounties paid out
    assert chain.total_balance() == FUNDS + 9 * SUBSIDY


def test_queued_task_active_at_its_first_height_only() -> None:
    chain = Chain(SHORT)
    task = new_task(duration=5)
    chain.mine([publish(task)])
    chain.mine()
    assert chain.active()[1] == SHORT_GENESIS_ID  # height 3 is the genesis task's last
    chain.mine()
    assert chain.active()[1] == compute_task_id(task)


# ---------------------------------------------------------------------------------------
# apply_block reads, never writes; its diff undoes exactly
# ---------------------------------------------------------------------------------------


class ReadOnlyView:
    """A view that offers nothing but `get` over a read-only mapping."""

    def __init__(self, entries: Mapping[StateKey, Any]) -> None:
        self._entries = MappingProxyType(dict(entries))

    def get(self, key: StateKey) -> Any | None:
        return self._entries.get(key)


def _busy_chain() -> tuple[Chain, Block]:
    """A chain of a few blocks, and a next block that touches every kind of entry."""
    chain = Chain(SHORT)
    chain.mine([publish(new_task(duration=2, bounty=5), nonce=0)])
    first = chain.mine([chain.mtx(fee=1)])
    chain.mine()
    # height 4: the queued task starts, so the schedule changes too
    txs = [transfer(amount=5, fee=2, nonce=1), publish(new_task(bounty=3), nonce=2),
           transfer(OTHER, to=MINER.address, amount=1, nonce=0)]
    assert first.header.height == 2
    return chain, chain.block(txs)


def test_apply_block_does_not_mutate_its_view() -> None:
    chain, block = _busy_chain()
    before = dict(chain.state.entries)
    view = ReadOnlyView(chain.state.entries)
    diff = apply_block(SHORT, view, block)
    assert diff.changes
    assert chain.state.entries == before
    assert dict(view._entries) == before
    # the same block applied again gives the same diff: nothing was written anywhere
    assert apply_block(SHORT, view, block) == diff


def test_failed_apply_block_does_not_mutate_its_view() -> None:
    chain, block = _busy_chain()
    chain.reject(chain.block(block.txs + (transfer(nonce=0),)), "bad-txn-nonce")


def test_diff_befores_undo_exactly() -> None:
    chain, block = _busy_chain()
    base = chain.state
    diff = apply_block(SHORT, base, block)
    keys = [key for key, _, _ in diff.changes]
    assert len(keys) == len(set(keys))
    after = base.applied(diff)
    for key, old, new in diff.changes:
        assert base.get(key) == old
        assert after.get(key) == new
        assert old != new
    assert any(old is None for _, old, _ in diff.changes)  # created entries undo to absent
    undo = StateDiff(tuple((key, new, old) for key, old, new in diff.changes))
    assert after.applied(undo).entries == base.entries


def test_chain_unwinds_to_genesis() -> None:
    chain = Chain(SHORT)
    states, diffs = [chain.state], []
    txs_by_height = [
        [publish(new_task(duration=2, bounty=5), nonce=0)],
        [],
        [transfer(amount=7, fee=1, nonce=1)],
        [],
        [transfer(OTHER, to=KEY.address, amount=3, nonce=0)],
    ]
    for txs in txs_by_height:
        diffs.append(chain.connect(chain.block(txs)))
        states.append(chain.state)
    state = chain.state
    for diff, expected in zip(reversed(diffs), reversed(states[:-1]), strict=True):
        state = state.applied(StateDiff(tuple((k, new, old) for k, old, new in diff.changes)))
        assert state.entries == expected.entries
