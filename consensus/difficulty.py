"""Retargeting the PostHash target t2 (PROTOCOL.md §10)."""

from consensus.params import MAX_TARGET, ChainParams


def compute_next_target(params: ChainParams, height: int, parent_target: int,
                        window_start_time: int, parent_time: int) -> int:
    """t2 for the block at `height`.

    Every `retarget_interval` blocks, t2 scales by the time the last interval took over
    the time it should have taken, so that blocks keep coming every
    `target_block_time`. `window_start_time` is the timestamp of the block
    `retarget_interval` below `height`: from it to the parent are `retarget_interval - 1`
    block gaps, and that is what the expected time counts (Bitcoin's off-by-one, which
    made every window a gap too long, is not repeated). The step is clamped to ×¼…×4 of
    the parent's target, exactly, so a burst of odd timestamps cannot swing difficulty
    wildly, and t2 stays within [1, t2_limit]. Between retargets t2 is the parent's.
    """
    if height == 0 or height % params.retarget_interval:
        return parent_target
    expected = (params.retarget_interval - 1) * params.target_block_time
    scaled = parent_target * max(parent_time - window_start_time, 0) // expected
    clamped = min(max(scaled, parent_target // 4), parent_target * 4)
    return max(1, min(clamped, params.t2_limit))


def compute_mtx_target(params: ChainParams, t2: int) -> int:
    """t2_mtx: a model transaction's easier PostHash target."""
    return min(t2 * params.mtx_factor, MAX_TARGET)


def compute_difficulty(t2: int) -> float:
    """Expected PostHash draws per success, for display (never used by consensus)."""
    return (MAX_TARGET + 1) / (t2 + 1)
