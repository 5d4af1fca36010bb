"""The transaction memory pool: transactions valid on the main chain tip, awaiting a block.

The pool is a sequence in arrival order that is valid as a whole on top of the tip: each
transaction applies (nonce, balance, task and model rules) after the ones before it, in
a block at height tip + 1. A cached overlay holds "tip state + pooled transactions", so
admitting one costs one `apply_transaction` (and, for a model transaction, one seal
check). When the tip moves, `update_for_tip` drops what the new blocks include, puts the
disconnected blocks' transactions back first (Bitcoin Core's order on a reorganisation)
and re-validates everything against the new tip.

Not thread-safe: the node calls it from one thread only, the chain thread on which the
store's tip also moves (node/node.py), so no lock is taken here.

Choices where PROTOCOL.md is silent, made here:
- Arrival order, not fee order (§10 says "orders by fee"): a sender's transactions must
  stay in nonce order, and ordering by fee with such dependencies (Bitcoin Core's
  ancestor scores) is later work. A full pool refuses (`mempool-full`); it evicts nothing.
- A model transaction's seal is checked against t2_mtx of the *next* block, t2 taken from
  `store.next_context()`. That is the tip's t2 except at a retarget height, where the
  tip's would let `select` hand the miner an mtx that fails the block's check. A pooled
  mtx's seal is checked again only when a new tip makes its target harder: meeting a
  target means meeting every easier one.
- `MissingArtifact` from the engine in `add` is not a verdict on the transaction: it
  propagates (the pool unchanged) so the caller can fetch the artifact and retry.
- A transaction already in the main chain is not looked up (there is no transaction
  index); the state refuses it anyway: its nonce is spent (`bad-txn-nonce`), its model
  (`bad-model-dup`) or task (`bad-task-dup`) is registered.
- A transaction must fit in a block beside the largest possible header
  (`bad-txn-oversize`); the decoder's field limits bound every kind far below that, so
  this bites only on a chain with a tiny `max_block_bytes`.
- After a reorganisation, what no longer fits in the pool's bounds is dropped, latest
  arrivals first (they come last in the re-validation order).
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from consensus.blocks import MAX_BLOCK_TXS, Block, BlockHeader, block_size
from consensus.difficulty import compute_mtx_target
from consensus.encoding import Hash, encode
from consensus.errors import ConsensusError
from consensus.params import MAX_TARGET, ChainParams
from consensus.proofs import Proof
from consensus.seal import MissingArtifact, SealEngine
from consensus.state import (
    SCHEDULE_KEY,
    U64_MAX,
    StateOverlay,
    apply_transaction,
    compute_schedule,
)
from consensus.transactions import ModelTx, Transaction, compute_tx_id, validate_tx_signature
from storage.chain import AddResult, ChainStore, TipState

log = logging.getLogger(__name__)

U32_MAX = (1 << 32) - 1


def _largest_header() -> BlockHeader:
    """A header whose every integer takes its longest encoding."""
    full = Hash(b"\xff" * 32)
    proof = Proof(task_id=full, ref_model=full, miner=full, nonce=U64_MAX, steps=U32_MAX,
                  n_correct=U32_MAX, model_id=full, ckpt_root=full)
    return BlockHeader(version=U32_MAX, height=U64_MAX, prev_id=full, timestamp=U64_MAX,
                       target=MAX_TARGET, tx_root=full, proof=proof, signature=bytes(64))


# A block encodes as [header, [tx, ...]]: at most this many bytes besides its transactions'
# own encodings (+4: the transaction array's length prefix grows from 1 byte to at most 5).
BLOCK_OVERHEAD = block_size(Block(_largest_header())) + 4


@dataclass(slots=True)
class _Entry:
    tx: Transaction
    size: int  # encoded bytes, as the transaction takes in a block
    seal_target: int | None = None  # a model transaction's t2_mtx its seal last met


class Mempool:
    """Transactions valid together on the tip, in arrival order, within a count and byte bound."""

    def __init__(self, params: ChainParams, store: ChainStore, engine: SealEngine, *,
                 max_txs: int = 5000, max_bytes: int = 32 << 20) -> None:
        self.params, self.store, self.engine = params, store, engine
        self.max_txs, self.max_bytes = max_txs, max_bytes
        self._txs: dict[Hash, _Entry] = {}
        self._bytes = 0
        self._reset()

    # -- queries ---------------------------------------------------------------------

    def get(self, tx_id: Hash) -> Transaction | None:
        entry = self._txs.get(tx_id)
        return None if entry is None else entry.tx

    def ids(self) -> list[Hash]:
        return list(self._txs)

    def __contains__(self, tx_id: object) -> bool:
        return isinstance(tx_id, bytes) and tx_id in self._txs

    def __len__(self) -> int:
        return len(self._txs)

    def info(self) -> dict:
        return {"size": len(self._txs), "bytes": self._bytes,
                "max_txs": self.max_txs, "max_bytes": self.max_bytes}

    # -- admission -------------------------------------------------------------------

    def add(self, tx: Transaction) -> Hash:
        """Admit `tx` if it is valid after everything pooled; returns its id.

        Raises ConsensusError (a refusal, with a stable reason) or MissingArtifact (a
        model transaction whose artifacts are not here yet); either way nothing changes.
        """
        self._follow_tip()
        tx_id = compute_tx_id(tx)
        if tx_id in self._txs:
            raise ConsensusError("txn-already-in-mempool", tx_id.hex())
        validate_tx_signature(tx)
        size = len(encode(tx, Transaction))
        if size > self.params.max_block_bytes - BLOCK_OVERHEAD:
            raise ConsensusError("bad-txn-oversize", f"{size} bytes do not fit in a block")
        if len(self._txs) >= self.max_txs or self._bytes + size > self.max_bytes:
            raise ConsensusError("mempool-full", f"{len(self._txs)} transactions, "
                                                 f"{self._bytes} bytes pooled")
        entry = _Entry(tx, size)
        self._apply(entry)
        self._txs[tx_id] = entry
        self._bytes += size
        return tx_id

    def _apply(self, entry: _Entry) -> None:
        """Apply `entry` on top of the pool; on any failure the overlay is untouched."""
        scratch = StateOverlay(self._overlay)
        apply_transaction(self.params, scratch, scratch.get(SCHEDULE_KEY), self._height, entry.tx)
        # The state rules run first: they are cheap, and the seal check may replay training.
        if isinstance(entry.tx, ModelTx) and (entry.seal_target is None
                                              or self._mtx_target < entry.seal_target):
            self.engine.validate_mtx_seal(self.params, entry.tx, self._task, self._mtx_target)
            entry.seal_target = self._mtx_target
        for key, _, after in scratch.diff().changes:
            self._overlay.set(key, after)

    def remove(self, tx_id: Hash) -> None:
        """Drop a transaction (a model transaction a fraud proof convicted) and whatever
        no longer applies without it."""
        if tx_id in self._txs:
            self._revalidate([(i, e) for i, e in self._txs.items() if i != tx_id])

    # -- following the chain ---------------------------------------------------------

    def update_for_tip(self, result: AddResult) -> None:
        """Follow a tip move: drop what the connected blocks include, return the
        disconnected blocks' transactions (first, lowest block first), re-validate all."""
        if result.status != "connected":
            return
        mined = {compute_tx_id(tx) for block_id in result.connected
                 for tx in self._block_txs(block_id)}
        returned = [(compute_tx_id(tx), _Entry(tx, len(encode(tx, Transaction))))
                    for block_id in reversed(result.disconnected)
                    for tx in self._block_txs(block_id)]
        candidates = [(i, e) for i, e in returned if i not in mined]
        candidates += [(i, e) for i, e in self._txs.items() if i not in mined]
        self._revalidate(candidates)

    def _block_txs(self, block_id: Hash) -> tuple[Transaction, ...]:
        block = self.store.get_block(block_id)
        if block is None:  # the store keeps every block it connected; say so if not
            log.warning("mempool: block %s is not in storage", block_id.hex())
            return ()
        return block.txs

    def _follow_tip(self) -> None:
        """Re-validate on the store's tip if it moved without `update_for_tip` yet (a call
        queued between a block's connection and the pool's update)."""
        if self.store.tip_id != self._tip_id:
            self._revalidate(list(self._txs.items()))

    def _reset(self) -> None:
        """An empty pool on the store's current tip."""
        self._tip_id = self.store.tip_id
        self._height = self.store.height + 1
        self._overlay = StateOverlay(TipState(self.store))
        schedule, self._task = compute_schedule(self.params, self._overlay, self._height)
        self._overlay.set(SCHEDULE_KEY, schedule)  # as apply_block does before the txs
        self._mtx_target = compute_mtx_target(self.params,
                                              self.store.next_context().expected_target)
        self._txs, self._bytes = {}, 0

    def _revalidate(self, candidates: Iterable[tuple[Hash, _Entry]]) -> None:
        """Rebuild the pool on the current tip from `candidates`, in order, keeping what applies."""
        self._reset()
        for tx_id, entry in candidates:
            if tx_id in self._txs:
                continue
            if len(self._txs) >= self.max_txs or self._bytes + entry.size > self.max_bytes:
                log.debug("mempool: dropped %s: mempool-full", tx_id.hex())
                continue
            try:
                self._apply(entry)
            except ConsensusError as error:
                log.debug("mempool: dropped %s: %s", tx_id.hex(), error)
                continue
            except MissingArtifact as missing:
                log.debug("mempool: dropped %s: %s", tx_id.hex(), missing)
                continue
            self._txs[tx_id] = entry
            self._bytes += entry.size

    # -- block assembly --------------------------------------------------------------

    def select(self, max_bytes: int | None = None) -> tuple[Transaction, ...]:
        """The longest arrival-order prefix that fits a block on the tip.

        `max_bytes` caps the transactions' encoded bytes; the block's own limit (its
        `max_block_bytes` less the header) and MAX_BLOCK_TXS always apply. A prefix of
        a pool valid in order is itself valid in order, so nothing is applied again.
        """
        self._follow_tip()
        budget = self.params.max_block_bytes - BLOCK_OVERHEAD
        if max_bytes is not None:
            budget = min(budget, max_bytes)
        chosen: list[Transaction] = []
        for entry in self._txs.values():
            if len(chosen) == MAX_BLOCK_TXS or entry.size > budget:
                break
            chosen.append(entry.tx)
            budget -= entry.size
        return tuple(chosen)
