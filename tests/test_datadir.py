"""The data directory (layout, lock, miner key) and the node's logging."""

import logging
import os
import re
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consensus.keys import PrivateKey
from node.datadir import DataDir, DataDirError, read_key_file, write_key_file
from node.logs import setup_logging, teardown_logging
from storage.db import Database

REPO = Path(__file__).resolve().parent.parent
KEY = PrivateKey(bytes(range(32)))

# Holds the directory until its stdin closes.
LOCK_CHILD = """
import sys
from pathlib import Path
from node.datadir import DataDir
DataDir(Path(sys.argv[1])).lock()
print("locked", flush=True)
sys.stdin.read()
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_is_created_private(tmp_path):
    d = DataDir(tmp_path / "nodes" / "dev")
    assert d.path == tmp_path / "nodes" / "dev"
    assert (d.chain_path, d.log_path, d.cookie_path, d.key_path, d.config_path) == (
        d.path / "chain", d.path / "debug.log", d.path / ".cookie", d.path / "keys" / "miner.key",
        d.path / "dpodl.toml")
    assert mode(d.path) == 0o700
    assert mode(d.path / "keys") == 0o700
    assert sorted(p.name for p in d.path.iterdir()) == ["keys"]  # the rest comes on use


def test_existing_directory_keeps_its_mode(tmp_path):
    tmp_path.joinpath("d").mkdir()
    tmp_path.joinpath("d").chmod(0o750)
    DataDir(tmp_path / "d")
    assert mode(tmp_path / "d") == 0o750


def test_directory_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataDirError, match=f"cannot create data directory {tmp_path / 'file'}: "):
        DataDir(tmp_path / "file")


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    first = DataDir(tmp_path)
    first.lock()
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    second = DataDir(tmp_path)
    with pytest.raises(DataDirError) as err:
        second.lock()
    assert str(err.value) == f"another dpodl node is using {tmp_path} (pid {os.getpid()})"
    first.unlock()
    second.lock()
    second.unlock()


def test_lock_held_by_another_process(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", LOCK_CHILD, str(tmp_path)], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(DataDirError) as err:
            DataDir(tmp_path).lock()
        assert str(err.value) == f"another dpodl node is using {tmp_path} (pid {child.pid})"
    finally:
        child.stdin.close()
        assert child.wait(timeout=10) == 0
    d = DataDir(tmp_path)
    d.lock()  # the lock died with its process
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    d.unlock()


def test_chain_store_opens_inside_a_locked_datadir(tmp_path):
    """storage.db.Database takes its own lock in the directory it is given: chain/."""
    d = DataDir(tmp_path)
    d.lock()
    Database(d.chain_path).close()
    assert (d.chain_path / "chaindata").is_dir()
    d.unlock()


def test_key_is_created_once_then_read_back(tmp_path):
    d = DataDir(tmp_path)
    key, created = d.load_or_create_key()
    assert created
    assert mode(d.key_path) == 0o600
    assert d.key_path.read_text() == key.seed.hex() + "\n"
    assert [p.name for p in d.key_path.parent.iterdir()] == ["miner.key"]  # no temp file left
    again, created = DataDir(tmp_path).load_or_create_key()
    assert (again, created) == (key, False)


def test_key_at_another_path(tmp_path):
    d = DataDir(tmp_path / "dd")
    key, created = d.load_or_create_key(tmp_path / "other.key")
    assert created and not d.key_path.exists()
    assert d.load_or_create_key(tmp_path / "other.key") == (key, False)


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "holds 0 characters, expected 64 hex digits"),
    (b"abcd\n", "holds 4 characters, expected 64 hex digits"),
    (KEY.seed.hex().encode() * 2, "holds 128 characters, expected 64 hex digits"),
    (b"zz" * 32 + b"\n", "is not hex"),
    (b"\xff" * 64, "is not hex text"),
])
def test_corrupt_key_file_is_refused_and_kept(tmp_path, content, reason):
    d = DataDir(tmp_path)
    d.key_path.write_bytes(content)
    with pytest.raises(DataDirError) as err:
        d.load_or_create_key()
    assert str(err.value) == f"key file {d.key_path} {reason}"
    assert d.key_path.read_bytes() == content


def test_key_file_that_cannot_be_read(tmp_path):
    d = DataDir(tmp_path)
    d.key_path.mkdir()
    with pytest.raises(DataDirError, match=f"cannot read key file {d.key_path}: Is a directory"):
        d.load_or_create_key()


def test_key_file_tolerates_surrounding_whitespace(tmp_path):
    (tmp_path / "k").write_text(f"  {KEY.seed.hex().upper()}\r\n\n")
    assert read_key_file(tmp_path / "k") == KEY


def test_write_key_file_never_overwrites(tmp_path):
    path = tmp_path / "wallet.key"
    write_key_file(path, KEY)
    assert read_key_file(path) == KEY
    assert mode(path) == 0o600
    with pytest.raises(DataDirError, match=f"key file {path} already exists; not overwriting it"):
        write_key_file(path, PrivateKey(b"\x01" * 32))
    assert read_key_file(path) == KEY
    assert [p.name for p in tmp_path.iterdir()] == ["wallet.key"]


def test_write_key_file_into_a_missing_directory(tmp_path):
    with pytest.raises(DataDirError, match="cannot write key file .*/missing/k: No such file"):
        write_key_file(tmp_path / "missing" / "k", KEY)


@pytest.fixture
def logs():
    yield
    teardown_logging()


LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) INFO dpodl\.node: hello 7")


def test_logs_go_to_stderr_and_file_in_utc(tmp_path, capfd, monkeypatch, logs):
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # local time 9 hours off UTC
    time.tzset()
    try:
        setup_logging("info", tmp_path / "debug.log")
        log = logging.getLogger("dpodl.node")
        log.info("hello %d", 7)
        log.debug("not at info")
    finally:
        monkeypatch.undo()
        time.tzset()
    err = capfd.readouterr().err
    file = (tmp_path / "debug.log").read_text()
    for text in (err, file):
        match = LINE.fullmatch(text.rstrip("\n"))
        assert match, text
        stamp = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_setup_twice_does_not_duplicate_lines(tmp_path, capfd, logs):
    setup_logging("info", tmp_path / "debug.log")
    setup_logging("debug", tmp_path / "debug.log")
    logging.getLogger("dpodl.p2p").debug("once")
    assert capfd.readouterr().err.count("DEBUG dpodl.p2p: once") == 1
    assert (tmp_path / "debug.log").read_text().count("once") == 1
    assert len(logging.getLogger("dpodl").handlers) == 2


def test_stderr_only_and_other_loggers_untouched(capfd, logs):
    setup_logging("warning", None)
    logging.getLogger("dpodl").info("quiet")
    logging.getLogger("dpodl").warning("loud")
    logging.getLogger("aiohttp").warning("not ours")
    err = capfd.readouterr().err
    assert "WARNING dpodl: loud" in err
    assert "quiet" not in err and "not ours" not in err


def test_teardown_removes_our_handlers(tmp_path, logs):
    setup_logging("info", tmp_path / "debug.log")
    teardown_logging()
    logging.getLogger("dpodl").warning("after")
    assert logging.getLogger("dpodl").handlers == []
    assert (tmp_path / "debug.log").read_text() == ""


def test_unknown_level_changes_nothing(logs):
    with pytest.raises(ValueError, match="unknown log level 'trace'"):
        setup_logging("trace", None)
    assert logging.getLogger("dpodl").handlers == []
