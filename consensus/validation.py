"""Context checks of a block before its state transition (PROTOCOL.md §8 steps 1–7).

`validate_block` runs everything that does not need the parent's state: syntax and
size, signatures, height, time, difficulty, the accuracy rule, and the seal engine's
proof checks. State-dependent rules (active task, references, nonces, balances) are
`state.apply_block`'s.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from consensus.blocks import (
    BLOCK_VERSION,
    Block,
    BlockHeader,
    block_size,
    compute_block_id,
    validate_header_signature,
)
from consensus.difficulty import compute_mtx_target
from consensus.encoding import Hash
from consensus.errors import ConsensusError
from consensus.fork_choice import compute_block_weight
from consensus.merkle import compute_root
from consensus.params import ChainParams
from consensus.seal import MissingArtifact, Need, SealEngine
from consensus.tasks import Task
from consensus.transactions import ModelTx, check_tx_signature, compute_tx_id

MapFn = Callable[..., Iterable[Any]]


@dataclass(frozen=True, slots=True)
class HeaderContext:
    """What a header is checked against: its parent and what the chain below implies."""

    parent: BlockHeader
    median_time_past: int
    expected_target: int
    now: int  # the local clock, seconds


def compute_median_time_past(timestamps: Sequence[int]) -> int:
    """The median of the last blocks' timestamps (the upper one of an even count)."""
    ordered = sorted(timestamps)
    return ordered[len(ordered) // 2]


def validate_header(params: ChainParams, header: BlockHeader, ctx: HeaderContext) -> None:
    """Version, parent link, height, timestamp window, target and the miner's signature.

    A timestamp must exceed the median of the last `median_time_span` blocks (so time
    moves forward) and may run at most `max_future_time` ahead of the local clock.
    """
    if header.version != BLOCK_VERSION:
        raise ConsensusError("bad-version", f"version {header.version}")
    if header.prev_id != compute_block_id(ctx.parent):
        raise ConsensusError("bad-prevblk", "header does not extend the given parent")
    if header.height != ctx.parent.height + 1:
        raise ConsensusError("bad-height", f"height {header.height} on parent {ctx.parent.height}")
    if header.timestamp <= ctx.median_time_past:
        raise ConsensusError("time-too-old", f"{header.timestamp} <= median {ctx.median_time_past}")
    if header.timestamp > ctx.now + params.max_future_time:
        raise ConsensusError("time-too-new", f"{header.timestamp} > now {ctx.now} + "
                                             f"{params.max_future_time}")
    if header.target != ctx.expected_target:
        raise ConsensusError("bad-diffbits", "t2 does not follow the retarget rule")
    validate_header_signature(header)


def validate_block_body(params: ChainParams, block: Block, map_fn: MapFn = map) -> None:
    """Size, the transaction Merkle root, no duplicate transactions, every signature.

    Signature checks are independent and dominate the cost of a full block, so the
    caller may pass a parallel `map_fn` (Ed25519 verification releases the GIL).
    """
    if block_size(block) > params.max_block_bytes:
        raise ConsensusError("bad-blk-length", f"over {params.max_block_bytes} bytes")
    tx_ids = [compute_tx_id(tx) for tx in block.txs]
    if compute_root(tx_ids) != block.header.tx_root:
        raise ConsensusError("bad-txnmrklroot", "transactions do not match the header")
    if len(set(tx_ids)) != len(tx_ids):
        raise ConsensusError("bad-txns-duplicate", "a transaction appears twice")
    checks = map_fn(check_tx_signature, block.txs, tx_ids)
    for tx_id, ok in zip(tx_ids, checks, strict=True):
        if not ok:
            raise ConsensusError("bad-txn-sig", tx_id.hex())


def validate_block(params: ChainParams, engine: SealEngine, block: Block, ctx: HeaderContext,
                   task_of: Callable[[Hash], Task | None], map_fn: MapFn = map) -> int:
    """Every check that needs no state; returns the block's weight.

    `task_of` finds a task by id (tasks are content-addressed, so any copy will do);
    whether it is the *active* task is checked with the state.
    """
    header = block.header
    validate_header(params, header, ctx)
    validate_block_body(params, block, map_fn)
    task = task_of(header.proof.task_id)
    if task is None:
        raise ConsensusError("bad-task", f"unknown task {header.proof.task_id.hex()}")
    weight = compute_block_weight(params, task, header.proof.n_correct)
    mtx_target = compute_mtx_target(params, header.target)
    mtxs = [tx for tx in block.txs if isinstance(tx, ModelTx)]
    for tx in mtxs:
        if tx.proof.task_id != header.proof.task_id:
            raise ConsensusError("bad-mtx-task", "a model transaction serves the active task")
    # Every proof is checked before missing artifacts are reported, all in one
    # MissingArtifact: a caller fetching from peers then needs two rounds per block,
    # not two per proof (the engine remembers the proofs that passed).
    missing: list[Need] = []
    for check in [lambda: engine.validate_block_seal(params, header, task),
                  *(lambda tx=tx: engine.validate_mtx_seal(params, tx, task, mtx_target)
                    for tx in mtxs)]:
        try:
            check()
        except MissingArtifact as e:
            missing += [need for need in e.needs if need not in missing]
    if missing:
        raise MissingArtifact(*missing)
    return weight
