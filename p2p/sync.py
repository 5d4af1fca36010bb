"""Headers-first sync: learn what the peers' chains hold, then fetch the blocks from all
of them at once (PROTOCOL.md §11; Bitcoin Core's design since 0.10).

A node asks a peer for the headers after its block locator (`getheaders`). Headers are
cheap to check without their blocks: links, heights, the retarget rule, the timestamps,
the miner's signature and the two lottery hashes (h1 ≤ t1, h2 ≤ the header's target), so
a peer cannot make us fetch blocks for headers nobody did work for. Checked headers wait
in a bounded tree; when it is full, the branch ending lowest makes room for a higher
header. Their blocks are requested from the peers that sent them, lowest first, at most
`per_peer` in flight per peer, `window` blocks ahead of our tip, and none while the
blocks waiting for their parents hold `max_arrived_bytes`. A peer with requests out
that delivers no block for `stall_timeout` is a staller, which the network
disconnects; its requests go to the others. Blocks arrive in any order and are handed
on parent first. New blocks are announced by `inv`; an unknown one is looked up with
`getheaders` as well, so relay and catching up are one path.

The full checks (the context rules, the audits, the state transition) are the chain
store's when a block is added. Headers are a map of where to look, not a verdict: the
tree does not choose the chain, the store's fork-choice rule does.
"""

import time
from dataclasses import dataclass

from consensus.blocks import Block, BlockHeader, compute_block_id, validate_header_signature
from consensus.difficulty import compute_next_target
from consensus.encoding import Hash
from consensus.errors import ConsensusError
from consensus.params import ChainParams
from consensus.proofs import check_target, compute_posthash, compute_prehash
from consensus.validation import compute_median_time_past
from p2p.messages import MAX_HEADERS, MAX_LOCATOR, ProtocolError
from p2p.peer import KnownSet, Peer
from storage.chain import ChainStore
from storage.schema import STATUS_INVALID


def check_header_work(params: ChainParams, header: BlockHeader) -> None:
    """The checks a header passes on its own: a target no easier than the network's
    limit, both lottery hashes under their targets, the miner's signature."""
    if header.target > params.t2_limit:
        raise ConsensusError("bad-diffbits", "t2 above the network's limit")
    h1 = compute_prehash(header.prev_id, header.proof)
    if not check_target(h1, params.t1):
        raise ConsensusError("bad-prehash", f"h1 {h1.hex()} above t1")
    if not check_target(compute_posthash(h1, header.proof.steps, header.proof.n_correct),
                        header.target):
        raise ConsensusError("bad-posthash", "h2 above the target")
    validate_header_signature(header)


def build_locator(store: ChainStore) -> tuple[Hash, ...]:
    """Block ids of our main chain: the last 10, then back in doubling steps, then genesis."""
    ids, height, step = [], store.height, 1
    while height > 0 and len(ids) < MAX_LOCATOR - 1:
        block_id = store.main_chain_id(height)
        if block_id is not None:
            ids.append(block_id)
        if len(ids) >= 10:
            step *= 2
        height -= step
    ids.append(store.genesis_id)
    return tuple(ids)


def headers_after(store: ChainStore, locator: tuple[Hash, ...], stop: Hash) -> list[BlockHeader]:
    """Up to MAX_HEADERS main-chain headers after the first locator entry on our main
    chain (genesis if none is), ending at `stop` if we reach it."""
    start = 0
    for block_id in locator:
        if store.is_main_chain(block_id):
            entry = store.get_entry(block_id)
            assert entry is not None
            start = entry.header.height
            break
    headers = []
    for height in range(start + 1, min(store.height, start + MAX_HEADERS) + 1):
        block_id = store.main_chain_id(height)
        header = store.get_header(block_id) if block_id else None
        if header is None or (headers and header.prev_id != compute_block_id(headers[-1])):
            break  # the tip moved under us (a reorg): what we have is still one chain
        headers.append(header)
        if block_id == stop:
            break
    return headers


@dataclass(slots=True)
class _Request:
    peer: Peer
    sent: float


