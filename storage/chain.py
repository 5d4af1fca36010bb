"""The chain on disk: storing blocks, choosing the best chain, connecting it atomically.

Like Bitcoin Core's ActivateBestChain: a block is stored once its context checks and
proof pass (wherever it lands in the tree), then the node moves to the heaviest valid
chain. Moving the tip, whether by one block or by a reorganisation, is one synced
LevelDB batch holding the state changes, the undo data, the height and transaction
indexes and the new tip, so a process killed at any moment reopens on a consistent
chain. A block that fails its state transition is marked invalid with its descendants,
and the node falls back to the best chain that remains.

Callers serialise writes (the node runs this in one executor thread); a lock guards
against misuse.
"""

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from consensus.blocks import Block, BlockHeader, block_proofs, compute_block_id
from consensus.difficulty import compute_next_target
from consensus.encoding import Hash, encode
from consensus.errors import ConsensusError
from consensus.fork_choice import ChainTip, check_better_tip, select_best_tip
from consensus.params import ChainParams, genesis_block
from consensus.proofs import Proof
from consensus.seal import SealEngine
from consensus.state import (
    Account,
    ModelRecord,
    Span,
    StateKey,
    apply_block,
    compute_genesis_state,
)
from consensus.tasks import Task, compute_task_id
from consensus.transactions import TaskTx, compute_tx_id
from consensus.validation import HeaderContext, compute_median_time_past, validate_block
from storage import schema
from storage.db import Database, StorageError, decode_record
from storage.schema import (
    STATUS_INVALID,
    STATUS_INVALID_PARENT,
    STATUS_STORED,
    STATUS_VALID,
    ChainMeta,
    IndexEntry,
)

PARALLEL_MIN_ITEMS = 8


class MissingParent(Exception):
    """The block's parent is unknown here: an orphan to hold or fetch, not a bad block."""


@dataclass(frozen=True, slots=True)
class AddResult:
    """What adding a block did: `connected` when the tip moved, `stored` for a side
    branch, `duplicate` when already known; the blocks that left and joined the chain."""

    status: str
    block_id: Hash
    disconnected: tuple[Hash, ...] = ()
    connected: tuple[Hash, ...] = ()


class _ConnectFailed(Exception):
    def __init__(self, block_id: Hash, error: ConsensusError) -> None:
        self.block_id, self.error = block_id, error


class _PendingState:
    """The database's state seen through changes not yet written."""

    def __init__(self, store: "ChainStore", pending: dict[StateKey, Any]) -> None:
        self._store, self._pending = store, pending

    def get(self, key: StateKey) -> Any | None:
        if key in self._pending:
            return self._pending[key]
        return self._store.get_state(key)


class TipState:
    """The main chain tip's state as a consensus StateView (reads go to the database)."""

    def __init__(self, store: "ChainStore") -> None:
        self.get = store.get_state


