"""Moving models, histories and checkpoints between nodes, in chunks (PROTOCOL.md §8, §11).

A verifier that lacks an artifact asks the peers that gave it the block or model
transaction, one after the other, for the artifact by id (`getmodel`; `getckpt` for
the leaf list or one checkpoint with its Merkle path). The bytes arrive in chunks by
offset; once whole they are decoded and checked against the id asked for before they
are stored (storage.artifacts refuses anything that does not hash to its key), so a
peer cannot plant a wrong artifact, only waste one request and be disconnected.

Serving: what is stored is served. A node that relays a block has at first only the
checkpoints its own audits needed (it fetches the rest of its recent blocks' once block
sync is idle, storage/retention.py), while the next verifier draws its own private
intervals, so a checkpoint asked for and not here is fetched from the peers this node
got the block from and then served ("serve-through"): every verifier can reach the
miner's full history however far away the miner is. Requests for the same artifact
share one download.
"""

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from consensus.checkpoints import MAX_TENSOR_BYTES, Checkpoint, History
from consensus.encoding import decode
from consensus.errors import DecodeError
from consensus.models import ModelBlob
from consensus.seal import Need
from p2p.messages import CHUNK_SIZE, HISTORY, CkptChunk, GetCkpt, GetModel, ModelChunk
from p2p.peer import Peer
from storage import schema
from storage.artifacts import ArtifactStore

log = logging.getLogger("dpodl.p2p")

# The largest whole artifact accepted, by kind: a model's and a checkpoint's tensors,
# plus their few small fields; a history of MAX_CHECKPOINTS leaves is well under 1 MiB.
MAX_ARTIFACT = {"model": MAX_TENSOR_BYTES + 4096, "checkpoint": 2 * MAX_TENSOR_BYTES + 8192,
                "history": 1 << 20}
ENCODED_CACHE = 8  # artifacts kept encoded for serving their next chunks
MIN_RATE = 256 << 10  # bytes/s below which an artifact's server counts as stalling
REQUESTS_PER_PEER = 8  # chunk requests out to one peer at once (it answers up to 16)

Chunk = ModelChunk | CkptChunk
Punish = Callable[[Peer, str], None]


class FetchFailed(Exception):
    """No peer could supply the artifact; `refused` are the peers that said they do not
    have it (rather than timing out or going away)."""

    def __init__(self, message: str, need: Need, refused: list[Peer]) -> None:
        super().__init__(message)
        self.need, self.refused = need, refused


def need_of(msg: GetModel | GetCkpt | Chunk) -> Need:
    """The artifact a request or chunk is about."""
    if isinstance(msg, GetModel | ModelChunk):
        return Need("model", msg.model_id)
    if msg.index == HISTORY:
        return Need("history", msg.ckpt_root)
    return Need("checkpoint", msg.ckpt_root, msg.index)


def request(need: Need, offset: int) -> GetModel | GetCkpt:
    if need.kind == "model":
        return GetModel(need.key, offset)
    return GetCkpt(need.key, HISTORY if need.index is None else need.index, offset)


def chunk(need: Need, offset: int, total: int, data: bytes) -> Chunk:
    if need.kind == "model":
        return ModelChunk(need.key, offset, total, data)
    return CkptChunk(need.key, HISTORY if need.index is None else need.index, offset, total, data)


def artifact_key(need: Need) -> bytes:
    """The database key of the artifact `need` names."""
    if need.kind == "model":
        return schema.model_key(need.key)
    if need.kind == "history":
        return schema.history_key(need.key)
    assert need.index is not None
    return schema.checkpoint_key(need.key, need.index)


def read_artifact(artifacts: ArtifactStore, need: Need) -> bytes | None:
    """The canonical bytes of the stored artifact `need` names, None if not stored: as
    stored (the store encodes what it checked), so serving costs a read, not a re-encode."""
    return artifacts.db.get(artifact_key(need))


