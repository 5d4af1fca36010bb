"""A fraud proof travels: two in-process nodes over real TCP and LevelDB (PROTOCOL.md §8.8).

Node x audits only the public intervals (q_local 0), so it takes a block whose forged
interval hides among the rest, and an honest rival at the same height arrives second.
Node y audits every interval, catches the forgery when it syncs from x, and sends the
fraud proof; x checks it by replaying that one interval, drops the forged block and
moves to the honest one, which y then takes too. Both run on forge.EASY (the dev chain
with t2 at its maximum), so that the forger's block costs no lottery.
"""

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from consensus.blocks import compute_block_id
from consensus.encoding import encode
from consensus.params import genesis_block
from consensus.seal import MissingArtifact
from consensus.transactions import ModelTx, compute_tx_id, sign_tx
from mining.htoa import compute_htoa
from mining.miner import Solution
from mining.trainer import DeviceData
from mining.verifier import Verdict
from node.config import Config
from node.node import Node
from p2p.framing import ConnectionClosed, FrameError, encode_frame, read_frame
from p2p.handshake import handshake
from p2p.messages import (
    CHUNK_SIZE,
    MAX_CONTROL,
    PROTOCOL_VERSION,
    CkptChunk,
    FraudNotice,
    GetCkpt,
    Version,
    decode_payload,
    encode_payload,
)
from storage.schema import STATUS_INVALID
from tests.forge import EASY, TASK, commit, count_correct, find_nonce, sign_block, train
from tests.test_verifier import ALL, FORGER, HONEST, Run, forge_middle

pytestmark = pytest.mark.usefixtures("one_thread")

GENESIS = genesis_block(EASY).header
GENESIS_ID = compute_block_id(GENESIS)
TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def honest_solution(data: DeviceData) -> Solution:
    """An honest draw of HONEST's, trained until it is accurate enough for a block."""
    nonce, h1 = find_nonce(GENESIS_ID, HONEST.pubkey)
    draw = compute_htoa(TASK, h1)
    states = [(draw.init, np.zeros_like(draw.init))]
    while len(states) < 3 or count_correct(draw.arch, states[-1][0], data) < TASK.t_acc:
        states += train(draw, data, states[-1], (len(states) - 1) * TASK.k, 1)
    return commit(GENESIS_ID, HONEST.pubkey, nonce, draw.arch, states, data)


def forged_solution(data: DeviceData) -> Solution:
    """FORGER's draw with interval 4 nudged off its replay: neither the last interval nor
    the largest update, so only a private audit finds it."""
    nonce, h1 = find_nonce(GENESIS_ID, FORGER.pubkey)
    draw = compute_htoa(TASK, h1)
    init = (draw.init, np.zeros_like(draw.init))
    run = Run(nonce, draw, [init, *train(draw, data, init, 0, 8)])
    return forge_middle(run, 4, "nudged", data, understate=False)


def config(path: Path, peers: tuple[tuple[str, int], ...] = ()) -> Config:
    return Config(network="dev", datadir=path, rpc_bind="127.0.0.1", rpc_port=1,
                  p2p_bind="127.0.0.1", p2p_port=free_port(), listen=True, peers=peers,
                  mine=False, miner_key=None, device="cpu", datasets=None, rpc_auth=(),
                  log_level="info")


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    nodes: list[Node] = []

    async def start_node(name: str, q_local: int, *peers: Node) -> Node:
        node = Node(config(tmp_path / name, tuple(("127.0.0.1", p.config.p2p_port)
                                                  for p in peers)))
        node.params = EASY  # before open(): the store and the network follow it
        node.open()
        node.engine.q_local = q_local
        nodes.append(node)
        await node.start_network()
        return node

    yield start_node
    for node in nodes:
        await node.close()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_fraud_proof_drops_the_forged_block_on_the_node_that_took_it(start, data):
    forged, honest = forged_solution(data), honest_solution(data)
    now = int(time.time())
    forged_block = sign_block(GENESIS, forged, FORGER, timestamp=now)
    honest_block = sign_block(GENESIS, honest, HONEST, timestamp=now)
    forged_id = compute_block_id(forged_block.header)
    honest_id = compute_block_id(honest_block.header)

    x = await start("x", 0)  # public audits only: the forgery passes
    # Published one at a time, as a miner does: each new tip drops the checkpoints of
    # what is neither a recent block nor being checked (the honest ones, had they been
    # published before the forged block connected).
    await x.on_chain_thread(forged.publish, x.artifacts)
    assert (await x.submit_block(forged_block)).status == "connected"
    await x.on_chain_thread(honest.publish, x.artifacts)
    assert (await x.submit_block(honest_block)).status == "stored"  # seen second
    assert x.store.tip_id == forged_id

    y = await start("y", ALL, x)  # audits every interval
    await wait_until(lambda: x.store.tip_id == honest_id, "x to drop the forged block")
    entry = x.store.get_entry(forged_id)
    assert entry is not None and entry.status >= STATUS_INVALID
    assert x.network is not None and x.network.stats.fraud_proofs == 1  # passed on once
    await wait_until(lambda: y.store.tip_id == honest_id, "y to take the honest block")
    assert y.store.get_entry(forged_id) is None  # never stored: it failed its audits
    assert y.network is not None and y.network.stats.fraud_proofs == 1
    assert len(x.network.peers) == len(y.network.peers) == 1  # nobody was punished
    assert y.network.stats.bans == x.network.stats.bans == 0


