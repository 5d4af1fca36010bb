"""Artifact fetching (p2p.fetch) between in-memory nodes: a Fetcher over an ArtifactStore
on LevelDB per node, connected by real Peers over socketpairs, with the artifacts of a
real block solution mined on the digits task.

Each node's reader task does what p2p.network does with the four artifact messages:
requests go to `Fetcher.serve` (in a task of their own, with the node's `sources` to
fetch through), chunks to `Fetcher.on_chunk`, and a chunk nobody asked for is
misbehaviour. A node can be scripted instead: silent, or answering what a test says.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from consensus.blocks import compute_block_id
from consensus.checkpoints import History
from consensus.difficulty import compute_mtx_target
from consensus.encoding import Hash, encode, tagged_hash
from consensus.models import ModelBlob
from consensus.params import genesis_block
from consensus.seal import Need
from mining.miner import Job, Solution, mine
from mining.trainer import DeviceData
from p2p import fetch as fetch_module
from p2p.fetch import (
    MAX_ARTIFACT,
    REQUESTS_PER_PEER,
    Chunk,
    Fetcher,
    FetchFailed,
    chunk,
    read_artifact,
)
from p2p.framing import ConnectionClosed, FrameError
from p2p.messages import HISTORY, CkptChunk, GetCkpt, GetModel, ModelChunk
from p2p.peer import Peer
from storage.artifacts import ArtifactStore
from storage.db import Database
from tests.builder import MINER
from tests.forge import EASY
from tests.test_p2p_peer import SLOW, Wires

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_CHUNK = 4096
Request = GetModel | GetCkpt
Answer = Callable[[Request], Chunk | None]  # None: say nothing


@pytest.fixture(scope="module")
def solution(data: DeviceData) -> Solution:
    """A block solution found by the real miner on the genesis of a chain where t2 is
    the largest target, so the first PreHash draw that trains past s_min is a block."""
    genesis = genesis_block(EASY).header
    job = Job(EASY, compute_block_id(genesis), EASY.genesis_task, genesis.target,
              compute_mtx_target(EASY, genesis.target), MINER.pubkey)
    *_, found = mine(job, data, lambda: False)
    assert found.kind == "block" and len(found.tensors) >= 4
    return found


def model_need(sol: Solution) -> Need:
    return Need("model", sol.proof.model_id)


def history_need(sol: Solution) -> Need:
    return Need("history", sol.proof.ckpt_root)


def ckpt_need(sol: Solution, index: int) -> Need:
    return Need("checkpoint", sol.proof.ckpt_root, index)


def encoded(sol: Solution, need: Need) -> bytes:
    if need.kind == "model":
        return encode(sol.model)
    if need.kind == "history":
        return encode(sol.history)
    assert need.index is not None
    return encode(sol.checkpoint(need.index))


def stored(node: "Node", need: Need) -> bytes | None:
    """The canonical bytes of what `node` holds under `need`."""
    return read_artifact(node.artifacts, need)


class Node:
    """An artifact store, its fetcher, and what went over its connections."""

    def __init__(self, name: str, path: Path, timeout: float) -> None:
        self.name = name
        self.db = Database(path / name)
        self.artifacts = ArtifactStore(self.db)
        self.fetcher = Fetcher(self.artifacts, timeout=timeout, punish=self._punish)
        self.punished: list[tuple[Peer, str]] = []
        self.asked: list[Request] = []  # requests it received
        self.chunks: list[Chunk] = []  # chunks it received
        self.sources: list[Peer] = []  # whom it fetches through when asked for what it lacks
        self.answer: Answer | None = None  # None: serve honestly
        self.tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return self.name

    def _punish(self, peer: Peer, reason: str) -> None:
        if peer.alive:
            self.punished.append((peer, reason))
            peer.close(f"misbehaved: {reason}")

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def read(self, peer: Peer) -> None:
        try:
            await self._read(peer)
        finally:
            self.fetcher.forget_peer(peer)  # as the network does when a connection ends

    async def _read(self, peer: Peer) -> None:
        while peer.alive:
            try:
                msg = await peer.receive(30.0)
            except ConnectionClosed:
                peer.close("closed by peer")
                return
            except (FrameError, OSError) as e:
                peer.close(f"read: {e}")
                return
            if isinstance(msg, GetModel | GetCkpt):
                self.asked.append(msg)
                if self.answer is None:
                    sources = [p for p in self.sources if p.alive and p is not peer]
                    self.spawn(self.fetcher.serve(peer, msg, sources))
                elif (reply := self.answer(msg)) is not None:
                    peer.send(reply)
            elif isinstance(msg, ModelChunk | CkptChunk):
                self.chunks.append(msg)
                if not self.fetcher.on_chunk(peer, msg):
                    self._punish(peer, "unrequested-data")

    def have(self, need: Need) -> bool:
        return self.fetcher.have(need)

    async def fetch(self, needs: list[Need], peers: list[Peer]) -> None:
        await asyncio.wait_for(self.fetcher.fetch(needs, peers), SLOW * 2)


class Net:
    def __init__(self, path: Path, wires: Wires) -> None:
        self.path, self.wires = path, wires
        self.nodes: list[Node] = []

    def node(self, name: str, *, timeout: float = SLOW, has: Solution | None = None) -> Node:
        node = Node(name, self.path, timeout)
        if has is not None:
            has.publish(node.artifacts)
        self.nodes.append(node)
        return node

    async def link(self, x: Node, y: Node) -> tuple[Peer, Peer]:
        """Connect x and y: (x's peer for y, y's peer for x)."""
        xy, yx = await self.wires.peers()
        x.spawn(x.read(xy))
        y.spawn(y.read(yx))
        return xy, yx

    async def close(self) -> None:
        tasks = [t for node in self.nodes for t in node.tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, FetchFailed):
                await task
        await self.wires.close()
        for node in self.nodes:
            node.db.close()


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    n = Net(tmp_path, Wires())
    yield n
    await n.close()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(fetch_module, "CHUNK_SIZE", SMALL_CHUNK)
    return SMALL_CHUNK


def offsets(requests: list[Request]) -> list[int]:
    return [r.offset for r in requests]


# --- fetching ---------------------------------------------------------------------------

async def test_fetch_model_history_and_checkpoint(net: Net, solution: Solution) -> None:
    a, c = net.node("a", has=solution), net.node("c")
    ca, _ = await net.link(c, a)
    root = solution.proof.ckpt_root
    await c.fetch([model_need(solution), history_need(solution)], [ca])
    assert c.artifacts.get_model(solution.proof.model_id) == solution.model
    assert c.artifacts.get_history(root) == solution.history
    assert not c.have(ckpt_need(solution, 2))
    await c.fetch([ckpt_need(solution, 2)], [ca])
    assert c.artifacts.get_checkpoint(root, 2) == solution.checkpoint(2)
    assert c.artifacts.get_checkpoint(root, 1) is None  # only what was asked for
    assert c.fetcher.fetched == 3
    assert {type(r) for r in a.asked} == {GetModel, GetCkpt}
    assert sorted(r.index for r in a.asked if isinstance(r, GetCkpt)) == [2, HISTORY]
    assert not a.punished and not c.punished and ca.alive


async def test_large_artifact_arrives_in_chunks(net: Net, solution: Solution,
                                                small_chunks: int) -> None:
    a, c = net.node("a", has=solution), net.node("c")
    ca, _ = await net.link(c, a)
    need = model_need(solution)
    size = len(encoded(solution, need))
    n = -(-size // small_chunks)
    assert n >= 3
    await c.fetch([need], [ca])
    assert c.artifacts.get_model(solution.proof.model_id) == solution.model
    assert offsets(a.asked) == [i * small_chunks for i in range(n)]
    assert [len(ch.data) for ch in c.chunks] == [small_chunks] * (n - 1) + [
        size - (n - 1) * small_chunks]
    assert {ch.total for ch in c.chunks} == {size}


async def test_peer_without_it_says_so_and_the_next_is_asked(net: Net,
                                                             solution: Solution) -> None:
    a, b, c = net.node("a", has=solution), net.node("b"), net.node("c")
    ca, _ = await net.link(c, a)
    cb, _ = await net.link(c, b)
    need = model_need(solution)
    await c.fetch([need], [cb, ca])
    assert len(b.asked) == 1 and len(a.asked) == 1
    assert [(type(ch), ch.total) for ch in c.chunks][0] == (ModelChunk, 0)  # b's answer
    assert c.have(need)
    assert cb.alive and not c.punished  # not having it is no offence


async def test_fetch_fails_when_no_peer_has_it(net: Net, solution: Solution) -> None:
    b, d, c = net.node("b"), net.node("d"), net.node("c")
    cb, _ = await net.link(c, b)
    cd, _ = await net.link(c, d)
    need = ckpt_need(solution, 1)
    with pytest.raises(FetchFailed) as failed:
        await c.fetch([need], [cb, cd])
    assert failed.value.need.kind == "history"  # asked first: the checkpoint needs it
    assert failed.value.refused == [cb, cd]  # both said they lack it
    assert len(b.asked) == len(d.asked) == 1
    with pytest.raises(FetchFailed):
        await c.fetch([need], [])
    cb.close("gone")
    with pytest.raises(FetchFailed):  # a closed peer is not asked
        await c.fetch([need], [cb])
    assert len(b.asked) == 1
    assert not c.have(need) and c.fetcher.fetched == 0 and cd.alive


def _lie(sol: Solution, need: Need) -> bytes:
    """Bytes that decode as the kind of `need` but are not the artifact it names."""
    if need.kind == "model":
        params = bytearray(sol.model.params)
        params[0] ^= 1
        return encode(ModelBlob(sol.model.arch, bytes(params)))
    if need.kind == "history":
        return encode(History(sol.history.leaves[:-1]))
    assert need.index is not None
    if need.index == 2:  # another of its checkpoints
        return encode(sol.checkpoint(1))
    ckpt = sol.checkpoint(need.index)  # its own leaf and path, other tensors
    return encode(replace(ckpt, momentum=ckpt.params))


@pytest.mark.parametrize("kind", ["model", "history", "other-checkpoint", "other-tensors",
                                  "garbage"])
async def test_wrong_bytes_are_punished_and_not_stored(net: Net, solution: Solution,
                                                       kind: str) -> None:
    need = {"model": model_need(solution), "history": history_need(solution),
            "other-checkpoint": ckpt_need(solution, 2), "other-tensors": ckpt_need(solution, 3),
            "garbage": model_need(solution)}[kind]
    data = b"\x93\x01\x02" if kind == "garbage" else _lie(solution, need)
    assert data != encoded(solution, need)
    a, liar, c = net.node("a", has=solution), net.node("liar"), net.node("c")
    liar.answer = lambda r: chunk(need, r.offset, len(data), data[r.offset:])
    if need.kind == "checkpoint":  # a verifier holds the leaves before it audits
        c.artifacts.add_history(solution.proof.ckpt_root, solution.history)
    cl, _ = await net.link(c, liar)
    ca, _ = await net.link(c, a)
    with pytest.raises(FetchFailed):
        await c.fetch([need], [cl])
    assert c.punished == [(cl, "bad-artifact")]
    assert cl.close_reason == "misbehaved: bad-artifact"
    assert not c.have(need) and c.fetcher.fetched == 0
    # The liar is gone; the next fetch goes past it to an honest peer.
    await c.fetch([need], [cl, ca])
    assert c.have(need) and c.punished == [(cl, "bad-artifact")]
    assert stored(c, need) == encoded(solution, need)


def _bad_chunks(need: Need) -> dict[str, Answer]:
    history_cap = MAX_ARTIFACT["history"]
    return {
        "oversize-total": lambda r: chunk(need, r.offset, history_cap + 1, b"x" * 10),
        "empty-data": lambda r: chunk(need, r.offset, 10, b""),
        "past-total": lambda r: chunk(need, r.offset, 5, b"x" * 10),
        "total-changes": lambda r: chunk(need, r.offset, 20 + r.offset, b"x" * 10),
    }


@pytest.mark.parametrize(("case", "reason"), [
    ("oversize-total", "oversize-artifact"), ("empty-data", "bad-chunk"),
    ("past-total", "bad-chunk"), ("total-changes", "bad-chunk")])
async def test_bad_chunks_are_punished(net: Net, solution: Solution, case: str,
                                       reason: str) -> None:
    need = history_need(solution)
    liar, c = net.node("liar"), net.node("c")
    liar.answer = _bad_chunks(need)[case]
    cl, _ = await net.link(c, liar)
    with pytest.raises(FetchFailed):
        await c.fetch([need], [cl])
    assert c.punished == [(cl, reason)] and not c.have(need)


async def test_concurrent_fetches_share_one_download(net: Net, solution: Solution,
                                                     small_chunks: int) -> None:
    a, c = net.node("a", has=solution), net.node("c")
    ca, _ = await net.link(c, a)
    need = ckpt_need(solution, 1)
    c.artifacts.add_history(solution.proof.ckpt_root, solution.history)
    n = -(-len(encoded(solution, need)) // small_chunks)
    await asyncio.gather(c.fetch([need], [ca]), c.fetch([need], [ca]),
                         c.fetch([need, need], [ca]))
    assert offsets(a.asked) == [i * small_chunks for i in range(n)]  # each chunk once
    assert c.fetcher.fetched == 1 and c.have(need)
    assert not c.fetcher._downloads  # nothing left behind
    await c.fetch([need], [ca])  # and a later fetch is a new download, not a stale one
    assert c.fetcher.fetched == 2 and len(a.asked) == 2 * n


async def test_serve_through(net: Net, solution: Solution, small_chunks: int) -> None:
    """B relayed the block and kept the leaves, not the checkpoint C's audit drew: C asks
    B, B fetches it from A (whom it got the block from), stores it and serves it."""
    root = solution.proof.ckpt_root
    a, b, c = net.node("a", has=solution), net.node("b"), net.node("c")
    b.artifacts.add_history(root, solution.history)
    c.artifacts.add_history(root, solution.history)
    ba, _ = await net.link(b, a)
    cb, _ = await net.link(c, b)
    b.sources = [ba]
    need = ckpt_need(solution, 3)
    n = -(-len(encoded(solution, need)) // small_chunks)
    await c.fetch([need], [cb])
    assert c.artifacts.get_checkpoint(root, 3) == solution.checkpoint(3)
    assert b.artifacts.get_checkpoint(root, 3) == solution.checkpoint(3)  # each hop stores it
    assert b.artifacts.get_checkpoint(root, 2) is None  # and only what was asked for
    assert offsets(b.asked) == offsets(a.asked) == [i * small_chunks for i in range(n)]
    assert all(isinstance(r, GetCkpt) and r.index == 3 for r in a.asked)
    assert b.fetcher.fetched == c.fetcher.fetched == 1
    assert not (a.punished or b.punished or c.punished)


async def test_serve_through_with_nobody_to_ask_says_not_available(
        net: Net, solution: Solution) -> None:
    b, d, c = net.node("b"), net.node("d"), net.node("c")
    bd, _ = await net.link(b, d)
    cb, _ = await net.link(c, b)
    b.sources = [bd]  # d has nothing either
    need = model_need(solution)
    with pytest.raises(FetchFailed):
        await c.fetch([need], [cb])
    assert len(d.asked) == 1 and len(b.asked) == 1
    assert c.chunks[-1].total == 0 and cb.alive and bd.alive


# --- chunks and stalls ----------------------------------------------------------------

async def test_chunk_not_asked_for_is_refused(net: Net, solution: Solution) -> None:
    a, s, c = net.node("a", has=solution), net.node("s"), net.node("c")
    s.answer = lambda r: None  # s never answers: the test plays its part
    ca, ac = await net.link(c, a)
    cs, _ = await net.link(c, s)
    need = model_need(solution)
    data = encoded(solution, need)
    whole = chunk(need, 0, len(data), data)
    assert not c.fetcher.on_chunk(cs, whole)  # nothing asked yet
    fetching = asyncio.ensure_future(c.fetch([need], [cs]))
    for _ in range(200):
        if s.asked:
            break
        await asyncio.sleep(0.005)
    assert offsets(s.asked) == [0]
    assert not c.fetcher.on_chunk(ca, whole)  # asked of s, not of a
    assert not c.fetcher.on_chunk(cs, chunk(need, 10, len(data), data[10:]))  # other offset
    assert not c.fetcher.on_chunk(cs, ModelChunk(tagged_hash("other"), 0, 4, b"abcd"))
    assert not c.fetcher.on_chunk(cs, CkptChunk(Hash(need.key), HISTORY, 0, 4, b"abcd"))
    assert c.fetcher.on_chunk(cs, whole)
    await fetching
    assert c.have(need) and not c.fetcher.on_chunk(cs, whole)  # answered already
    # Over the wire, an unasked chunk is misbehaviour (the reader above, as the network).
    ac.send(whole)
    await asyncio.wait_for(ca.wait_closed(), SLOW)
    assert c.punished == [(ca, "unrequested-data")]


async def test_stalled_peer_is_closed_after_the_timeout(net: Net, solution: Solution) -> None:
    timeout = 0.3
    a, s, c = net.node("a", has=solution), net.node("s"), net.node("c", timeout=timeout)
    s.answer = lambda r: None
    cs, _ = await net.link(c, s)
    ca, _ = await net.link(c, a)
    need = model_need(solution)
    start = time.monotonic()
    await c.fetch([need], [cs, ca])
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + 1.0
    assert cs.close_reason is not None and cs.close_reason.startswith("stalled")
    assert not c.punished  # slow is not malicious
    assert c.have(need) and len(a.asked) == 1


async def test_peer_that_leaves_mid_fetch_is_not_waited_for(net: Net,
                                                            solution: Solution) -> None:
    a, s, c = net.node("a", has=solution), net.node("s"), net.node("c", timeout=30.0)
    cs, sc = await net.link(c, s)
    ca, _ = await net.link(c, a)

    def leave(r: Request) -> None:
        sc.close("leaving")
        return None

    s.answer = leave
    start = time.monotonic()
    await c.fetch([model_need(solution)], [cs, ca])
    assert time.monotonic() - start < SLOW
    assert cs.close_reason == "closed by peer" and c.have(model_need(solution))
    assert not c.punished


async def test_requests_to_one_peer_are_bounded(net: Net) -> None:
    s, c = net.node("s"), net.node("c")
    s.answer = lambda r: None  # the test answers for s
    cs, _ = await net.link(c, s)
    needs = [Need("model", tagged_hash("model", i)) for i in range(REQUESTS_PER_PEER + 4)]
    fetching = asyncio.ensure_future(c.fetch(needs, [cs]))

    async def settle(n: int) -> None:
        for _ in range(200):
            if len(s.asked) >= n:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # time for any request beyond the bound to show up
        assert len(s.asked) == n

    await settle(REQUESTS_PER_PEER)
    first = s.asked[0]
    assert isinstance(first, GetModel)
    assert c.fetcher.on_chunk(cs, ModelChunk(first.model_id, 0, 0, b""))  # "not here"
    await settle(REQUESTS_PER_PEER + 1)  # an answered request frees its slot
    assert len({r.model_id for r in s.asked}) == len(s.asked)  # distinct artifacts
    cs.close("done")  # the rest end with the peer
    with pytest.raises(FetchFailed):
        await fetching
    assert not c.punished


# --- found in review: a peer that served a checkpoint early was punished ------------------

async def test_checkpoint_fetched_before_its_history_does_not_punish_the_server(
        net: Net, solution: Solution) -> None:
    a, c = net.node("a", has=solution), net.node("c")
    ca, _ = await net.link(c, a)
    with contextlib.suppress(FetchFailed):
        await c.fetch([ckpt_need(solution, 2)], [ca])
    assert not c.punished and ca.alive


async def test_a_server_that_trickles_chunks_is_closed_at_the_rate_deadline(
        net: Net, solution: Solution, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk in time, but the whole slower than MIN_RATE allows: stalling."""
    small_chunks = 1024
    monkeypatch.setattr(fetch_module, "CHUNK_SIZE", small_chunks)
    monkeypatch.setattr(fetch_module, "MIN_RATE", 16 * small_chunks)  # 16 chunks a second
    a, s, c = net.node("a", has=solution), net.node("s"), net.node("c", timeout=0.5)
    cs, sc = await net.link(c, s)
    ca, _ = await net.link(c, a)
    need = model_need(solution)
    data = encoded(solution, need)
    assert len(data) > 20 * small_chunks  # enough chunks to run past the deadline
    loop = asyncio.get_running_loop()
    s.answer = lambda r: loop.call_later(0.2, sc.send, chunk(
        need, r.offset, len(data), data[r.offset:r.offset + small_chunks])) and None
    await c.fetch([need], [cs, ca])
    assert cs.close_reason is not None and "slower than" in cs.close_reason
    assert not c.punished and c.have(need)  # slow is not malicious; a served it


async def test_a_staller_is_not_counted_as_refusing(net: Net, solution: Solution) -> None:
    """Only a peer that answers "not here" refuses; one that says nothing stalls."""
    s, c = net.node("s"), net.node("c", timeout=0.3)
    s.answer = lambda r: None
    cs, _ = await net.link(c, s)
    with pytest.raises(FetchFailed) as failed:
        await c.fetch([model_need(solution)], [cs])
    assert failed.value.refused == [] and not cs.alive
