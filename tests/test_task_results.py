"""A task's useful output (PROTOCOL.md §2): when its span ends the node scores the span's
block models on the test split and records the best; plain torch, outside the project,
reproduces the recorded score from the exported file.

One in-process node on real LevelDB mines a dev chain whose genesis task lasts three
blocks and whose t2 is at its maximum (every checkpoint at T_acc is a block), with its
real miner process; the RPC methods are called directly.
"""

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from consensus.encoding import Hash, encode
from consensus.keys import PrivateKey
from consensus.params import COIN
from consensus.tasks import compute_task_id
from consensus.transactions import TaskTx, Transaction, sign_tx
from mining.datasets import DatasetError, compute_pixel_max
from mining.export import export_model
from mining.trainer import DataCache, compute_correct, load_model
from node.methods import Methods
from node.node import Node
from node.rpc import RpcError
from tests.forge import EASY
from tests.test_p2p_fraud import config, wait_until

SHORT = replace(EASY, genesis_task=replace(EASY.genesis_task, duration=3))
TASK = SHORT.genesis_task
TASK_ID = compute_task_id(TASK)
TIMEOUT = 120.0  # seconds for the exported model's check


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    node = Node(config(tmp_path / "n"))
    node.params = SHORT  # before open(): the store follows it
    node.open()
    await node.start_network()
    yield node
    await node.close()


async def mine_to(node: Node, height: int) -> int:
    """Mine to at least `height`; the height the chain stops at."""
    await node.start_mining()
    await wait_until(lambda: node.store.height >= height, f"height {height}")
    await node.stop_mining()
    settled = -1
    while settled != node.store.height:  # blocks found before the stop may be coming in
        settled = node.store.height
        await asyncio.sleep(0.5)
    return settled


def count_test_scores(node: Node, heights: range) -> dict[int, int]:
    """Each block model's test score, counted here from its stored weights."""
    images, labels = DataCache(None).splits(TASK.dataset).normalised("test")
    out = {}
    for height in heights:
        proof = node.store.get_header(node.store.main_chain_id(height)).proof
        blob = node.artifacts.get_model(proof.model_id)
        out[height] = int(compute_correct(load_model(blob), images, labels))
    return out


async def test_a_finished_span_yields_its_best_model_which_plain_torch_reproduces(node, tmp_path):
    rpc = Methods(node)
    with pytest.raises(RpcError, match="task-not-finished"):
        await rpc.gettaskresult()
    tip = await mine_to(node, 4)  # the span 1..3 has ended, and maybe more of them
    last = tip - tip % 3  # the end of the last span that has ended
    scores = count_test_scores(node, range(1, 4))
    result = await rpc.gettaskresult(TASK_ID.hex(), 2)  # the span that covers 2
    best_height = max(scores, key=lambda h: (
        scores[h], node.store.get_header(node.store.main_chain_id(h)).proof.n_correct, -h))
    best = node.store.get_header(node.store.main_chain_id(best_height)).proof
    assert (result["start"], result["end"], result["models_scored"]) == (1, 3, 3)
    assert result["height"] == best_height and result["model"] == best.model_id.hex()
    assert result["test_correct"] == scores[best_height] == max(scores.values())
    assert result["test_accuracy"] == scores[best_height] / TASK.dataset.test_size
    assert result["validation_correct"] == best.n_correct
    assert result["total_steps"] == (await rpc.getmodel(result["model"]))["total_steps"]
    latest = await rpc.gettaskresult()  # by default, the last span that ended
    assert (latest["start"], latest["end"]) == (last - 2, last)
    assert latest == result or last > 3
    with pytest.raises(RpcError, match="task-not-finished"):
        await rpc.gettaskresult(None, last + 1)  # the span in progress
    with pytest.raises(RpcError, match="Task not found"):
        await rpc.gettaskresult("11" * 32)

    # Every block of the span shows its model's test accuracy, and the task lists as
    # both active again and finished (its spans that ended, newest first), with results.
    for height, correct in scores.items():
        block = await rpc.getblock(node.store.main_chain_id(height).hex())
        assert block["proof"]["test_accuracy"] == correct / TASK.dataset.test_size
    listed = await rpc.listtasks()
    assert [(t["status"], t["start"]) for t in listed] == [("active", last + 1)] + [
        ("finished", start) for start in range(last - 2, 0, -3)]
    assert listed[-1]["result"] == result
    assert (await rpc.gettask(TASK_ID.hex()))["status"] == "active"

    # The file `dpodl model export` writes: plain torch in a fresh interpreter that
    # imports nothing of this project scores the raw test images exactly as recorded.
    path = tmp_path / "best.pt"
    export_model(node.artifacts.get_model(Hash(bytes.fromhex(result["model"]))),
                 compute_pixel_max("digits"), path)
    test = DataCache(None).splits(TASK.dataset).test
    np.save(tmp_path / "images.npy", test.images.numpy())
    np.save(tmp_path / "labels.npy", test.labels.numpy())
    script = ("import numpy, torch; m = torch.jit.load('best.pt'); "
              "x = torch.from_numpy(numpy.load('images.npy')); "
              "y = torch.from_numpy(numpy.load('labels.npy')); "
              "print(int((m(x).argmax(1) == y).sum()))")
    scored = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert scored.returncode == 0, scored.stderr
    assert int(scored.stdout) == result["test_correct"]


