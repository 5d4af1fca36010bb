"""Scoring finished tasks: each node finds the best model a task delivered (PROTOCOL.md §2).

When a task's span ends on the main chain, the node counts how many of the task's test
images each of the span's block models classifies right, and records the best one
(`M*`: most test predictions right, then most validation predictions, then the
earliest block) with its score in `storage.results`. That is the useful output a
publisher collects (`gettaskresult`, `dpodl model export`). The counting runs where
the replays run (`mining.replay`): in the verify workers, or on a thread of its own.
A result asked for before it is ready is scored on the spot; one whose span's end a
reorganisation replaced is scored again on the new chain.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from consensus.encoding import Hash
from consensus.keys import compute_address
from consensus.proofs import Proof
from consensus.state import SCHEDULE_KEY, ModelRecord, Schedule, Span, span_key
from mining.replay import Replayer
from storage.artifacts import ArtifactStore
from storage.chain import ChainStore
from storage.db import StorageError
from storage.results import ResultStore, TaskResult

log = logging.getLogger("dpodl.tasks")

SCORE_BATCH = 16  # models per request: bounds what is read and sent to a worker at once

ChainCall = Callable[..., Awaitable[Any]]


class TaskNotFinished(Exception):
    """The span has not ended on the main chain."""


class TaskScorer:
    def __init__(self, store: ChainStore, artifacts: ArtifactStore, replayer: Replayer,
                 results: ResultStore, on_chain_thread: ChainCall) -> None:
        self.store, self.artifacts, self.replayer = store, artifacts, replayer
        self.results, self.on_chain_thread = results, on_chain_thread
        self._running: dict[int, asyncio.Task] = {}

    def current(self, start: int, span: Span) -> TaskResult | None:
        """The recorded result of a span, unless a reorganisation has voided it."""
        result = self.results.get(start)
        if result is None or self.store.main_chain_id(span.end) != result.end_block:
            return None
        return result

    def on_tip(self, heights: set[int]) -> None:
        """Start scoring the spans that end at any of these newly connected heights."""
        schedule: Schedule = self.store.get_state(SCHEDULE_KEY)
        ends = {h for h in heights  # a span ends where the next begins, or at the tip's end
                if h == schedule.end or self.store.get_state(span_key(h + 1)) is not None}
        if not ends:  # most blocks: no need to list the spans
            return
        for start, span in self.store.spans():
            if span.end in ends and self.current(start, span) is None:
                self._start(start, span)

    async def result(self, start: int, span: Span) -> TaskResult:
        """A finished span's result, scored now if it has not been. Raises
        TaskNotFinished, or what scoring met (a dataset this node cannot read)."""
        found = self.current(start, span)
        if found is not None:
            return found
        return await asyncio.shield(self._start(start, span))

    async def close(self) -> None:
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _start(self, start: int, span: Span) -> asyncio.Task:
        task = self._running.get(start)
        if task is None:
            task = self._running[start] = asyncio.ensure_future(self._score(start, span))
            task.add_done_callback(lambda done: self._finished(start, done))
        return task

    def _finished(self, start: int, task: asyncio.Task) -> None:
        self._running.pop(start, None)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            level = logging.INFO if isinstance(error, TaskNotFinished) else logging.WARNING
            log.log(level, "scoring the task span from height %d: %s", start, error)

    async def _score(self, start: int, span: Span) -> TaskResult:
        task = self.store.get_task(span.task_id)
        assert task is not None, "a span's task is on the chain"
        while True:
            blocks, end_block = await self.on_chain_thread(self._span_blocks, start, span)
            scores: dict[Hash, int] = {}
            for lo in range(0, len(blocks), SCORE_BATCH):
                proofs = [proof for _, _, proof in blocks[lo:lo + SCORE_BATCH]]
                blobs = await asyncio.to_thread(self._blobs, proofs)
                counts = await asyncio.to_thread(self.replayer.score(task, blobs).result)
                scores.update(zip((p.model_id for p in proofs), counts, strict=True))
            height, block_id, best = max(blocks, key=lambda b: (
                scores[b[2].model_id], b[2].n_correct, -b[0]))
            result = await self.on_chain_thread(self._keep, TaskResult(
                span.task_id, start, span.end, end_block, best.model_id, block_id, height,
                compute_address(best.miner), best.n_correct, scores[best.model_id],
                0, len(blocks), int(time.time())), scores)
            if result is not None:
                log.info("task %s, heights %d-%d: best model %s (block %d), %d/%d test, "
                         "%d/%d validation, of %d", span.task_id.hex()[:16], start, span.end,
                         best.model_id.hex()[:16], height, result.test_correct,
                         task.dataset.test_size, best.n_correct, task.dataset.val_size,
                         len(blocks))
                return result
            # The span's end left the main chain while we scored: again, on the new one.

    def _span_blocks(self, start: int, span: Span) -> tuple[list[tuple[int, Hash, Proof]], Hash]:
        """(height, block id, proof) of the span's main-chain blocks, and its last block."""
        if self.store.height < span.end:
            raise TaskNotFinished(f"the span runs to height {span.end}; the chain is at "
                                  f"{self.store.height}")
        blocks = []
        for height in range(start, span.end + 1):
            block_id = self.store.main_chain_id(height)
            header = None if block_id is None else self.store.get_header(block_id)
            if header is None:
                raise StorageError(f"corrupt database: no main-chain block at {height}")
            blocks.append((height, block_id, header.proof))
        return blocks, blocks[-1][1]

    def _blobs(self, proofs: list[Proof]) -> list:
        blobs = [self.artifacts.get_model(proof.model_id) for proof in proofs]
        for proof, blob in zip(proofs, blobs, strict=True):
            if blob is None:  # a connected block's model is always kept (storage.retention)
                raise StorageError(f"corrupt database: model {proof.model_id.hex()} missing")
        return blobs

    def _keep(self, result: TaskResult, scores: dict[Hash, int]) -> TaskResult | None:
        """Record the result, with its model's history length, if its span's last block
        is still on the main chain (chain thread); None if it is not."""
        if self.store.main_chain_id(result.end) != result.end_block:
            return None
        record: ModelRecord = self.store.get_state(("model", result.model_id))
        result = replace(result, total_steps=record.total_steps)
        self.results.put(result, scores)
        return result