async def test_a_fraud_proof_that_does_not_hold_changes_nothing(start, data):
    honest = honest_solution(data)
    block = sign_block(GENESIS, honest, HONEST, timestamp=int(time.time()))
    x = await start("x", 0)
    await x.on_chain_thread(honest.publish, x.artifacts)
    await x.submit_block(block)
    # The fraud proof accuses an honest interval: it replays, so it proves nothing.
    assert await x.apply_fraud_proof(compute_block_id(block.header), 0) is Verdict.REFUTED
    assert x.store.tip_id == compute_block_id(block.header)
    assert await x.apply_fraud_proof(bytes(32), 0) is None  # unknown
    with pytest.raises(MissingArtifact):  # the accused has no such interval here
        await x.apply_fraud_proof(compute_block_id(block.header), len(honest.tensors))


@pytest.mark.parametrize("accuser", ["serves-the-honest-interval", "serves-nothing"])
async def test_a_false_fraud_notice_gets_its_sender_banned(start, data, accuser):
    """A peer accuses an honest block's first interval. x lacks the checkpoints, fetches
    them from the accuser, and finds the interval replays (or gets nothing): either way
    the accuser is banned and the block stays."""
    honest = honest_solution(data)
    block = sign_block(GENESIS, honest, HONEST, timestamp=int(time.time()))
    block_id, root = compute_block_id(block.header), honest.proof.ckpt_root
    x = await start("x", 0)
    await x.on_chain_thread(honest.publish, x.artifacts)
    await x.submit_block(block)
    x.artifacts.prune_checkpoints(root)  # a relay keeps only what it audited
    serves = accuser == "serves-the-honest-interval"
    streams = await asyncio.open_connection("127.0.0.1", x.config.p2p_port,
                                            local_addr=("127.0.0.2", 0))
    ours = Version(PROTOCOL_VERSION, GENESIS_ID, 0, 0, 7, b"/accuser/")
    await handshake(*streams, EASY, ours=ours, timeout=TIMEOUT, max_payload=MAX_CONTROL)
    streams[1].write(encode_frame(EASY.magic, *encode_payload(FraudNotice(block_id, 0))))
    asked = set()
    with contextlib.suppress(ConnectionClosed, FrameError):
        while True:  # answer x's requests until it hangs up
            kind, payload = await read_frame(streams[0], EASY.magic,
                                             max_payload=MAX_CONTROL, timeout=TIMEOUT)
            msg = decode_payload(kind, payload)
            if isinstance(msg, GetCkpt):
                asked.add(msg.index)
                raw = encode(honest.checkpoint(msg.index)) if serves else b""
                streams[1].write(encode_frame(EASY.magic, *encode_payload(CkptChunk(
                    root, msg.index, msg.offset, len(raw), raw[msg.offset:][:CHUNK_SIZE]))))
    assert asked >= {0, 1}  # both ends (the keeper of recent checkpoints asks for all)
    assert x.network is not None
    [(host, _, reason)] = x.network.book.bans()
    assert host == "127.0.0.2"
    assert reason == ("bad-fraud-proof" if serves else "fraud-proof-unbacked")
    assert x.store.tip_id == block_id


async def test_a_fraud_proof_against_a_mined_model_transaction_drops_its_block(start, data):
    """The accused is found through the transaction index, however deep its block."""
    forged, honest = forged_solution(data), honest_solution(data)
    mtx = sign_tx(ModelTx(GENESIS_ID, forged.proof, 0), FORGER)
    block = sign_block(GENESIS, honest, HONEST, timestamp=int(time.time()), txs=(mtx,))
    x = await start("x", 0)  # public audits only: the forged mtx passes
    for solution in (forged, honest):
        await x.on_chain_thread(solution.publish, x.artifacts)
    assert (await x.submit_block(block)).status == "connected"
    mtx_id = compute_tx_id(mtx)
    assert x.store.tx_block(mtx_id) == compute_block_id(block.header)
    assert await x.apply_fraud_proof(mtx_id, 0) is Verdict.REFUTED  # an honest interval
    assert x.store.tip_id == compute_block_id(block.header)
    assert await x.apply_fraud_proof(mtx_id, 4) is Verdict.HOLDS  # the forged one
    assert x.store.tip_id == GENESIS_ID and x.store.tx_block(mtx_id) is None
    assert mtx_id not in x.mempool  # not back in the pool with its block's other txs
