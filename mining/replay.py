"""Where a verifier's training runs: on the calling thread, or in worker processes.

Replaying audited intervals (and recounting a model's validation score) is nearly all of
a proof's check (PROTOCOL.md §8.7). On the thread that asks, it holds the interpreter
lock for most of its time, so a node's event loop (block and artifact transfers, gossip,
RPC) and its checks take turns on one core however many the machine has. `ReplayPool`
runs the replays in worker processes instead: the asking thread waits with the lock
released, and a proof's audits run side by side when there are workers to spare.
`InlineReplayer` runs them on the thread that asks (tests, tools, a node with
`--verify-workers 0`), each when its result is first wanted, so that a verifier that
stops at the first failure runs no further replay. Both take the same calls and hand
back futures: the verifier submits every replay of a proof, then judges them in order.

A worker keeps the task's dataset and the last few draws' trainers, as the inline
replayer does, so the audits of one proof build one model. Results do not depend on
where they ran: same code, same float32 arithmetic, one torch thread per worker as on a
node's chain thread (and verification tolerates the rest, PROTOCOL.md §6).
"""

import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from consensus.models import ModelBlob
from consensus.tasks import Task, compute_task_id
from mining.htoa import Draw
from mining.trainer import DataCache, Trainer, compute_correct, load_model

TRAINERS_KEPT = 4  # draws whose trainer (model and buffers) a replayer keeps built
PARENT_CHECK_SECONDS = 1.0  # how often a worker checks that its parent lives

Snapshot = tuple[np.ndarray, np.ndarray]  # parameters and momentum after a replay


class InlineReplayer:
    """Replays on the calling thread, when a future's result is first asked for."""

    def __init__(self, data: DataCache, device: torch.device | str = "cpu") -> None:
        self.data, self.device = data, torch.device(device)
        self._trainers: OrderedDict[tuple[bytes, bytes], Trainer] = OrderedDict()
        self._lock = threading.Lock()  # a trainer trains one replay at a time

    def replay(self, task: Task, draw: Draw, start_step: int, params: np.ndarray,
               momentum: np.ndarray) -> "Future[Snapshot]":
        """Train task.k steps of `draw` from step `start_step`, from these parameters and
        momentum buffers; the parameters and buffers they end at."""
        return _Deferred(self._replay, task, draw, start_step, params, momentum)

    def count_correct(self, task: Task, draw: Draw, params: np.ndarray) -> "Future[int]":
        """How many validation examples `draw`'s network with `params` classifies right."""
        return _Deferred(self._count_correct, task, draw, params)

    def score(self, task: Task, blobs: list[ModelBlob]) -> "Future[list[int]]":
        """How many of the task's test images each model classifies right (the test split
        is never used for consensus: this is the publisher's result, PROTOCOL.md §2)."""
        return _Deferred(self._score, task, blobs)

    def prepare(self, task: Task) -> None:
        """Load `task`'s dataset now rather than at the first replay."""
        self.data.resident(task.dataset, self.device)

    def close(self) -> None:
        self._trainers.clear()

    def _replay(self, task: Task, draw: Draw, start_step: int, params: np.ndarray,
                momentum: np.ndarray) -> Snapshot:
        with self._lock:
            trainer = self._trainer(task, draw)
            trainer.load(params, momentum)
            trainer.train(start_step, task.k)
            return trainer.snapshot()

    def _count_correct(self, task: Task, draw: Draw, params: np.ndarray) -> int:
        with self._lock:
            trainer = self._trainer(task, draw)
            trainer.load(params, np.zeros_like(params))
            return trainer.count_correct()

    def _score(self, task: Task, blobs: list[ModelBlob]) -> list[int]:
        images, labels = self.data.splits(task.dataset).normalised("test", self.device)
        return [int(compute_correct(load_model(blob).to(self.device), images, labels))
                for blob in blobs]

    def _trainer(self, task: Task, draw: Draw) -> Trainer:
        key = (compute_task_id(task), draw.h1)  # h1 fixes the draw, within one task
        trainer = self._trainers.get(key)
        if trainer is None:
            data = self.data.resident(task.dataset, self.device)
            trainer = self._trainers[key] = Trainer(draw, data, self.device)
            if len(self._trainers) > TRAINERS_KEPT:
                self._trainers.popitem(last=False)
        self._trainers.move_to_end(key)
        return trainer


class ReplayPool:
    """Replays in `workers` processes, each on one torch thread.

    Workers are started with "spawn" (a fork would copy a process with threads running:
    the event loop's, LevelDB's, torch's) and ignore SIGINT: the node decides when they
    stop (close). One whose parent dies (SIGKILL, a crash) exits within a second rather
    than wait forever for work. A worker that dies breaks the pool: the replays in flight
    fail with BrokenProcessPool, a check error rather than a verdict, and the next call
    starts a fresh pool.
    """

    def __init__(self, workers: int, data_dir: str | None, device: str = "cpu") -> None:
        if workers < 1:
            raise ValueError("a replay pool needs at least one worker")
        self.workers, self._init_args = workers, (data_dir, device)
        self._executor = self._start()

    def replay(self, task: Task, draw: Draw, start_step: int, params: np.ndarray,
               momentum: np.ndarray) -> "Future[Snapshot]":
        return self._submit("_replay", task, draw, start_step, params, momentum)

    def count_correct(self, task: Task, draw: Draw, params: np.ndarray) -> "Future[int]":
        return self._submit("_count_correct", task, draw, params)

    def score(self, task: Task, blobs: list[ModelBlob]) -> "Future[list[int]]":
        return self._submit("_score", task, blobs)

    def prepare(self, task: Task) -> list[Future]:
        """Start the workers and have them load `task`'s dataset now: one request per
        worker (an idle worker takes the next, so most of them load it, and any that did
        not loads it at its first replay); their futures, for a caller that waits."""
        return [self._submit("prepare", task) for _ in range(self.workers)]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=self._init_args)

    def _submit(self, method: str, *args: Any) -> Future:
        try:
            return self._executor.submit(_call, method, *args)
        except BrokenProcessPool:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()
            return self._executor.submit(_call, method, *args)


Replayer = InlineReplayer | ReplayPool


class _Deferred(Future):
    """A call made by the first thread that asks for its outcome; cancelled before that,
    it is never made."""

    def __init__(self, fn: Any, *args: Any) -> None:
        super().__init__()
        self._call: tuple[Any, tuple] | None = (fn, args)

    def result(self, timeout: float | None = None) -> Any:
        self._run()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._run()
        return super().exception(timeout)

    def _run(self) -> None:
        if self._call is None:
            return
        fn, args = self._call
        self._call = None
        if self.set_running_or_notify_cancel():
            try:
                self.set_result(fn(*args))
            except Exception as e:  # the caller meets it at .result(), as from a pool
                self.set_exception(e)


# -- in a worker process ----------------------------------------------------------------------

_worker: InlineReplayer | None = None


def _init_worker(data_dir: str | None, device: str) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                     name="dpodl-replay-parent").start()
    torch.set_num_threads(1)
    _worker = InlineReplayer(DataCache(data_dir), device)


def _exit_with_parent(parent: int) -> None:
    """Exit once this process has been handed to another parent: its own has died."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _call(method: str, *args: Any) -> Any:
    assert _worker is not None, "not a replay worker"
    return getattr(_worker, method)(*args)
