"""The account state and its transition function (PROTOCOL.md §7, §10).

State is a set of typed entries under `(kind, key)`: accounts, the models a chain has
registered (for the reference restriction), the heights of its blocks (for a model
transaction's tip), the tasks it has published, the task schedule and the spans it has
run (which task was active from which height to which). `apply_block`
reads a `StateView` and returns a `StateDiff` of (key, before, after) triples; it
never writes. Storage applies the diff and keeps the `before` values as undo data,
so a reorganisation is the diffs read backwards.
"""

from dataclasses import dataclass, replace
from typing import Annotated, Any, Protocol

from consensus.blocks import Block, compute_block_id
from consensus.encoding import U64, Address, Hash32, MaxItems
from consensus.errors import ConsensusError
from consensus.keys import compute_address
from consensus.params import ChainParams, genesis_block
from consensus.proofs import Proof
from consensus.tasks import Task, compute_task_id, validate_task
from consensus.transactions import (
    ModelTx,
    TaskTx,
    Transaction,
    Transfer,
    signer_address,
)

MAX_TASK_QUEUE = 64
U64_MAX = (1 << 64) - 1

StateKey = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class Account:
    balance: U64 = 0
    nonce: U64 = 0


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A model on this chain: where it was registered and its training history's length."""

    height: U64
    task_id: Hash32
    total_steps: U64  # own steps plus the reference chain's


@dataclass(frozen=True, slots=True)
class BlockRecord:
    height: U64


@dataclass(frozen=True, slots=True)
class Schedule:
    """The active task, the heights it spans, and the published tasks queued after it."""

    active: Hash32
    start: U64
    end: U64
    queue: Annotated[tuple[Hash32, ...], MaxItems(MAX_TASK_QUEUE)] = ()


@dataclass(frozen=True, slots=True)
class Span:
    """One stretch of the schedule, under `("span", start height)`: the task active from
    that height to `end`. The genesis task repeats, so a task may have several."""

    task_id: Hash32
    end: U64


STATE_TYPES: dict[str, type] = {  # a kind's code in storage is its place here: append only
    "account": Account,
    "model": ModelRecord,
    "block": BlockRecord,
    "task": Task,
    "schedule": Schedule,
    "span": Span,
}
SCHEDULE_KEY: StateKey = ("schedule", b"")


def span_key(start: int) -> StateKey:
    """Big-endian, so that spans list in height order."""
    return ("span", start.to_bytes(8, "big"))


class StateView(Protocol):
    def get(self, key: StateKey) -> Any | None: ...


@dataclass(frozen=True, slots=True)
class StateDiff:
    """What a block changed: (key, before, after); None means absent."""

    changes: tuple[tuple[StateKey, Any, Any], ...]


class StateOverlay:
    """Pending writes over a read-only view; `diff()` reports them against the view."""

    def __init__(self, base: StateView) -> None:
        self._base = base
        self._before: dict[StateKey, Any] = {}
        self._after: dict[StateKey, Any] = {}

    def get(self, key: StateKey) -> Any | None:
        if key in self._after:
            return self._after[key]
        return self._base.get(key)

    def set(self, key: StateKey, value: Any) -> None:
        if key not in self._before:
            self._before[key] = self._base.get(key)
        self._after[key] = value

    def account(self, address: Address) -> Account:
        return self.get(("account", address)) or Account()

    def diff(self) -> StateDiff:
        return StateDiff(tuple((k, self._before[k], v) for k, v in self._after.items()
                               if self._before[k] != v))


class MemoryState:
    """A whole state in a dict: genesis construction and tests."""

    def __init__(self, entries: dict[StateKey, Any] | None = None) -> None:
        self.entries = dict(entries or {})

    def get(self, key: StateKey) -> Any | None:
        return self.entries.get(key)

    def applied(self, diff: StateDiff) -> "MemoryState":
        entries = dict(self.entries)
        for key, _, after in diff.changes:
            if after is None:
                entries.pop(key, None)
            else:
                entries[key] = after
        return MemoryState(entries)


def compute_genesis_state(params: ChainParams) -> StateDiff:
    """The state genesis creates: allocations, the genesis task and its schedule."""
    overlay = StateOverlay(MemoryState())
    for address, balance in params.allocations:
        overlay.set(("account", address), Account(balance, 0))
    task_id = compute_task_id(params.genesis_task)
    overlay.set(("task", task_id), params.genesis_task)
    overlay.set(SCHEDULE_KEY, Schedule(task_id, 1, params.genesis_task.duration))
    overlay.set(span_key(1), Span(task_id, params.genesis_task.duration))
    overlay.set(("block", compute_block_id(genesis_block(params).header)), BlockRecord(0))
    return overlay.diff()


def compute_schedule(params: ChainParams, view: StateView, height: int) -> tuple[Schedule, Task]:
    """The schedule and active task at `height`: when a task's span ends, the next queued
    task starts (the genesis task when none is queued)."""
    schedule: Schedule = view.get(SCHEDULE_KEY)
    if height <= schedule.end:
        return schedule, view.get(("task", schedule.active))
    if schedule.queue:
        next_id, queue = schedule.queue[0], schedule.queue[1:]
    else:
        next_id, queue = compute_task_id(params.genesis_task), ()
    task: Task = view.get(("task", next_id))
    return Schedule(next_id, height, height + task.duration - 1, queue), task


