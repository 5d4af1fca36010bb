"""Block weight and chain selection (PROTOCOL.md §9).

A node follows the valid chain of greatest total weight and keeps the tip it saw first
when weights are equal, so two nodes that saw blocks in a different order do not flap.
"""

from dataclasses import dataclass

from consensus.errors import ConsensusError
from consensus.params import ChainParams
from consensus.tasks import Task

# Accuracy-weighted rule: a block at t_min weighs WEIGHT_AT_MIN, at t_acc WEIGHT_FULL,
# and up to WEIGHT_BONUS more at 100% validation accuracy, linearly in between.
WEIGHT_FULL = 1_000_000
WEIGHT_AT_MIN = 100_000
WEIGHT_BONUS = 250_000


def compute_block_weight(params: ChainParams, task: Task, n_correct: int) -> int:
    """The weight one block adds to its chain; raises `bad-accuracy` below the rule's floor.

    Longest-chain: 1 per block, and only n_correct >= t_acc makes a block.
    Accuracy-weighted: n_correct >= t_min makes a block, and more useful models make
    heavier chains. Integer arithmetic only.
    """
    val_size = task.dataset.val_size
    floor = task.t_acc if params.fork_rule == "longest" else task.t_min
    if not floor <= n_correct <= val_size:
        raise ConsensusError("bad-accuracy", f"{n_correct} correct, need {floor}..{val_size}")
    if params.fork_rule == "longest":
        return 1
    if n_correct < task.t_acc:
        return WEIGHT_AT_MIN + (WEIGHT_FULL - WEIGHT_AT_MIN) * (n_correct - task.t_min) // (
            task.t_acc - task.t_min)
    if val_size == task.t_acc:
        return WEIGHT_FULL + WEIGHT_BONUS
    return WEIGHT_FULL + WEIGHT_BONUS * (n_correct - task.t_acc) // (val_size - task.t_acc)


@dataclass(frozen=True, slots=True)
class ChainTip:
    """A candidate tip: its chain's total weight and when this node first saw it."""

    weight: int
    seen: int  # a local arrival counter: smaller is earlier


def check_better_tip(candidate: ChainTip, current: ChainTip) -> bool:
    """True when `candidate` should replace `current`: strictly heavier, or equal weight
    and seen earlier (first-seen wins ties)."""
    if candidate.weight != current.weight:
        return candidate.weight > current.weight
    return candidate.seen < current.seen


def select_best_tip(tips: list[ChainTip]) -> ChainTip:
    """The heaviest tip, the first seen among equals."""
    return min(tips, key=lambda t: (-t.weight, t.seen))
