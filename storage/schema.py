"""Every LevelDB key the node writes, and the records stored under them.

One byte of prefix names the table; nobody outside this module formats a key.

    B id            block (canonical encoding)
    I id            IndexEntry: header, weights, validity, arrival order
    H height        id of the main-chain block at height (8 bytes big-endian)
    T               id of the best tip
    N               ChainMeta: which network this database belongs to
    S kind key      a state entry (account, model, block, task, schedule, span)
    U id            Undo: the state entries a connected block overwrote
    K task_id       a task, content-addressed (for weighing blocks off the main chain)
    M model_id      ModelBlob: a model's architecture and parameters
    L ckpt_root     History: the leaves of a training history
    C ckpt_root i   Checkpoint i of that history (leaf, Merkle path, tensors)
    O ckpt_root     marks this node's own solutions' histories (never pruned)
    R start         TaskResult of the task span that starts at that height (node-local)
    E model_id      a block model's test-split score, as this node counted it (node-local)
    X tx_id         id of the main-chain block holding the transaction; X alone holds
                    the tip the index is up to (when it is not the tip, as in a datadir
                    from before the index, the index is built again on opening)
"""

import struct
from dataclasses import dataclass
from typing import Annotated, Any

from consensus.blocks import BlockHeader
from consensus.encoding import U8, U64, Bytes, Hash, Hash32, MaxItems, Name, decode, encode
from consensus.state import STATE_TYPES, StateKey

BLOCK = b"B"
INDEX = b"I"
HEIGHT = b"H"
TIP = b"T"
META = b"N"
STATE = b"S"
UNDO = b"U"
TASK = b"K"
MODEL = b"M"
HISTORY = b"L"
CHECKPOINT = b"C"
OWN = b"O"  # ckpt_roots of this node's own solutions: their checkpoints are never pruned
RESULT = b"R"
SCORE = b"E"
TXINDEX = b"X"

# Validity of an indexed block. STORED: its context checks passed and its data is
# here; VALID: it has been connected, so its state transition is known to be good.
STATUS_STORED = 0
STATUS_VALID = 1
STATUS_INVALID = 2  # failed its own checks
STATUS_INVALID_PARENT = 3  # descends from an invalid block

_KIND_CODES = {kind: bytes([i]) for i, kind in enumerate(STATE_TYPES, start=1)}
_CODE_KINDS = {code: kind for kind, code in _KIND_CODES.items()}


@dataclass(frozen=True, slots=True)
class IndexEntry:
    header: BlockHeader
    weight: U64  # this block's weight under the fork rule
    chain_weight: U64  # total weight from genesis through this block
    status: U8
    seen: U64  # arrival order on this node: first-seen wins ties


@dataclass(frozen=True, slots=True)
class ChainMeta:
    network: Name
    genesis_id: Hash32


@dataclass(frozen=True, slots=True)
class UndoEntry:
    kind: U8
    key: Annotated[bytes, Bytes(64)]
    before: Annotated[bytes, Bytes(1 << 20)]  # encoded value, b"" when the entry was absent


@dataclass(frozen=True, slots=True)
class Undo:
    entries: Annotated[tuple[UndoEntry, ...], MaxItems(1 << 20)]


def block_key(block_id: Hash) -> bytes:
    return BLOCK + block_id


def index_key(block_id: Hash) -> bytes:
    return INDEX + block_id


def height_key(height: int) -> bytes:
    return HEIGHT + struct.pack(">Q", height)


def undo_key(block_id: Hash) -> bytes:
    return UNDO + block_id


def task_key(task_id: Hash) -> bytes:
    return TASK + task_id


def model_key(model_id: Hash) -> bytes:
    return MODEL + model_id


def history_key(ckpt_root: Hash) -> bytes:
    return HISTORY + ckpt_root


def checkpoint_key(ckpt_root: Hash, index: int) -> bytes:
    return CHECKPOINT + ckpt_root + struct.pack(">I", index)


def checkpoint_prefix(ckpt_root: Hash) -> bytes:
    return CHECKPOINT + ckpt_root


def checkpoint_prefix_end(ckpt_root: Hash) -> bytes:
    """A key past every checkpoint of `ckpt_root` and before the next root's: where a
    scan of the roots seeks to skip one root's tensors unread."""
    return CHECKPOINT + ckpt_root + b"\xff" * 5  # longer than any of its 4-byte indexes


def tx_key(tx_id: Hash) -> bytes:
    return TXINDEX + tx_id


def own_key(ckpt_root: Hash) -> bytes:
    return OWN + ckpt_root


def result_key(start: int) -> bytes:
    return RESULT + struct.pack(">Q", start)


def score_key(model_id: Hash) -> bytes:
    return SCORE + model_id


def split_checkpoint_key(key: bytes) -> tuple[Hash, int]:
    """The (ckpt_root, index) a checkpoint key names."""
    root_end = len(CHECKPOINT) + 32
    return Hash(key[len(CHECKPOINT):root_end]), struct.unpack(">I", key[root_end:])[0]


def state_key(key: StateKey) -> bytes:
    kind, name = key
    return STATE + _KIND_CODES[kind] + name


def state_key_from_db(db_key: bytes) -> StateKey:
    return _CODE_KINDS[db_key[1:2]], db_key[2:]


def decode_state_value(key: StateKey, data: bytes) -> Any:
    return decode(STATE_TYPES[key[0]], data)


def encode_undo(changes: tuple[tuple[StateKey, Any, Any], ...]) -> bytes:
    """Undo data for a block's state diff: every entry's value before the block."""
    return encode(Undo(tuple(
        UndoEntry(_KIND_CODES[key[0]][0], key[1], b"" if before is None else encode(before))
        for key, before, _ in changes)))


def decode_undo(data: bytes) -> list[tuple[StateKey, Any]]:
    """The (key, value before the block) pairs of an undo record; None: was absent."""
    out = []
    for entry in decode(Undo, data).entries:
        key = (_CODE_KINDS[bytes([entry.kind])], entry.key)
        out.append((key, decode_state_value(key, entry.before) if entry.before else None))
    return out
