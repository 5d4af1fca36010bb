"""Where the verifier trains (mining/replay.py): on the calling thread or in worker
processes, with the same results and the same verdicts, real training on digits."""

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from consensus.blocks import compute_block_id
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey
from consensus.models import ModelBlob
from consensus.params import genesis_block
from mining.artifacts import MemoryArtifacts
from mining.htoa import compute_htoa
from mining.replay import InlineReplayer, ReplayPool
from mining.trainer import DataCache, DeviceData, Trainer, compute_correct, load_model, to_bytes
from mining.verifier import DPoDLEngine, FraudFound
from tests.forge import EASY, TASK, commit, find_nonce, sign_block, train

MINER = PrivateKey(bytes([21]) * 32)
GENESIS = genesis_block(EASY).header
J = 6  # intervals of the test's history
ALL = TASK.s_max // TASK.k  # q_local auditing every interval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pool():
    pool = ReplayPool(2, None)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def run(data: DeviceData):
    nonce, h1 = find_nonce(compute_block_id(GENESIS), MINER.pubkey)
    draw = compute_htoa(TASK, h1)
    states = [(draw.init, np.zeros_like(draw.init))]
    states += train(draw, data, states[0], 0, J)
    return nonce, draw, states


def test_a_worker_replays_bit_for_bit_what_the_calling_thread_replays(cache, pool, run):
    _, draw, states = run
    params, momentum = states[2]
    inline = InlineReplayer(cache).replay(TASK, draw, 2 * TASK.k, params, momentum).result()
    pooled = pool.replay(TASK, draw, 2 * TASK.k, params, momentum).result()
    assert all(np.array_equal(a, b) for a, b in zip(inline, pooled, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(pooled, states[3], strict=True))
    assert (pool.count_correct(TASK, draw, states[-1][0]).result()
            == InlineReplayer(cache).count_correct(TASK, draw, states[-1][0]).result())


def test_a_worker_scores_models_on_the_test_split_as_the_calling_thread_does(cache, pool, run):
    _, draw, states = run
    blobs = [ModelBlob(draw.arch, to_bytes(params)) for params, _ in (states[0], states[-1])]
    images, labels = cache.splits(TASK.dataset).normalised("test")
    expected = [int(compute_correct(load_model(blob), images, labels)) for blob in blobs]
    assert pool.score(TASK, blobs).result() == expected
    assert InlineReplayer(cache).score(TASK, blobs).result() == expected
    assert expected[1] > expected[0]  # trained beats the initialisation: a real count


def test_a_worker_reports_a_failure_through_its_future(pool, run):
    _, draw, _ = run
    short = np.zeros(3, dtype=np.float32)
    with pytest.raises(RuntimeError):  # torch: the buffer does not fit the network
        pool.replay(TASK, draw, 0, short, short).result()


def verdict(cache: DataCache, solution, replayer=None) -> tuple[str, str, int] | None:
    """None for a pass, else the rejection (its type, its reason and, for a fraud proof,
    the interval it shows), with every interval audited."""
    engine = DPoDLEngine(MemoryArtifacts(), cache, q_local=ALL, rng=random.Random(0),
                         replayer=replayer)
    solution.publish(engine.artifacts)
    header = sign_block(GENESIS, solution, MINER).header
    try:
        engine.validate_block_seal(EASY, header, TASK)
    except FraudFound as e:
        return "FraudFound", e.reason, e.proof.start.leaf.index
    except ConsensusError as e:
        return "ConsensusError", e.reason, -1
    return None


def test_the_engine_judges_the_same_with_workers(cache, data, pool, run):
    nonce, draw, states = run
    honest = commit(compute_block_id(GENESIS), MINER.pubkey, nonce, draw.arch, states, data)
    assert verdict(cache, honest) is None
    assert verdict(cache, honest, pool) is None
    # Checkpoint 3 nudged off its training, re-watermarked and committed: only a replay
    # sees it. Intervals 2 and 3 no longer replay; a private audit catches one.
    forged = list(states)
    p3, m3 = forged[3]
    forged[3] = (draw.signature.sign_array(p3 * np.float32(1.01)), m3)
    bad = commit(compute_block_id(GENESIS), MINER.pubkey, nonce, draw.arch, forged, data)
    found = verdict(cache, bad)
    assert found is not None and found[:2] == ("FraudFound", "bad-replay") and found[2] in (2, 3)
    assert verdict(cache, bad, pool) == found


def test_a_dead_worker_fails_its_replays_and_the_next_call_starts_afresh(run):
    _, draw, states = run
    params, momentum = states[1]
    pool = ReplayPool(1, None)
    try:
        first = pool.replay(TASK, draw, TASK.k, params, momentum).result()
        (pid,) = pool._executor._processes  # the one worker
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            pool.replay(TASK, draw, TASK.k, params, momentum).result()
        again = pool.replay(TASK, draw, TASK.k, params, momentum).result()
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    finally:
        pool.close()


def test_inline_replays_run_when_asked_for_and_never_once_cancelled(cache, run, monkeypatch):
    _, draw, states = run
    calls = []
    train_ = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, *a: (calls.append(a), train_(self, *a)))
    replayer = InlineReplayer(cache)
    first = replayer.replay(TASK, draw, 0, *states[0])
    second = replayer.replay(TASK, draw, TASK.k, *states[1])
    assert calls == []
    assert second.cancel()
    assert all(np.array_equal(a, b) for a, b in zip(first.result(), states[1], strict=True))
    with pytest.raises(CancelledError):
        second.result()
    assert calls == [(0, TASK.k)]


CHILD = """
import sys, time
from consensus.params import DEV
from mining.replay import ReplayPool
pool = ReplayPool(1, None)
for future in pool.prepare(DEV.genesis_task):
    future.result()
print(*pool._executor._processes, flush=True)
time.sleep(600)
"""


def test_workers_exit_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        (worker,) = map(int, parent.stdout.readline().split())
        assert running(worker)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(worker), "the worker outlived its parent"


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie waiting to be reaped by
    whatever adopted it has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
