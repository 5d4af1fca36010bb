"""`dpodl testnet up|status|down`, run as a user runs them: real node processes on
loopback, mining the dev chain."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from node.cli import main
from node.testnet import dpodl_command, lock_holder
from node.testnet_commands import read_state

TIMEOUT = 120.0
slow = pytest.mark.slow  # node processes starting and mining, 10 to 15 s each


def dpodl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*dpodl_command(), *args], capture_output=True, text=True,
                          timeout=TIMEOUT)


def status_rows(directory: Path) -> list[list[str]]:
    """`testnet status`'s table, a list of cells per node."""
    shown = dpodl("testnet", "status", "--datadir", str(directory))
    assert shown.returncode == 0, shown.stderr
    header, *rows = shown.stdout.splitlines()
    assert header.split() == ["node", "state", "pid", "rpc-port", "height", "tip", "peers",
                              "mining"]
    return [row.split() for row in rows]


def wait_until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie not yet reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.fixture
def net(tmp_path):
    """A testnet directory whose nodes are killed at the end, whatever happened."""
    directory = tmp_path / "net"
    yield directory
    for node in sorted(directory.glob("node*")):
        if (pid := lock_holder(node)) is not None:
            os.kill(pid, signal.SIGKILL)


@slow
def test_up_detached_status_and_down(net):
    up = dpodl("testnet", "up", "--detach", "--nodes", "3", "--miners", "1",
               "--datadir", str(net))
    assert up.returncode == 0, up.stderr
    assert f"dpodl rpc --datadir {net / 'node0'} getblockchaininfo" in up.stdout
    count = dpodl("rpc", "--datadir", str(net / "node2"), "getblockcount")  # as printed
    assert count.returncode == 0 and int(count.stdout) >= 0, count.stderr

    def agreed() -> bool:
        rows = status_rows(net)
        return (len({row[5] for row in rows}) == 1 and int(rows[0][4]) >= 3
                and all(int(row[6]) >= 1 for row in rows))

    wait_until(agreed, "3 nodes on one tip at height 3 or more")
    rows = status_rows(net)
    assert [row[:2] for row in rows] == [["node0", "running"], ["node1", "running"],
                                         ["node2", "running"]]
    assert [row[7] for row in rows] == ["yes", "no", "no"]
    pids = [int(row[2]) for row in rows]

    again = dpodl("testnet", "up", "--detach", "--datadir", str(net))
    assert again.returncode == 1 and "holds a running testnet" in again.stderr
    assert status_rows(net)[0][2] == str(pids[0])  # untouched

    down = dpodl("testnet", "down", "--datadir", str(net))
    assert down.returncode == 0, down.stderr
    assert [line.split(" (")[0] for line in down.stdout.splitlines()] == [
        "node0: stopped", "node1: stopped", "node2: stopped"]
    wait_until(lambda: all(gone(pid) for pid in pids), "the nodes' processes to end", 10)
    for i in range(3):
        assert lock_holder(net / f"node{i}") is None
        assert (net / f"node{i}" / "chain").is_dir() and (net / f"node{i}" / "keys").is_dir()
    assert [row[1] for row in status_rows(net)] == ["stopped"] * 3
    height = int(rows[0][4])

    # `up` again on the stopped testnet: the same nodes, on their chains.
    up = dpodl("testnet", "up", "--detach", "--nodes", "3", "--miners", "0",
               "--datadir", str(net))
    assert up.returncode == 0, up.stderr
    assert all(int(row[4]) >= height for row in status_rows(net))
    assert dpodl("testnet", "down", "--datadir", str(net)).returncode == 0


@slow
def test_sigint_stops_a_foreground_testnet_and_a_dead_node_is_reported(net):
    up = subprocess.Popen([*dpodl_command(), "testnet", "up", "--nodes", "2", "--miners", "1",
                           "--datadir", str(net)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("Ctrl-C" in line for line in lines), "the testnet to be up")
        state = read_state(net)
        assert state is not None and state["supervisor"] == up.pid
        wait_until(lambda: int(status_rows(net)[1][4]) >= 2, "2 blocks")
        victim = lock_holder(net / "node1")
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: any("exited unexpectedly" in line for line in lines),
                   "the supervisor to report node1's death", 10)
        miner = lock_holder(net / "node0")
        up.send_signal(signal.SIGINT)
        assert up.wait(TIMEOUT) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    reader.join(10)
    output = "".join(lines)
    assert f"node1 (pid {victim}) exited unexpectedly with code -9" in output
    assert "SIGINT: stopping the testnet" in output
    assert "node0: stopped" in output and "node1: was not running" in output, output
    assert gone(miner) and lock_holder(net / "node0") is None
    assert read_state(net)["supervisor"] is None


@pytest.mark.parametrize(("args", "reason"), [
    (["--nodes", "0"], "--nodes 0: a testnet needs at least 1 node"),
    (["--nodes", "2", "--miners", "3"], "--miners 3: between 0 and --nodes (2)"),
    (["--miners", "-1"], "--miners -1: between 0 and --nodes (3)"),
    (["--nodes", "1000"], "--nodes 1000: at most 32 on one machine"),
])
def test_up_refuses_bad_counts(tmp_path, capsys, args, reason):
    assert main(["testnet", "up", "--datadir", str(tmp_path / "net"), *args]) == 1
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "net").exists()  # nothing made, nothing started


def test_up_refuses_a_directory_that_is_not_a_testnet(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["testnet", "up", "--datadir", str(tmp_path)]) == 1
    assert "is not empty and holds no testnet" in capsys.readouterr().err
    assert main(["testnet", "up", "--datadir", str(tmp_path / "notes.txt")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_up_refuses_another_network_in_a_testnets_directory(tmp_path, capsys):
    (tmp_path / "testnet.json").write_text('{"network": "dev", "nodes": []}')
    assert main(["testnet", "up", "--network", "dev-accuracy", "--datadir", str(tmp_path)]) == 1
    assert "holds a dev testnet, not dev-accuracy" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "down"])
def test_status_and_down_need_a_testnet(tmp_path, capsys, command):
    assert main(["testnet", command, "--datadir", str(tmp_path)]) == 1
    assert "holds no testnet (testnet.json)" in capsys.readouterr().err
    (tmp_path / "testnet.json").write_text("{not json")
    assert main(["testnet", command, "--datadir", str(tmp_path)]) == 1
    assert "is not a testnet's state file" in capsys.readouterr().err


def test_up_needs_whole_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["testnet", "up", "--nodes", "three", "--datadir", "x"])
    assert exc.value.code == 2 and "invalid int value: 'three'" in capsys.readouterr().err
