"""Which checkpoints a node keeps (PROTOCOL.md §8): those of its last `keep` blocks.

Checkpoints are the miner's to store and serve, but a miner may go away. So a node keeps
the checkpoints of every proof (a header's, each model transaction's) in its last `keep`
blocks, fetches those its own audits did not (`missing`), and can then serve any
interval of a recent block; it drops the rest (`prune`). Models and histories (the leaf
lists) are never dropped: a model is what the chain is for and what later miners train
from, and a leaf list is small.

Valid side-branch blocks within the window keep what is stored of theirs too (they are
not fetched for): after a reorganisation inside the window the new main chain's
checkpoints are still here, and the miner of a block that lost a race holds the only
full copy of its checkpoints.

Call these on the chain thread, where blocks are added, so the chain does not move
under them.
"""

from collections.abc import Iterable, Iterator

from consensus.blocks import Block, block_proofs
from consensus.encoding import Hash
from consensus.seal import Need
from storage.artifacts import ArtifactStore
from storage.chain import ChainStore
from storage.db import StorageError
from storage.schema import STATUS_VALID

MISSING_LIMIT = 64  # needs per missing() call: a fetch slice, not the whole window at once


def proof_roots(block: Block) -> list[Hash]:
    """The ckpt_roots of a block's proofs: its own and its model transactions'."""
    return [proof.ckpt_root for proof in block_proofs(block)]


def recent_blocks(store: ChainStore, keep: int) -> Iterator[Block]:
    """The last `keep` main-chain blocks, newest first; never genesis, which trained nothing."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    block_id = store.tip_id  # walked by parent links, so a tip that moves cannot mix chains
    for _ in range(keep):
        block = store.get_block(block_id)
        if block is None:
            raise StorageError(f"corrupt database: main-chain block {block_id.hex()} missing")
        if block.header.height == 0:
            return
        yield block
        block_id = block.header.prev_id


def _side_blocks(store: ChainStore, keep: int) -> Iterator[Block]:
    """Valid blocks off the main chain at the heights of the last `keep` blocks."""
    low = max(1, store.height - keep + 1)
    seen: set[Hash] = set()
    for block_id, entry in store.chain_tips():
        while (entry is not None and entry.header.height >= low and block_id not in seen
               and not store.is_main_chain(block_id)):
            seen.add(block_id)
            block = store.get_block(block_id) if entry.status <= STATUS_VALID else None
            if block is not None:
                yield block
            block_id = entry.header.prev_id
            entry = store.get_entry(block_id)


def retained_roots(store: ChainStore, keep: int) -> set[Hash]:
    """The ckpt_roots whose checkpoints a node keeps: the proofs of its last `keep`
    main-chain blocks, and of valid side-branch blocks at those heights."""
    return {root for blocks in (recent_blocks(store, keep), _side_blocks(store, keep))
            for block in blocks for root in proof_roots(block)}


def prune(store: ChainStore, artifacts: ArtifactStore, keep: int,
          protect: Iterable[Hash] = ()) -> int:
    """Drop every stored checkpoint whose root is neither retained nor in `protect` (what
    the caller must keep besides: pooled model transactions', a solution being handed to
    the chain); histories and models stay. One write batch, none when there is nothing to
    drop; a kept root costs one seek. Returns how many checkpoints were dropped."""
    kept = retained_roots(store, keep) | set(protect) | set(artifacts.own_roots())
    return artifacts.drop_checkpoints(
        [root for root in artifacts.checkpoint_roots() if root not in kept])


def missing(store: ChainStore, artifacts: ArtifactStore, keep: int,
            limit: int = MISSING_LIMIT) -> list[Need]:
    """At most `limit` artifacts to fetch so that every checkpoint of the last `keep`
    main-chain blocks is here: first the histories not here (only a history says how many
    checkpoints there are), then the absent checkpoints of the others, newest block first.

    Reads the keys of the window's stored checkpoints: cheap while they are in the page
    cache, a read of their blocks when not, so call it when block sync is idle.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    roots = list(dict.fromkeys(root for block in recent_blocks(store, keep)
                               for root in proof_roots(block)))
    histories = {root: artifacts.get_history(root) for root in roots}
    needs = [Need("history", root) for root, history in histories.items() if history is None]
    for root, history in histories.items():
        if len(needs) >= limit:
            break
        if history is not None:
            have = set(artifacts.checkpoint_indexes(root))
            needs += [Need("checkpoint", root, i) for i in range(len(history.leaves))
                      if i not in have]
    return needs[:limit]
