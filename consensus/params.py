"""Chain parameters and genesis blocks for the `dev` and `testnet` chains.

Chain rules are data here, not node configuration: two nodes with different
parameters are on different chains, and the genesis id tells them apart.
"""

from dataclasses import dataclass, replace
from typing import Literal

from consensus.blocks import BLOCK_VERSION, Block, BlockHeader
from consensus.encoding import ZERO_HASH, Address
from consensus.merkle import EMPTY_ROOT
from consensus.proofs import Proof
from consensus.tasks import (
    DIGITS,
    FAMILY_MLP,
    MNIST,
    ArchSpace,
    Dataset,
    HppSpace,
    Task,
    compute_task_id,
)

COIN = 100_000_000
MAX_TARGET = (1 << 256) - 1

ForkRule = Literal["longest", "accuracy"]


@dataclass(frozen=True, slots=True)
class ChainParams:
    name: str
    magic: bytes  # 4 bytes opening every P2P frame
    fork_rule: ForkRule
    t1: int  # PreHash target, fixed (PROTOCOL.md §3)
    t2_genesis: int  # PostHash target of the first retarget window
    t2_limit: int  # the easiest t2 a retarget may reach
    mtx_factor: int  # t2_mtx = t2 * mtx_factor (PROTOCOL.md §6)
    target_block_time: int  # seconds
    retarget_interval: int  # blocks
    median_time_span: int  # blocks in the median-time-past rule
    max_future_time: int  # seconds a timestamp may run ahead of the local clock
    max_block_bytes: int
    subsidy: int
    genesis_time: int
    genesis_task: Task
    allocations: tuple[tuple[Address, int], ...] = ()
    p2p_port: int = 0
    rpc_port: int = 0


def _task(dataset: Dataset, **fields: object) -> Task:
    return Task(dataset=dataset, publisher=Address(bytes(20)), bounty=0, **fields)  # type: ignore[arg-type]


# The dev chain: digits, 5 s blocks; its genesis task's spans last 20 blocks, so that a
# published task starts, and its result is in, within minutes.
DEV = ChainParams(
    name="dev",
    magic=b"dpd\x00",
    fork_rule="longest",
    t1=(1 << 240) - 1,  # about 2^16 PreHash tries
    t2_genesis=MAX_TARGET >> 3,
    t2_limit=MAX_TARGET,
    mtx_factor=16,
    target_block_time=5,
    retarget_interval=20,
    median_time_span=11,
    max_future_time=30,
    max_block_bytes=32 << 20,
    subsidy=50 * COIN,
    genesis_time=1_790_000_000,
    genesis_task=_task(
        DIGITS,
        arch=ArchSpace(FAMILY_MLP, depth_min=1, depth_max=2, width_min=32, width_max=64),
        hpp=HppSpace(lr_min_ppm=50_000, lr_max_ppm=200_000, momentum_min_ppm=800_000,
                     momentum_max_ppm=950_000, batch_sizes=(32, 64)),
        t_acc=225, t_min=200, wm_ppm=10_000, k=20, s_min=40, s_max=400, l_ref=10,
        delta_ppm=1_000, eps_correct=2, duration=20,
    ),
    p2p_port=18444,
    rpc_port=18443,
)

TESTNET = ChainParams(
    name="testnet",
    magic=b"dpt\x00",
    fork_rule="accuracy",
    t1=(1 << 240) - 1,
    t2_genesis=MAX_TARGET >> 4,
    t2_limit=MAX_TARGET,
    mtx_factor=16,
    target_block_time=60,
    retarget_interval=60,
    median_time_span=11,
    max_future_time=2 * 60 * 60,
    max_block_bytes=32 << 20,
    subsidy=50 * COIN,
    genesis_time=1_790_000_000,
    genesis_task=_task(
        MNIST,
        arch=ArchSpace(FAMILY_MLP, depth_min=1, depth_max=2, width_min=64, width_max=256),
        hpp=HppSpace(lr_min_ppm=20_000, lr_max_ppm=100_000, momentum_min_ppm=850_000,
                     momentum_max_ppm=950_000, batch_sizes=(64, 128)),
        t_acc=4_750, t_min=4_500, wm_ppm=10_000, k=50, s_min=500, s_max=5_000, l_ref=10,
        delta_ppm=1_000, eps_correct=5, duration=1_000,
    ),
    p2p_port=19444,
    rpc_port=19443,
)

# The dev chain under the accuracy-weighted fork-choice rule (§9): digits, 5 s blocks, a
# genesis of its own (one second later) so that its nodes never take a dev node for a peer.
DEV_ACCURACY = replace(DEV, name="dev-accuracy", magic=b"dpa\x00", fork_rule="accuracy",
                       genesis_time=DEV.genesis_time + 1, p2p_port=18544, rpc_port=18543)

NETWORKS = {p.name: p for p in (DEV, DEV_ACCURACY, TESTNET)}


def genesis_block(params: ChainParams) -> Block:
    """The chain's first block: no miner, no transactions, the genesis task."""
    proof = Proof(task_id=compute_task_id(params.genesis_task), ref_model=b"",
                  miner=bytes(32), nonce=0, steps=0, n_correct=0,
                  model_id=ZERO_HASH, ckpt_root=ZERO_HASH)
    header = BlockHeader(version=BLOCK_VERSION, height=0, prev_id=ZERO_HASH,
                         timestamp=params.genesis_time, target=params.t2_genesis,
                         tx_root=EMPTY_ROOT, proof=proof)
    return Block(header)
