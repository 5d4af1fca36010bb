"""Builds chains for tests and benchmarks under the no-proof seal engine.

Blocks are fully formed (signed headers, retargeted t2, timestamps, transaction roots)
and their state is computed with the real state transition, so a chain store that
imports them must end on exactly the state the builder predicts.
"""

from dataclasses import replace

from consensus.blocks import Block, BlockHeader, compute_block_id, compute_tx_root, sign_header
from consensus.difficulty import compute_next_target
from consensus.encoding import ZERO_HASH, Hash, tagged_hash
from consensus.keys import PrivateKey
from consensus.params import DEV, ChainParams, genesis_block
from consensus.proofs import Proof
from consensus.state import MemoryState, apply_block, compute_genesis_state, compute_schedule
from consensus.transactions import Transaction, Transfer, sign_tx

MINER = PrivateKey(bytes([1]) * 32)


def funded_params(params: ChainParams, *keys: PrivateKey, balance: int = 10**12) -> ChainParams:
    """`params` with each key's account funded at genesis."""
    return replace(params, allocations=tuple((k.address, balance) for k in keys))


class ChainBuilder:
    def __init__(self, params: ChainParams = DEV) -> None:
        self.params = params
        genesis = genesis_block(params)
        self.genesis_id = compute_block_id(genesis.header)
        self.blocks: dict[Hash, Block] = {self.genesis_id: genesis}
        self.states: dict[Hash, MemoryState] = {
            self.genesis_id: MemoryState().applied(compute_genesis_state(params))}
        self._count = 0

    def extend(self, parent_id: Hash, txs: tuple[Transaction, ...] = (), *,
               n_correct: int | None = None, miner: PrivateKey = MINER, dt: int | None = None,
               valid: bool = True) -> Block:
        """A child of `parent_id`. With `valid=False` the state transition is not run, so
        a block that breaks a state rule can be built; its children see the parent's state."""
        parent = self.blocks[parent_id].header
        height = parent.height + 1
        state = self.states[parent_id]
        schedule, task = compute_schedule(self.params, state, height)
        self._count += 1
        steps = -(-task.s_min // task.k) * task.k
        proof = Proof(task_id=schedule.active, ref_model=b"", miner=miner.pubkey,
                      nonce=self._count, steps=steps,
                      n_correct=task.t_acc if n_correct is None else n_correct,
                      model_id=tagged_hash("test-model", self._count), ckpt_root=ZERO_HASH)
        header = BlockHeader(
            version=parent.version, height=height, prev_id=parent_id,
            timestamp=parent.timestamp + (self.params.target_block_time if dt is None else dt),
            target=self._next_target(parent, height), tx_root=compute_tx_root(txs), proof=proof)
        block = Block(sign_header(header, miner), tuple(txs))
        block_id = compute_block_id(block.header)
        self.blocks[block_id] = block
        self.states[block_id] = (state.applied(apply_block(self.params, state, block))
                                 if valid else state)
        return block

    def chain(self, parent_id: Hash, n: int, **kwargs: object) -> list[Block]:
        """`n` blocks in a row on top of `parent_id`."""
        out = []
        for _ in range(n):
            out.append(self.extend(parent_id, **kwargs))  # type: ignore[arg-type]
            parent_id = compute_block_id(out[-1].header)
        return out

    def _next_target(self, parent: BlockHeader, height: int) -> int:
        interval = self.params.retarget_interval
        if height % interval:
            return parent.target
        start = parent
        while start.height > height - interval:
            start = self.blocks[start.prev_id].header
        return compute_next_target(self.params, height, parent.target, start.timestamp,
                                   parent.timestamp)


def transfer(key: PrivateKey, to: bytes, amount: int, nonce: int, fee: int = 1) -> Transfer:
    """A signed transfer."""
    tx = Transfer(pubkey=key.pubkey, to=to, amount=amount, fee=fee, nonce=nonce)
    return sign_tx(tx, key)  # type: ignore[return-value]