class BlockSync:
    def __init__(self, params: ChainParams, store: ChainStore, *, window: int = 1024,
                 per_peer: int = 16, stall_timeout: float = 20.0,
                 max_headers: int = 20_000, max_arrived_bytes: int = 256 << 20) -> None:
        self.params, self.store = params, store
        self.window, self.per_peer, self.stall_timeout = window, per_peer, stall_timeout
        self.max_headers, self.max_arrived_bytes = max_headers, max_arrived_bytes
        self.headers: dict[Hash, BlockHeader] = {}  # checked headers of blocks we lack
        self.holders: dict[Hash, set[int]] = {}  # which peers sent each of those headers
        self.in_flight: dict[Hash, _Request] = {}
        self.arrived: dict[Hash, tuple[Block, Peer]] = {}  # blocks waiting for their parent
        self.sizes: dict[Hash, int] = {}  # bytes of each block arrived or being added
        self.delivered: dict[int, float] = {}  # peer id → when it last delivered a block
        self.adding: set[Hash] = set()  # blocks handed on and not yet done
        self.asked_headers: dict[int, float] = {}  # peer id → when we sent it getheaders
        self.invalid = KnownSet(10_000)  # ids of blocks (and headers) known bad
        # Blocks convicted by a private audit or a fraud proof: a peer whose own audits
        # passed relays them in good faith, so they are skipped, not held against it.
        self.convicted = KnownSet(10_000)
        self.cancelled = KnownSet(10_000)  # requests dropped: a late answer is no offence

    # -- headers ---------------------------------------------------------------------------

    def want_headers(self, peer: Peer, now: float | None = None) -> bool:
        """Note that we send `peer` a getheaders; False if one is already out."""
        if peer.id in self.asked_headers:
            return False
        self.asked_headers[peer.id] = time.monotonic() if now is None else now
        return True

    def best_height(self) -> int:
        """The height of the best header we know of (stored or waiting)."""
        return max([self.store.height, *(h.height for h in self.headers.values())])

    def add_headers(self, peer: Peer, headers: tuple[BlockHeader, ...],
                    now: int | None = None) -> bool:
        """Check and keep the headers of a `headers` answer; True when the peer may have
        more (a full message whose last header was new). ProtocolError when the answer
        was not asked for or the headers are bad; ConsensusError when one is invalid.
        `now` is the local clock in seconds. A header too far ahead of it ends the
        message with False: it may be valid later, so nothing is held against anyone."""
        if self.asked_headers.pop(peer.id, None) is None:
            raise ProtocolError("unrequested-headers", f"{len(headers)} headers")
        now = int(time.time()) if now is None else now
        parent: BlockHeader | None = None
        new = False
        evictable: list[tuple[int, Hash]] | None = None  # worked out once, when first full
        for header in headers:
            block_id = compute_block_id(header)
            if block_id in self.convicted or header.prev_id in self.convicted:
                return False  # a fraud proof's verdict: honest peers may not know it yet
            if block_id in self.invalid:
                raise ConsensusError("bad-prevblk", f"header {block_id.hex()} is known invalid")
            if parent is not None and header.prev_id != compute_block_id(parent):
                raise ProtocolError("non-continuous-headers", f"at height {header.height}")
            parent = self._header(header.prev_id)
            if parent is None:
                raise ProtocolError("unconnected-headers", f"unknown parent of height "
                                                           f"{header.height}")
            if header.height != parent.height + 1:
                raise ConsensusError("bad-height", f"height {header.height} on {parent.height}")
            if header.prev_id in self.invalid or self._stored_invalid(header.prev_id):
                raise ConsensusError("bad-prevblk", "the parent is invalid")
            if header.target != self._expected_target(header.height, parent):
                raise ConsensusError("bad-diffbits", "t2 does not follow the retarget rule")
            stored = self.store.get_entry(block_id) is not None
            if not stored and block_id not in self.headers:
                full = len(self.headers) >= self.max_headers
                if full and evictable is None:
                    evictable = self._evictable(header.prev_id)
                if full and (not evictable or evictable[-1][0] >= header.height):
                    return False  # full of branches as high: ask again once blocks drain it
                check_header_work(self.params, header)
                median = self._median_time_past(parent)
                if header.timestamp <= median:
                    self.invalid.add(block_id)
                    raise ConsensusError("time-too-old", f"{header.timestamp} <= median {median}")
                if header.timestamp > now + self.params.max_future_time:
                    return False  # Bitcoin Core's BLOCK_TIME_FUTURE: not cached, not punished
                if full:
                    assert evictable is not None
                    self.done(evictable.pop()[1])
                self.headers[block_id] = header
                new = True
            peer.known_blocks.add(block_id)
            peer.best_height = max(peer.best_height, header.height)
            parent = header
            if not stored:
                self.holders.setdefault(block_id, set()).add(peer.id)
        return len(headers) == MAX_HEADERS and new

    def _median_time_past(self, parent: BlockHeader) -> int:
        """The median time past that a header on `parent` must exceed, from the headers
        below it (stored or waiting), as the store works it out for a block."""
        times, header = [parent.timestamp], parent
        while len(times) < self.params.median_time_span and header.height > 0:
            below = self._header(header.prev_id)
            assert below is not None  # every header here links down to genesis
            times.append(below.timestamp)
            header = below
        return compute_median_time_past(times)

    def _evictable(self, keep: Hash) -> list[tuple[int, Hash]]:
        """Headers that may be forgotten to make room, as (the height of the highest leaf
        above it, id), the last to go first: the branch ending lowest (the longest-chain
        rule's measure, which headers alone can tell), each from its tip down, so the tree
        stays connected. Never `keep`, a header whose block is in flight, arrived or being
        added, or anything below those: one pass over the tree, for a whole message."""
        protected: set[Hash] = set()
        for block_id in (keep, *self.in_flight, *self.arrived, *self.adding):
            while block_id in self.headers and block_id not in protected:
                protected.add(block_id)
                block_id = self.headers[block_id].prev_id
        top: dict[Hash, int] = {}  # id → the height of the highest leaf above it
        for block_id, header in sorted(self.headers.items(), key=lambda kv: -kv[1].height):
            reach = top.setdefault(block_id, header.height)
            top[header.prev_id] = max(top.get(header.prev_id, 0), reach)
        order = sorted(((top[i], h.height, i) for i, h in self.headers.items()
                        if i not in protected), key=lambda t: (-t[0], t[1]))
        return [(reach, i) for reach, _, i in order]

    def _expected_target(self, height: int, parent: BlockHeader) -> int:
        """t2 of the block at `height` on `parent`, from the headers below it (stored or
        waiting): so a peer cannot make cheap headers by naming an easy target."""
        start = parent
        if height % self.params.retarget_interval == 0:
            while start.height > height - self.params.retarget_interval:
                below = self._header(start.prev_id)
                assert below is not None  # every header here links down to genesis
                start = below
        return compute_next_target(self.params, height, parent.target, start.timestamp,
                                   parent.timestamp)

    def _header(self, block_id: Hash) -> BlockHeader | None:
        return self.headers.get(block_id) or self.store.get_header(block_id)

    def _stored_invalid(self, block_id: Hash) -> bool:
        entry = self.store.get_entry(block_id)
        return entry is not None and entry.status >= STATUS_INVALID

    # -- blocks ----------------------------------------------------------------------------

    def requests(self, peers: list[Peer], now: float | None = None) -> dict[Peer, list[Hash]]:
        """Blocks to ask each peer for now: lowest first, within the window, from peers
        that hold them, up to `per_peer` in flight each."""
        now = time.monotonic() if now is None else now
        load = {p.id: 0 for p in peers}
        for request in self.in_flight.values():
            if request.peer.id in load:
                load[request.peer.id] += 1
        by_id = {p.id: p for p in peers}
        limit = self.store.height + self.window
        out: dict[Peer, list[Hash]] = {}
        if sum(self.sizes.values()) >= self.max_arrived_bytes:
            return out  # memory's worth of blocks wait for their parents: add those first
        wanted = sorted((h.height, i) for i, h in self.headers.items()
                        if h.height <= limit and i not in self.in_flight
                        and i not in self.arrived and i not in self.adding
                        and self.store.get_entry(i) is None)
        for _, block_id in wanted:
            holders = [by_id[i] for i in self.holders.get(block_id, ()) if i in by_id
                       and load[i] < self.per_peer and by_id[i].alive]
            if not holders:
                continue
            peer = min(holders, key=lambda p: load[p.id])
            load[peer.id] += 1
            self.in_flight[block_id] = _Request(peer, now)
            out.setdefault(peer, []).append(block_id)
        return out

    def on_block(self, peer: Peer, block: Block, size: int,
                 now: float | None = None) -> bool:
        """Take a block of `size` bytes that arrived; False when we did not ask `peer`
        for it."""
        block_id = compute_block_id(block.header)
        request = self.in_flight.get(block_id)
        if request is None or request.peer is not peer:
            return False
        del self.in_flight[block_id]
        self.arrived[block_id] = (block, peer)
        self.sizes[block_id] = size
        self.delivered[peer.id] = time.monotonic() if now is None else now
        return True

    def not_found(self, peer: Peer, block_id: Hash) -> None:
        """The peer does not have a block we asked it for: ask someone else."""
        request = self.in_flight.get(block_id)
        if request is not None and request.peer is peer:
            del self.in_flight[block_id]
            self.holders.get(block_id, set()).discard(peer.id)

    def next_ready(self) -> tuple[Block, Peer] | None:
        """The lowest arrived block whose parent is stored, to be added next."""
        ready = [(block.header.height, block_id) for block_id, (block, _) in self.arrived.items()
                 if self.store.get_entry(block.header.prev_id) is not None]
        if not ready:
            return None
        block_id = min(ready)[1]
        self.adding.add(block_id)
        return self.arrived.pop(block_id)

    def done(self, block_id: Hash) -> None:
        """A block was added (or turned out to be known): it needs nothing more."""
        self.adding.discard(block_id)
        self.sizes.pop(block_id, None)
        self.headers.pop(block_id, None)
        self.holders.pop(block_id, None)

    def drop(self, block_id: Hash) -> None:
        """A block could not be checked (its artifacts were not to be had): forget it,
        so that a later announcement starts over."""
        self.done(block_id)
        self._drop_descendants(block_id)

    def reject(self, block_id: Hash, *, convicted: bool = False) -> None:
        """A block (or its header) is invalid: forget it and every header built on it.
        `convicted`: by a private audit or fraud proof, which honest peers can miss."""
        (self.convicted if convicted else self.invalid).add(block_id)
        self.done(block_id)
        for descendant in self._drop_descendants(block_id):
            (self.convicted if convicted else self.invalid).add(descendant)

    def _drop_descendants(self, *block_ids: Hash) -> list[Hash]:
        """Forget every header built on `block_ids` (one pass over the tree, however many)."""
        children: dict[Hash, list[Hash]] = {}
        for i, h in self.headers.items():
            children.setdefault(h.prev_id, []).append(i)
        dropped, stack = [], [c for i in block_ids for c in children.get(i, ())]
        while stack:
            child = stack.pop()
            stack += children.get(child, ())
            self.done(child)
            if self.in_flight.pop(child, None) is not None:
                self.cancelled.add(child)
            self.arrived.pop(child, None)
            dropped.append(child)
        return dropped

    # -- peers -----------------------------------------------------------------------------

    def stallers(self, now: float | None = None) -> list[Peer]:
        """Peers with blocks in flight that have delivered none for the stall timeout
        (counted from the request, or from its last block: a peer sending big blocks
        one after the other is slow for each, not stalling)."""
        now = time.monotonic() if now is None else now
        late = {r.peer for r in self.in_flight.values()
                if now - max(r.sent, self.delivered.get(r.peer.id, 0.0)) > self.stall_timeout}
        return list(late)

    def late_headers(self, peers: dict[int, Peer], now: float | None = None) -> list[Peer]:
        now = time.monotonic() if now is None else now
        return [peers[i] for i, sent in self.asked_headers.items()
                if i in peers and now - sent > self.stall_timeout]

    def forget_peer(self, peer: Peer) -> None:
        """A peer left: its requests go back in the queue, and it holds nothing."""
        self.asked_headers.pop(peer.id, None)
        self.delivered.pop(peer.id, None)
        for block_id in [i for i, r in self.in_flight.items() if r.peer is peer]:
            del self.in_flight[block_id]
        for holders in self.holders.values():
            holders.discard(peer.id)
        # Headers nobody else has sent would hold the tree until a restart: drop them
        # with what builds on them; the catch-up asks the remaining peers again.
        orphans = [i for i, h in self.holders.items() if not h and i in self.headers
                   and i not in self.adding and i not in self.arrived]
        for block_id in orphans:
            self.done(block_id)
        self._drop_descendants(*orphans)