def validate_proof_rules(view: StateView, task: Task, prev_height: int, proof: Proof) -> int:
    """The step and reference restrictions (PROTOCOL.md §7); returns the total steps.

    Own steps are a positive multiple of k and at most s_max; a reference must be a
    model of this chain and task registered within l_ref blocks of the tip mined on;
    own plus referenced steps must reach s_min, so old work cannot mint blocks faster
    than the block rate allows.
    """
    if proof.steps % task.k or not task.k <= proof.steps <= task.s_max:
        raise ConsensusError("bad-steps", f"{proof.steps} steps, k={task.k}, s_max={task.s_max}")
    total = proof.steps
    if proof.ref_model:
        ref: ModelRecord | None = view.get(("model", proof.ref_model))
        if ref is None:
            raise ConsensusError("bad-ref-unknown", proof.ref_model.hex())
        if ref.task_id != proof.task_id:
            raise ConsensusError("bad-ref-task", proof.ref_model.hex())
        if not 0 <= prev_height - ref.height <= task.l_ref:
            raise ConsensusError("bad-ref-window", f"reference at {ref.height}, tip at "
                                                   f"{prev_height}, l_ref={task.l_ref}")
        total += ref.total_steps
    if total < task.s_min:
        raise ConsensusError("bad-steps-total", f"{total} total steps, s_min={task.s_min}")
    return total


def _register_model(overlay: StateOverlay, proof: Proof, height: int, total: int) -> None:
    if overlay.get(("model", proof.model_id)) is not None:
        raise ConsensusError("bad-model-dup", proof.model_id.hex())
    overlay.set(("model", proof.model_id), ModelRecord(height, proof.task_id, total))


def _debit(overlay: StateOverlay, address: Address, amount: int, nonce: int | None) -> None:
    account = overlay.account(address)
    if nonce is not None and nonce != account.nonce:
        raise ConsensusError("bad-txn-nonce", f"nonce {nonce}, account expects {account.nonce}")
    if amount > account.balance:
        raise ConsensusError("bad-txn-balance", f"needs {amount}, has {account.balance}")
    overlay.set(("account", address),
                Account(account.balance - amount, account.nonce + (nonce is not None)))


def _credit(overlay: StateOverlay, address: Address, amount: int) -> None:
    account = overlay.account(address)
    if account.balance + amount > U64_MAX:
        raise ConsensusError("bad-txn-overflow", address.hex())
    overlay.set(("account", address), Account(account.balance + amount, account.nonce))


def apply_transaction(params: ChainParams, overlay: StateOverlay, schedule: Schedule,
                      height: int, tx: Transaction) -> int:
    """Apply one transaction of a block at `height` to `overlay`; returns its fee.

    Signatures are checked statelessly beforehand (`validate_tx_signature`).
    """
    sender = signer_address(tx)
    if isinstance(tx, Transfer):
        _debit(overlay, sender, tx.amount + tx.fee, tx.nonce)
        _credit(overlay, tx.to, tx.amount)
    elif isinstance(tx, TaskTx):
        validate_task(tx.task)
        if tx.task.publisher != sender:
            raise ConsensusError("bad-task-publisher", "a task is published by its signer")
        task_id = compute_task_id(tx.task)
        if overlay.get(("task", task_id)) is not None:
            raise ConsensusError("bad-task-dup", task_id.hex())
        if len(schedule.queue) >= MAX_TASK_QUEUE:
            raise ConsensusError("bad-task-queue-full", f"{MAX_TASK_QUEUE} tasks queued")
        _debit(overlay, sender, tx.task.bounty + tx.fee, tx.nonce)
        overlay.set(("task", task_id), tx.task)
        overlay.set(SCHEDULE_KEY, replace(schedule, queue=schedule.queue + (task_id,)))
    elif isinstance(tx, ModelTx):
        if tx.proof.task_id != schedule.active:
            raise ConsensusError("bad-mtx-task", "a model transaction serves the active task")
        prev: BlockRecord | None = overlay.get(("block", tx.prev_id))
        task: Task = overlay.get(("task", schedule.active))
        if prev is None or height - prev.height > task.l_ref:
            raise ConsensusError("bad-mtx-prev", "mined on a block not in this chain's window")
        total = validate_proof_rules(overlay, task, prev.height, tx.proof)
        _register_model(overlay, tx.proof, height, total)
        _debit(overlay, sender, tx.fee, None)
    else:  # the decoder admits no other kind
        raise TypeError(type(tx))
    return tx.fee


def compute_bounty_share(task: Task, schedule: Schedule, height: int) -> int:
    """The bounty is paid in equal shares to the task's blocks; the last takes the rest."""
    share = task.bounty // task.duration
    return share + (task.bounty % task.duration if height == schedule.end else 0)


def apply_block(params: ChainParams, view: StateView, block: Block) -> StateDiff:
    """The state change of connecting `block` on top of `view` (its parent's state).

    Enforces the active task, the proof's step and reference restrictions, model
    uniqueness, and every transaction's nonce and balance; credits the miner with the
    subsidy, the fees and the task's bounty share. Raises ConsensusError.
    """
    header = block.header
    height, proof = header.height, header.proof
    overlay = StateOverlay(view)
    schedule, task = compute_schedule(params, overlay, height)
    if proof.task_id != schedule.active:
        raise ConsensusError("bad-task", f"block works on {proof.task_id.hex()}, "
                                         f"active is {schedule.active.hex()}")
    overlay.set(SCHEDULE_KEY, schedule)
    if schedule.start == height:  # a span begins
        overlay.set(span_key(height), Span(schedule.active, schedule.end))
    total = validate_proof_rules(overlay, task, height - 1, proof)
    _register_model(overlay, proof, height, total)
    overlay.set(("block", compute_block_id(header)), BlockRecord(height))
    fees = 0
    for tx in block.txs:
        fees += apply_transaction(params, overlay, overlay.get(SCHEDULE_KEY), height, tx)
    reward = params.subsidy + fees + compute_bounty_share(task, schedule, height)
    _credit(overlay, compute_address(proof.miner), reward)
    return overlay.diff()