class Fetcher:
    def __init__(self, artifacts: ArtifactStore, *, timeout: float, punish: Punish) -> None:
        self.artifacts, self.timeout, self._punish = artifacts, timeout, punish
        # A request's future gets its chunk, or None when the peer goes (forget_peer).
        self._waiting: dict[tuple[int, Need, int], asyncio.Future[Chunk | None]] = {}
        self._downloads: dict[Need, asyncio.Future[None]] = {}
        self._slots: dict[int, asyncio.Semaphore] = {}  # peer id → its request slots
        self._encoded: OrderedDict[Need, bytes] = OrderedDict()
        self.fetched = 0  # artifacts stored, for getnetworkinfo and tests

    # -- fetching ------------------------------------------------------------------------

    def have(self, need: Need) -> bool:
        return self.artifacts.db.has(artifact_key(need))

    async def fetch(self, needs: Sequence[Need], peers: Sequence[Peer]) -> None:
        """Fetch and store every artifact of `needs` (concurrently) from the first of
        `peers` that has it; FetchFailed when one could not be had."""
        await asyncio.gather(*(self._fetch_one(need, peers) for need in needs))

    async def _fetch_one(self, need: Need, peers: Sequence[Peer]) -> None:
        if need.kind == "checkpoint" and not self.have(Need("history", need.key)):
            # A checkpoint is checked against its history's leaves: that comes first.
            await self._fetch_one(Need("history", need.key), peers)
        download = self._downloads.get(need)
        if download is None:
            download = asyncio.ensure_future(self._download(need, list(peers)))
            self._downloads[need] = download
            download.add_done_callback(lambda _: self._finished(need, download))
        await asyncio.shield(download)

    def _finished(self, need: Need, download: asyncio.Future[None]) -> None:
        self._downloads.pop(need, None)
        if not download.cancelled():
            # Marked retrieved: each waiter has it raised, and one whose caller gave up
            # (gather stops at the first failure) must not leave it unread.
            download.exception()

    async def _download(self, need: Need, peers: list[Peer]) -> None:
        refused: list[Peer] = []
        for peer in peers:
            if not peer.alive:
                continue
            data = await self._download_from(peer, need)
            if not data:
                if data == b"":
                    refused.append(peer)
                continue
            try:
                await asyncio.to_thread(self._store, need, data)
            except (DecodeError, ValueError) as e:
                self._punish(peer, "bad-artifact")
                log.info("%r served a bad %s: %s", peer, need.kind, e)
                continue
            self.fetched += 1
            return
        raise FetchFailed(f"no peer supplied {need.kind} {need.key.hex()}", need, refused)

    async def _download_from(self, peer: Peer, need: Need) -> bytes | None:
        """The artifact's bytes from `peer`; b"" when it says it has not got them, None
        when it is too slow, gone, or served something wrong."""
        parts: list[bytes] = []
        offset, total = 0, None
        deadline = None  # once the size is known: the timeout plus MIN_RATE for the bytes
        slots = self._slots.setdefault(peer.id, asyncio.Semaphore(REQUESTS_PER_PEER))
        while total is None or offset < total:
            key = (peer.id, need, offset)
            async with slots:
                if not peer.alive:
                    return None
                future = self._waiting[key] = asyncio.get_running_loop().create_future()
                peer.send(request(need, offset))
                try:
                    async with asyncio.timeout(self.timeout):
                        piece = await future
                except TimeoutError:
                    peer.close(f"stalled: no {need.kind} chunk in {self.timeout:.0f}s")
                    return None
                finally:
                    self._waiting.pop(key, None)
            if piece is None:
                return None  # the peer went away
            if piece.total == 0:
                return b""
            if total is None:
                total = piece.total
                if total > MAX_ARTIFACT[need.kind]:
                    self._punish(peer, "oversize-artifact")
                    return None
                deadline = time.monotonic() + self.timeout + total / MIN_RATE
            elif deadline is not None and time.monotonic() > deadline:
                peer.close(f"stalled: {need.kind} slower than {MIN_RATE >> 10} KiB/s")
                return None
            if piece.total != total or not piece.data or offset + len(piece.data) > total:
                self._punish(peer, "bad-chunk")
                return None
            parts.append(piece.data)
            offset += len(piece.data)
        return b"".join(parts)

    def forget_peer(self, peer: Peer) -> None:
        """A peer left: what was asked of it will not come."""
        self._slots.pop(peer.id, None)
        for key in [k for k in self._waiting if k[0] == peer.id]:
            future = self._waiting.pop(key)
            if not future.done():
                future.set_result(None)

    def on_chunk(self, peer: Peer, piece: Chunk) -> bool:
        """Hand a chunk to its request; False when nothing asked for it."""
        future = self._waiting.pop((peer.id, need_of(piece), piece.offset), None)
        if future is None or future.done():
            return False
        future.set_result(piece)
        return True

    def _store(self, need: Need, data: bytes) -> None:
        if need.kind == "model":
            self.artifacts.add_model(need.key, decode(ModelBlob, data))
        elif need.kind == "history":
            self.artifacts.add_history(need.key, decode(History, data))
        else:
            ckpt = decode(Checkpoint, data)
            if ckpt.leaf.index != need.index:
                raise ValueError(f"checkpoint {ckpt.leaf.index} for {need.index}")
            self.artifacts.add_checkpoint(need.key, ckpt)

    # -- serving -------------------------------------------------------------------------

    async def serve(self, peer: Peer, msg: GetModel | GetCkpt, sources: Sequence[Peer]) -> None:
        """Answer a chunk request: from the store, or fetched through from `sources`."""
        need = need_of(msg)
        data = await self._encoding(need)
        if data is None and sources:
            with contextlib.suppress(FetchFailed):
                await self.fetch([need], [p for p in sources if p is not peer])
            data = await self._encoding(need)
        if data is None or msg.offset >= len(data):
            peer.send(chunk(need, msg.offset, 0, b""))
            return
        peer.send(chunk(need, msg.offset, len(data), data[msg.offset:msg.offset + CHUNK_SIZE]))

    async def _encoding(self, need: Need) -> bytes | None:
        """The artifact's canonical bytes, kept a while for the requests of its next chunks."""
        data = self._encoded.get(need)
        if data is not None:
            self._encoded.move_to_end(need)
            return data
        data = await asyncio.to_thread(read_artifact, self.artifacts, need)
        if data is not None:
            self._encoded[need] = data
            if len(self._encoded) > ENCODED_CACHE:
                self._encoded.popitem(last=False)
        return data
