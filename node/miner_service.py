"""Mining in a child process, so that training never blocks the node's event loop.

The node hands the child a `Job` (the tip, the active task, the targets); the child
mines it with `mining.miner.mine` and sends back every solution and its progress. A
new job (the tip moved) or `pause` makes the child abandon the current one at the next
look at its stop test, which `mine` makes between PreHash batches and after every
checkpoint interval. The child holds no database: solutions travel back whole (model,
leaf list and checkpoint tensors) and the node stores and checks them.

Messages, parent to child: ("job", generation, Job), ("pause", generation), ("exit",).
Child to parent: ("solution", generation, Solution), ("progress", generation, Progress),
("error", generation, text). The generation tells the parent which job an answer is for.
"""

import contextlib
import logging
import multiprocessing
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from consensus.encoding import Hash
from mining.miner import Job, mine
from mining.trainer import DataCache

log = logging.getLogger("dpodl.miner")

EXIT_TIMEOUT = 10.0  # seconds the child gets to finish its interval before it is killed


@dataclass(frozen=True, slots=True)
class Progress:
    """The latest committed checkpoint of the draw being trained."""

    h1: Hash
    steps: int
    n_correct: int | None


def _child(conn: Connection, device: str, datasets: str | None) -> None:
    """The child's loop: wait for a job, mine it until told otherwise, repeat."""
    import os

    import torch

    # Training takes whatever CPU is idle, and gives way at once to the node (RPC, block
    # checks) and to everything else on the machine: the lowest scheduling priority.
    os.nice(19)
    torch.set_num_threads(1)  # one core for training; the node keeps the others
    cache = DataCache(datasets)
    message = conn.recv()
    while message[0] != "exit":
        if message[0] != "job":
            message = conn.recv()  # paused: wait for the next job
            continue
        _, generation, job = message
        try:
            data = cache.resident(job.task.dataset, device)

            def report(h1: Hash, steps: int, n_correct: int | None,
                       generation: int = generation) -> None:
                conn.send(("progress", generation, Progress(h1, steps, n_correct)))

            # A random start: two miners with one key never repeat each other's draws.
            for solution in mine(job, data, conn.poll, nonce=secrets.randbelow(1 << 62),
                                 device=device, progress=report):
                conn.send(("solution", generation, solution))
        except Exception as e:  # a dataset missing, CUDA gone: tell the node, keep serving
            conn.send(("error", generation, f"{type(e).__name__}: {e}"))
            message = ("pause", generation)
            continue
        message = conn.recv()  # the next job, a pause, or exit (mine returned: a block)


class MinerService:
    """The node's handle on the mining child process.

    `on_message(kind, generation, payload)` runs on a reader thread for every answer;
    the node forwards it to its event loop. Only the newest generation is current.
    """

    def __init__(self, on_message: Callable[[str, int, object], None], *,
                 device: str = "cpu", datasets: Path | None = None) -> None:
        self.on_message = on_message
        self.device = device
        self.datasets = None if datasets is None else str(datasets)
        self.generation = 0
        self.job: Job | None = None
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def start(self) -> None:
        if self.running:
            return
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        parent, child = ctx.Pipe()
        self._process = ctx.Process(target=_child, args=(child, self.device, self.datasets),
                                    name="dpodl-miner", daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        self._reader = threading.Thread(target=self._read, name="dpodl-miner-reader",
                                        daemon=True)
        self._reader.start()
        log.info("miner started (pid %d, device %s)", self._process.pid, self.device)

    def set_job(self, job: Job) -> int:
        """Mine `job` from now on; returns its generation."""
        self.generation += 1
        self.job = job
        self._send(("job", self.generation, job))
        return self.generation

    def pause(self) -> None:
        """Stop mining until the next job."""
        self.generation += 1
        self.job = None
        self._send(("pause", self.generation))

    def stop(self) -> None:
        """Stop the child: it finishes the interval in hand, or is killed after a while."""
        process, conn, reader = self._process, self._conn, self._reader
        if process is None or conn is None or reader is None:
            return
        self.job = None
        self._process = self._conn = self._reader = None  # the reader: this exit is ours
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("exit",))
        process.join(EXIT_TIMEOUT)
        if process.is_alive():
            log.warning("miner did not stop in %.0f s; killing it", EXIT_TIMEOUT)
            process.kill()
            process.join()
        conn.close()
        reader.join(EXIT_TIMEOUT)
        log.info("miner stopped")

    def _send(self, message: tuple) -> None:
        """Send to the child; a dead child is reported by the reader, not here."""
        if self._conn is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(message)

    def _read(self) -> None:
        conn, process = self._conn, self._process
        assert conn is not None and process is not None
        while True:
            try:
                kind, generation, payload = conn.recv()
            except (EOFError, OSError):
                break  # the child exited, or stop() closed the pipe
            self.on_message(kind, generation, payload)
        if self._process is process:  # not stopped by us: it died
            process.join(EXIT_TIMEOUT)
            self.on_message("died", self.generation, f"exit code {process.exitcode}")

