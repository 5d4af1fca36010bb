"""On an interactive terminal, a status line under the log: the chain's height, the
peers and how far behind their best header we are, and, while mining, the draw in
training with its steps and validation accuracy.

The line is redrawn in place (carriage return, erase to end of line) every second; a
log record clears it first, so records and the line never share a row.
"""

import asyncio
import contextlib
import logging
import shutil
from typing import TextIO

from node.node import Node

CLEAR = "\r\x1b[K"
INTERVAL = 1.0  # seconds between redraws


class StatusLine(logging.Filter):
    """The line itself; as a logging filter on the stderr handler, it clears the row
    before each record is written there."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def show(self, text: str) -> None:
        width = shutil.get_terminal_size().columns - 1
        self.stream.write(CLEAR + text[:width])
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write(CLEAR)
        self.stream.flush()

    def filter(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True


def describe(node: Node) -> str:
    """One line of what the node is doing."""
    parts = [f"{node.params.name} height {node.store.height}"]
    network = node.network
    if network is not None:
        best = network.sync.best_height()
        behind = (f", syncing: {best - node.store.height} blocks behind"
                  if best > node.store.height else "")
        parts.append(f"{len(network.peers)} peers{behind}")
    stats, progress = node.stats, node.stats.progress
    if node.miner is None:
        parts.append("not mining")
    elif progress is None:
        parts.append("mining: starting")
    else:
        task = node.active_task()
        accuracy = ("" if progress.n_correct is None else
                    f", validation {100 * progress.n_correct / task.dataset.val_size:.1f}%")
        parts.append(f"training draw {stats.draws}: step {progress.steps}/{task.s_max}"
                     f"{accuracy}")
    parts.append(f"mined {stats.blocks} blocks, {stats.mtxs} model txs")
    return " | ".join(parts)


async def show_status(node: Node, line: StatusLine) -> None:
    """Redraw the line until the node stops; then leave the row clean."""
    handlers = [h for h in logging.getLogger("dpodl").handlers
                if type(h) is logging.StreamHandler and h.stream is line.stream]
    for handler in handlers:
        handler.addFilter(line)
    try:
        while not node.stopping.is_set():
            line.show(describe(node))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(node.stopping.wait(), INTERVAL)
    finally:
        line.clear()
        for handler in handlers:
            handler.removeFilter(line)
