"""Logging for the node: the `dpodl` logger tree to stderr and to the data directory's log.

Lines read `2026-11-21T12:00:00Z INFO dpodl.node: message`, in UTC so that logs from
nodes in different time zones line up.
"""

import logging
import sys
import time
from pathlib import Path

LOG_LEVELS = ("debug", "info", "warning", "error")

_LOGGER = logging.getLogger("dpodl")
_handlers: list[logging.Handler] = []


def setup_logging(level: str, log_path: Path | None) -> None:
    """Send the `dpodl` loggers at `level` and above to stderr and, if given, `log_path`."""
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    teardown_logging()  # a second call replaces the handlers instead of doubling them
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                  datefmt="%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    _handlers.append(logging.StreamHandler(sys.stderr))
    if log_path is not None:
        _handlers.append(logging.FileHandler(log_path, encoding="utf-8"))
    for handler in _handlers:
        handler.setFormatter(formatter)
        _LOGGER.addHandler(handler)
    _LOGGER.setLevel(level.upper())


def teardown_logging() -> None:
    """Remove and close the handlers setup_logging added."""
    for handler in _handlers:
        _LOGGER.removeHandler(handler)
        handler.close()
    _handlers.clear()
    _LOGGER.setLevel(logging.NOTSET)