async def test_the_node_scores_a_span_when_it_ends_and_again_after_a_reorg(node):
    await mine_to(node, 3)
    await wait_until(lambda: node.scorer.current(1, node.store.spans()[0][1]) is not None,
                     "the span to be scored without being asked")
    first = node.scorer.current(1, node.store.spans()[0][1])
    assert first.end_block == node.store.main_chain_id(3)

    # Replace the span's last block: the result no longer stands, and the span is
    # scored again on the new chain once it ends there.
    await node.invalidate_block(first.end_block)
    assert node.store.height == 2 and node.scorer.current(1, node.store.spans()[0][1]) is None
    rpc = Methods(node)
    with pytest.raises(RpcError, match="task-not-finished"):
        await rpc.gettaskresult()
    await mine_to(node, 3)
    result = await rpc.gettaskresult()
    assert result["end"] == 3 and result["models_scored"] == 3
    again = node.scorer.current(1, node.store.spans()[0][1])
    assert again.end_block == node.store.main_chain_id(3) != first.end_block


class NoTestSplit:
    """A replayer whose node cannot read the task's dataset files."""

    def score(self, task, blobs) -> Future:
        future: Future = Future()
        future.set_exception(DatasetError("missing t10k-images-idx3-ubyte"))
        return future


async def test_a_node_that_cannot_read_the_test_split_says_so_and_records_nothing(node):
    real, node.scorer.replayer = node.scorer.replayer, NoTestSplit()
    await mine_to(node, 3)
    rpc = Methods(node)
    with pytest.raises(RpcError, match="dataset-unavailable: missing t10k") as err:
        await rpc.gettaskresult()
    assert err.value.code == -1
    assert node.scorer.results.get(1) is None
    node.scorer.replayer = real  # the files are back: asked again, it scores the span
    assert (await rpc.gettaskresult())["models_scored"] == 3


async def test_a_blocks_record_shows_its_reference_chain_and_total_steps(node):
    rpc = Methods(node)
    await mine_to(node, 6)
    mined = (await rpc.getmininginfo())["trainedsteps"][TASK_ID.hex()]
    own = 0
    chains = []
    for height in range(1, 7):
        proof = (await rpc.getblock(node.store.main_chain_id(height).hex()))["proof"]
        own += proof["steps"]
        links = proof["reference_chain"]
        chains.append(len(links))
        assert [link["model"] for link in links[:1]] == ([proof["reference_model"]]
                                                         if proof["reference_model"] else [])
        # Each history is its own steps on top of its reference's whole history.
        totals = [proof["total_steps"], *(link["total_steps"] for link in links), 0]
        steps = [proof["steps"], *(link["steps"] for link in links)]
        assert all(total - below == own_steps for total, below, own_steps
                   in zip(totals, totals[1:], steps, strict=False))
        assert all(link["onchain"] and link["height"] < height for link in links)
        assert [link["height"] for link in links] == sorted(
            (link["height"] for link in links), reverse=True)
    assert max(chains) >= 1, "no block referenced an earlier model"
    model = await rpc.getmodel(proof["model"])  # the last block's: the same history
    assert (model["steps"], model["total_steps"], model["reference_chain"]) == (
        proof["steps"], proof["total_steps"], proof["reference_chain"])
    assert own <= mined  # the miner trained every block's own steps, and more


PUBLISHER = PrivateKey(bytes([77]) * 32)
FUNDS = 1_000 * COIN


async def test_bad_task_transactions_are_refused_with_their_reasons_and_change_nothing(tmp_path):
    node = Node(config(tmp_path / "n"))
    node.params = replace(SHORT, allocations=((PUBLISHER.address, FUNDS),))
    node.open()
    try:
        await node.start_network()
        rpc = Methods(node)
        good = replace(TASK, publisher=PUBLISHER.address, bounty=10 * COIN, duration=2)

        def raw(published, *, nonce: int = 0, sign: bool = True, **changes) -> str:
            tx = TaskTx(PUBLISHER.pubkey, published, 1, nonce)
            tx = sign_tx(tx, PUBLISHER) if sign else tx
            return encode(replace(tx, **changes), Transaction).hex()

        async def view() -> tuple:
            return (await rpc.listtasks(), await rpc.getaccount(PUBLISHER.address.hex()),
                    await rpc.getrawmempool(), node.store.tip_id)

        async def refused(hexstring: str, reason: str) -> None:
            before = await view()
            with pytest.raises(RpcError) as err:
                await rpc.submittask(hexstring)
            assert err.value.code == -26 and err.value.message.startswith(reason), err.value
            assert await view() == before

        await refused(raw(replace(good, dataset=replace(good.dataset, name=b"imagenet"))),
                      "bad-task-dataset: unknown dataset b'imagenet'")
        await refused(raw(replace(good, dataset=replace(good.dataset, test_hash=bytes(32)))),
                      "bad-task-dataset-hash: digits: test_hash differ")
        await refused(raw(replace(good, bounty=FUNDS)), "bad-txn-balance")  # the fee on top
        await refused(raw(good, sign=False), "bad-txn-sig")
        await refused(raw(good, task=replace(good, bounty=1)), "bad-txn-sig")  # altered

        accepted = raw(good)
        txid = (await rpc.submittask(accepted))["txid"]
        await refused(accepted, "txn-already-in-mempool")
        await mine_to(node, 1)
        assert txid not in await rpc.getrawmempool()
        assert [t["status"] for t in await rpc.listtasks()][:2] == ["active", "queued"]
        assert (await rpc.getaccount(PUBLISHER.address.hex()))["balance"] == FUNDS - 10 * COIN - 1
        await refused(accepted, "bad-task-dup")  # replayed once it is on the chain
        await refused(raw(good, nonce=1), "bad-task-dup")  # the same task again
    finally:
        await node.close()