class ChainStore:
    def __init__(self, db: Database, params: ChainParams, engine: SealEngine) -> None:
        self.db, self.params, self.engine = db, params, engine
        self._lock = threading.RLock()
        self._index: dict[Hash, IndexEntry] = {}
        self._children: dict[Hash, list[Hash]] = {}
        self._candidates: set[Hash] = set()
        self._adding: dict[Hash, Block] = {}  # the block add_block holds, saving a re-read
        self._unwritten: dict[bytes, bytes] = {}  # its records, for the next batch
        self._tasks: dict[Hash, Task] = {}
        self._workers = os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="dpodl-sigcheck")
        self.genesis_id = compute_block_id(genesis_block(params).header)
        meta = db.get(schema.META)
        if meta is None:
            self._write_genesis()
        else:
            self._check_meta(meta)
        self._load_index()
        self.tip_id = Hash(self._read(schema.TIP))
        if db.get(schema.TXINDEX) != self.tip_id:  # older than the index, or than its tip
            self._build_tx_index()
        self._seen = max(e.seen for e in self._index.values()) + 1
        # A crash between storing a better block and connecting it leaves it here to finish.
        self._candidates = {i for i, e in self._index.items()
                            if e.status <= STATUS_VALID and self._better(i, self.tip_id)}
        self._activate_best_chain()

    # -- opening ---------------------------------------------------------------------

    def _write_genesis(self) -> None:
        block = genesis_block(self.params)
        gid = self.genesis_id
        entry = IndexEntry(block.header, 0, 0, STATUS_VALID, 0)
        with self.db.write_batch() as batch:
            batch.put(schema.block_key(gid), encode(block))
            batch.put(schema.index_key(gid), encode(entry))
            batch.put(schema.height_key(0), gid)
            for key, _, after in compute_genesis_state(self.params).changes:
                batch.put(schema.state_key(key), encode(after))
            task = self.params.genesis_task
            batch.put(schema.task_key(compute_task_id(task)), encode(task))
            batch.put(schema.META, encode(ChainMeta(self.params.name.encode(), gid)))
            batch.put(schema.TIP, gid)

    def _build_tx_index(self) -> None:
        with self.db.write_batch() as batch:
            for key, _ in self.db.iterate(schema.TXINDEX):
                batch.delete(key)
            for height in range(self.height + 1):
                block_id = self.main_chain_id(height)
                for tx in self._block(block_id).txs:
                    batch.put(schema.tx_key(compute_tx_id(tx)), block_id)
            batch.put(schema.TXINDEX, self.tip_id)

    def _check_meta(self, raw: bytes) -> None:
        meta = decode_record(ChainMeta, raw, "chain metadata")
        if meta.genesis_id != self.genesis_id:
            raise StorageError(
                f"{self.db.datadir} holds the {meta.network.decode(errors='replace')!r} chain "
                f"(genesis {meta.genesis_id.hex()[:16]}…), not {self.params.name!r}")

    def _load_index(self) -> None:
        for key, value in self.db.iterate(schema.INDEX):
            block_id = Hash(key[len(schema.INDEX):])
            entry = decode_record(IndexEntry, value, f"index entry {block_id.hex()}")
            self._index[block_id] = entry
            if entry.header.height:
                self._children.setdefault(entry.header.prev_id, []).append(block_id)

    def _read(self, key: bytes) -> bytes:
        value = self.db.get(key)
        if value is None:
            raise StorageError(f"corrupt database: missing {key[:1].decode()} record "
                               f"{key[1:].hex()}")
        return value

    # -- queries ---------------------------------------------------------------------

    @property
    def tip(self) -> IndexEntry:
        return self._index[self.tip_id]

    @property
    def height(self) -> int:
        return self.tip.header.height

    def get_entry(self, block_id: Hash) -> IndexEntry | None:
        return self._index.get(block_id)

    def get_header(self, block_id: Hash) -> BlockHeader | None:
        entry = self._index.get(block_id)
        return entry.header if entry else None

    def get_block(self, block_id: Hash) -> Block | None:
        raw = self.db.get(schema.block_key(block_id))
        return None if raw is None else decode_record(Block, raw, f"block {block_id.hex()}")

    def _block(self, block_id: Hash) -> Block:
        """A block that must be here: StorageError if it is not."""
        raw = self._read(schema.block_key(block_id))
        return decode_record(Block, raw, f"block {block_id.hex()}")

    def tx_block(self, tx_id: Hash) -> Hash | None:
        """The id of the main-chain block holding transaction `tx_id`, or None."""
        raw = self.db.get(schema.tx_key(tx_id))
        return None if raw is None else Hash(raw)

    def main_chain_id(self, height: int) -> Hash | None:
        raw = self.db.get(schema.height_key(height))
        return None if raw is None else Hash(raw)

    def get_state(self, key: StateKey) -> Any | None:
        raw = self.db.get(schema.state_key(key))
        return None if raw is None else schema.decode_state_value(key, raw)

    def get_task(self, task_id: Hash) -> Task | None:
        task = self._tasks.get(task_id)  # content-addressed, so a cache never goes stale
        if task is None:
            raw = self.db.get(schema.task_key(task_id))
            if raw is None:
                return None
            task = self._tasks[task_id] = decode_record(Task, raw, f"task {task_id.hex()}")
        return task

    def account(self, address: bytes) -> Account:
        return self.get_state(("account", address)) or Account()

    def iterate_state(self, kind: str | None = None) -> Iterator[tuple[StateKey, Any]]:
        """Every state entry, or every one of `kind`, in key order."""
        prefix = schema.STATE if kind is None else schema.state_key((kind, b""))
        for db_key, raw in self.db.iterate(prefix):
            key = schema.state_key_from_db(db_key)
            yield key, schema.decode_state_value(key, raw)

    def spans(self) -> list[tuple[int, Span]]:
        """(start height, span) of every task span the main chain has begun, oldest first."""
        return [(int.from_bytes(key[1], "big"), span) for key, span in self.iterate_state("span")]

    def model_origin(self, model_id: Hash) -> tuple[ModelRecord, Hash, Proof] | None:
        """Where the main chain registered `model_id`: its record, the block and the proof
        (the block's own, or one of its model transactions'); None for a model not on it."""
        record: ModelRecord | None = self.get_state(("model", model_id))
        block_id = None if record is None else self.main_chain_id(record.height)
        header = None if block_id is None else self.get_header(block_id)
        if header is None:
            return None
        if header.proof.model_id == model_id:  # a block's model: no need to read the block
            return record, block_id, header.proof
        block = self.get_block(block_id)
        for proof in block_proofs(block) if block is not None else ():
            if proof.model_id == model_id:
                return record, block_id, proof
        return None

    def chain_tips(self) -> list[tuple[Hash, IndexEntry]]:
        """Every block without children: the active tip and the ends of side branches."""
        return [(i, e) for i, e in self._index.items() if not self._children.get(i)]

    def is_main_chain(self, block_id: Hash) -> bool:
        entry = self._index.get(block_id)
        return entry is not None and self.main_chain_id(entry.header.height) == block_id

    # -- adding blocks ---------------------------------------------------------------

    def add_block(self, block: Block, now: int | None = None) -> AddResult:
        """Check, store and (if it makes the best chain) connect `block`.

        Raises ConsensusError when the block, or the branch it completes, is invalid;
        MissingParent when its parent is unknown. Nothing is written for a block that
        fails its context checks or proof.
        """
        with self._lock:
            block_id = compute_block_id(block.header)
            if block_id in self._index:
                return AddResult("duplicate", block_id)
            parent = self._index.get(block.header.prev_id)
            if parent is None:
                raise MissingParent(block.header.prev_id.hex())
            if parent.status >= STATUS_INVALID:
                raise ConsensusError("bad-prevblk", "parent is invalid")
            ctx = self._header_context(block.header.height, parent, now)
            weight = validate_block(self.params, self.engine, block, ctx, self.get_task,
                                    self._parallel_map)
            entry = IndexEntry(block.header, weight, parent.chain_weight + weight,
                               STATUS_STORED, self._seen)
            # The block's records ride in the batch that connects it, or that marks it
            # invalid, or on their own if it only extends a side branch.
            self._unwritten = {schema.block_key(block_id): encode(block),
                               schema.index_key(block_id): encode(entry)}
            for tx in block.txs:
                if isinstance(tx, TaskTx):
                    self._unwritten[schema.task_key(compute_task_id(tx.task))] = encode(tx.task)
            self._seen += 1
            self._index[block_id] = entry
            self._children.setdefault(block.header.prev_id, []).append(block_id)
            if self._better(block_id, self.tip_id):
                self._candidates.add(block_id)
            old_tip = self.tip_id
            self._adding = {block_id: block}
            try:
                failures = self._activate_best_chain()
            finally:
                self._adding = {}
                if self._unwritten:
                    with self.db.write_batch() as batch:
                        self._flush_unwritten(batch)
            for failed_id, error in failures:
                if failed_id == block_id or self._is_ancestor(failed_id, block_id):
                    raise error
            if self.tip_id == old_tip:
                return AddResult("stored", block_id)
            disconnected, connected = self._fork_paths(old_tip, self.tip_id)
            return AddResult("connected", block_id, tuple(disconnected), tuple(connected))

    def invalidate_block(self, block_id: Hash) -> AddResult:
        """Mark a block and its descendants invalid and move to the best valid chain.

        For a block a checked fraud proof convicts (PROTOCOL.md §8.8), and for an
        operator's `invalidateblock`. Returns how the tip moved (status `connected`
        when it did, `stored` when the block was off the main chain).
        """
        with self._lock:
            entry = self._index.get(block_id)
            if entry is None:
                raise KeyError(block_id.hex())
            if entry.header.height == 0:
                raise ValueError("the genesis block cannot be invalidated")
            old_tip = self.tip_id
            if self.is_main_chain(block_id):
                disconnect, _ = self._fork_paths(self.tip_id, entry.header.prev_id)
                self._reorganize(disconnect, [])
            self._mark_invalid(block_id)
            # Any valid block may now lead (a branch cut short by an earlier failure too).
            self._candidates.update(i for i, e in self._index.items()
                                    if e.status <= STATUS_VALID)
            self._activate_best_chain()
            if self.tip_id == old_tip:
                return AddResult("stored", block_id)
            disconnected, connected = self._fork_paths(old_tip, self.tip_id)
            return AddResult("connected", block_id, tuple(disconnected), tuple(connected))

    def _parallel_map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        """`map` over the worker threads in contiguous chunks, order kept; small inputs
        stay on this thread, where handing them over would cost more than it saves."""
        items = list(zip(*iterables, strict=True))
        if len(items) < PARALLEL_MIN_ITEMS or self._workers == 1:
            return [fn(*args) for args in items]
        size = -(-len(items) // self._workers)
        futures = [self._pool.submit(lambda chunk: [fn(*args) for args in chunk],
                                     items[i:i + size]) for i in range(0, len(items), size)]
        return [result for future in futures for result in future.result()]

    def close(self) -> None:
        self._pool.shutdown()
        self.db.close()

    def next_context(self, now: int | None = None) -> HeaderContext:
        """What a block on the current tip must satisfy: its parent, the median time past
        its timestamp must exceed, and its target (for a miner's block template)."""
        with self._lock:
            return self._header_context(self.tip.header.height + 1, self.tip, now)

    def _header_context(self, height: int, parent: IndexEntry,
                        now: int | None) -> HeaderContext:
        times, entry = [], parent
        while True:
            times.append(entry.header.timestamp)
            if len(times) == self.params.median_time_span or entry.header.height == 0:
                break
            entry = self._index[entry.header.prev_id]
        target = parent.header.target
        interval = self.params.retarget_interval
        if height % interval == 0:
            start = self._ancestor(parent, height - interval)
            target = compute_next_target(self.params, height, target,
                                         start.header.timestamp, parent.header.timestamp)
        return HeaderContext(parent.header, compute_median_time_past(times), target,
                             int(time.time()) if now is None else now)

    def _ancestor(self, entry: IndexEntry, height: int) -> IndexEntry:
        while entry.header.height > height:
            entry = self._index[entry.header.prev_id]
        return entry

    def _is_ancestor(self, ancestor_id: Hash, block_id: Hash) -> bool:
        ancestor = self._index[ancestor_id]
        found = self._ancestor(self._index[block_id], ancestor.header.height)
        return compute_block_id(found.header) == ancestor_id

    def _chain_tip(self, block_id: Hash) -> ChainTip:
        entry = self._index[block_id]
        return ChainTip(entry.chain_weight, entry.seen)

    def _better(self, candidate_id: Hash, current_id: Hash) -> bool:
        return check_better_tip(self._chain_tip(candidate_id), self._chain_tip(current_id))

    # -- moving the tip --------------------------------------------------------------

    def _activate_best_chain(self) -> list[tuple[Hash, ConsensusError]]:
        """Move to the best valid candidate; returns the blocks found invalid on the way."""
        failures = []
        while True:
            self._candidates = {c for c in self._candidates
                                if self._index[c].status <= STATUS_VALID
                                and self._better(c, self.tip_id)}
            if not self._candidates:
                return failures
            tips = {self._chain_tip(c): c for c in self._candidates}  # `seen` is unique
            best = tips[select_best_tip(list(tips))]
            disconnect, connect = self._fork_paths(self.tip_id, best)
            try:
                self._reorganize(disconnect, connect)
            except _ConnectFailed as failed:
                self._mark_invalid(failed.block_id)
                failures.append((failed.block_id, failed.error))

    def _fork_paths(self, old: Hash, new: Hash) -> tuple[list[Hash], list[Hash]]:
        """Blocks to disconnect (old tip first) and to connect (lowest first)."""
        disconnect, connect = [], []
        a, b = self._index[old], self._index[new]
        a_id, b_id = old, new
        while b.header.height > a.header.height:
            connect.append(b_id)
            b_id = b.header.prev_id
            b = self._index[b_id]
        while a.header.height > b.header.height:
            disconnect.append(a_id)
            a_id = a.header.prev_id
            a = self._index[a_id]
        while a_id != b_id:
            disconnect.append(a_id)
            connect.append(b_id)
            a_id, b_id = a.header.prev_id, b.header.prev_id
            a, b = self._index[a_id], self._index[b_id]
        connect.reverse()
        return disconnect, connect

    def _reorganize(self, disconnect: list[Hash], connect: list[Hash]) -> None:
        """Disconnect then connect blocks in one batch. `connect` is empty only when an
        invalidated block is rewound, leaving its parent as the tip."""
        pending: dict[StateKey, Any] = {}
        view = _PendingState(self, pending)
        unindexed: list[Hash] = []  # ids of the transactions of disconnected blocks
        for block_id in disconnect:
            for key, before in schema.decode_undo(self._read(schema.undo_key(block_id))):
                pending[key] = before
            unindexed += map(compute_tx_id, self._block(block_id).txs)
        undos, indexed = [], []
        for block_id in connect:
            block = self._adding.get(block_id) or self._block(block_id)
            indexed += [(compute_tx_id(tx), block_id) for tx in block.txs]
            try:
                diff = apply_block(self.params, view, block)
            except ConsensusError as error:
                raise _ConnectFailed(block_id, error) from None
            for key, _, after in diff.changes:
                pending[key] = after
            undos.append(schema.encode_undo(diff.changes))
        validated = {}
        with self.db.write_batch() as batch:
            self._flush_unwritten(batch)
            for key, value in pending.items():
                if value is None:
                    batch.delete(schema.state_key(key))
                else:
                    batch.put(schema.state_key(key), encode(value))
            for block_id in disconnect:
                batch.delete(schema.undo_key(block_id))
                batch.delete(schema.height_key(self._index[block_id].header.height))
            for tx_id in unindexed:  # deleted before the puts: a tx on both sides stays
                batch.delete(schema.tx_key(tx_id))
            for tx_id, block_id in indexed:
                batch.put(schema.tx_key(tx_id), block_id)
            for block_id, undo in zip(connect, undos, strict=True):
                entry = self._index[block_id]
                batch.put(schema.undo_key(block_id), undo)
                batch.put(schema.height_key(entry.header.height), block_id)
                if entry.status != STATUS_VALID:
                    validated[block_id] = replace(entry, status=STATUS_VALID)
                    batch.put(schema.index_key(block_id), encode(validated[block_id]))
            new_tip = connect[-1] if connect else self._index[disconnect[-1]].header.prev_id
            batch.put(schema.TIP, new_tip)
            batch.put(schema.TXINDEX, new_tip)  # the tip the index is up to
        self._index.update(validated)
        self.tip_id = new_tip

    def _flush_unwritten(self, batch: Any) -> None:
        for key, value in self._unwritten.items():
            batch.put(key, value)
        self._unwritten = {}

    def _mark_invalid(self, block_id: Hash) -> None:
        """Mark a block that failed to connect, and all its descendants, invalid."""
        marks = {block_id: STATUS_INVALID}
        stack = list(self._children.get(block_id, ()))
        while stack:
            child = stack.pop()
            marks[child] = STATUS_INVALID_PARENT
            stack.extend(self._children.get(child, ()))
        with self.db.write_batch() as batch:
            self._flush_unwritten(batch)
            for marked, status in marks.items():
                self._index[marked] = replace(self._index[marked], status=status)
                batch.put(schema.index_key(marked), encode(self._index[marked]))
        # The valid prefix of the failed branch may still beat the current tip.
        self._candidates.add(self._index[block_id].header.prev_id)
