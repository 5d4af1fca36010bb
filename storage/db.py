"""The LevelDB database of a data directory, held by one process at a time."""

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import plyvel

from consensus.encoding import DecodeError, decode


class StorageError(Exception):
    """The database cannot be used (locked, corrupt, another network's)."""


class DataDirLocked(StorageError):
    pass


class Database:
    """LevelDB under `<datadir>/chaindata`, guarded by an exclusive lock on `<datadir>/.lock`.

    LevelDB's own LOCK file raises an opaque IOError in a second process; taking our
    own lock first turns that into a clear message naming the directory.
    """

    def __init__(self, datadir: str | os.PathLike[str]) -> None:
        self.datadir = Path(datadir)
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.datadir / ".lock", "a+")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DataDirLocked(f"data directory {self.datadir} is in use by another dpodl "
                                "process") from None
        self._lock_file.truncate(0)
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()
        try:
            self.db = plyvel.DB(str(self.datadir / "chaindata"), create_if_missing=True)
        except (plyvel.Error, OSError) as exc:
            self._unlock()
            raise StorageError(f"cannot open {self.datadir / 'chaindata'}: {exc}") from exc

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    def has(self, key: bytes) -> bool:
        """Whether `key` is stored, without reading its value (a checkpoint runs to MiBs)."""
        with self.db.iterator(start=key, stop=key + b"\0", include_value=False) as keys:
            return next(keys, None) is not None

    def iterate(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self.db.iterator(prefix=prefix)

    @contextmanager
    def write_batch(self) -> Iterator[Any]:
        """One atomic, synced write: everything in the block or nothing."""
        with self.db.write_batch(transaction=True, sync=True) as batch:
            yield batch

    def close(self) -> None:
        if not self.db.closed:
            self.db.close()
        self._unlock()

    def _unlock(self) -> None:
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_record(tp: Any, raw: bytes, what: str) -> Any:
    """Decode a stored record; a record that does not decode is database corruption."""
    try:
        return decode(tp, raw)
    except DecodeError as exc:
        raise StorageError(f"corrupt database: {what}: {exc}") from None
