"""Node processes on loopback, on data directories of their own: LocalNode, which both
`dpodl testnet` (node/testnet_commands.py) and the functional tests (tests/functional/)
start, query, stop, kill and restart.

A LocalNode writes its data directory's dpodl.toml (its network, ports, peers and
role), so that `dpodl rpc --datadir DIR` and a `dpodl node --datadir DIR` started by
hand find the same node, and starts `dpodl node --datadir DIR` with the extra flags
given. Whether a node runs is read from its data directory's lock (node/datadir.py),
which the node holds until it exits and which names its pid: that works for nodes
another process started, and no signal ever goes to a stale pid that a new process
has taken.
"""

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from node.client import RpcClientError, call
from node.config import Config, load_config
from node.datadir import CONFIG_NAME, LOCK_NAME, LOG_NAME

OUTPUT_NAME = "output.log"  # the node's stdout and stderr: what it says before its log opens
MAX_NODES = 32  # each node is a Python process with torch loaded, a few hundred MB
# Importing torch and opening the chain takes seconds alone, and far longer with several
# nodes starting at once on a small, busy machine.
START_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0  # for `stop` to let a block check finish and close the chain store
TERM_TIMEOUT = 10.0  # after SIGTERM, before SIGKILL
POLL = 0.2
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class TestnetError(Exception):
    """A testnet, or one of its nodes, cannot do what was asked; the message says why."""


_given_ports: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick, free until someone takes it),
    and never one this process was given before: its nodes may not have bound it yet."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _given_ports:
            _given_ports.add(port)
            return port


def dpodl_command() -> list[str]:
    """How to run `dpodl`: the script installed beside this Python, else its module."""
    script = Path(sys.executable).parent / "dpodl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "node.cli"]


def lock_holder(datadir: Path) -> int | None:
    """The pid of the node running on `datadir`, or None if none runs there."""
    try:
        fd = os.open(datadir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # A shared lock for an instant: a node starting in that instant would be refused,
        # which only `status` and `down` racing a start can cause.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    """In a child process: have the kernel SIGKILL it when its parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


class LocalNode:
    """A `dpodl node` process on loopback ports, on its own data directory.

    The node reads everything but its extra flags from the dpodl.toml that
    `write_config` puts in its data directory, as a restarted node does."""

    def __init__(self, datadir: Path, *, network: str = "dev", rpc_port: int, p2p_port: int,
                 p2p_bind: str = "127.0.0.1", peers: tuple[str, ...] = (),
                 mine: bool = False) -> None:
        self.datadir = Path(datadir).absolute()
        self.name = self.datadir.name
        self.network, self.rpc_port, self.p2p_port = network, rpc_port, p2p_port
        self.p2p_bind, self.peers, self.mine = p2p_bind, peers, mine
        self.args: tuple[str, ...] = ()
        self.proc: subprocess.Popen | None = None  # None: not started by this process
        # Tests set this, so that a test runner killed outright leaves no node mining on.
        self.die_with_parent = False
        self._config: Config | None = None
        self._asked_at = 0.0
        self._output_from = 0  # where this start's output begins in OUTPUT_NAME

    @property
    def p2p_addr(self) -> str:
        return f"{self.p2p_bind}:{self.p2p_port}"

    @property
    def log_path(self) -> Path:
        return self.datadir / LOG_NAME

    def write_config(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        lines = ["# written by `dpodl testnet` (or the functional tests): this node's ports",
                 f"network = {json.dumps(self.network)}", 'rpc_bind = "127.0.0.1"',
                 f"rpc_port = {self.rpc_port}", f"p2p_bind = {json.dumps(self.p2p_bind)}",
                 f"p2p_port = {self.p2p_port}", f"peers = {json.dumps(list(self.peers))}",
                 f"mine = {json.dumps(self.mine)}"]
        (self.datadir / CONFIG_NAME).write_text("\n".join(lines) + "\n")
        self._config = None

    @property
    def config(self) -> Config:
        """The node's configuration as `dpodl rpc --datadir` reads it (the environment
        left out, as it is for the node: see start)."""
        if self._config is None:
            self._config = load_config(argparse.Namespace(datadir=str(self.datadir)), {})
        return self._config

    # -- the process ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return lock_holder(self.datadir)

    def running(self) -> bool:
        return self.pid is not None

    def start(self, *args: str) -> None:
        """Start the node with the flags `args` on top of its dpodl.toml."""
        if (pid := self.pid) is not None:
            raise TestnetError(f"{self.name} is running already (pid {pid})")
        if not (self.datadir / CONFIG_NAME).exists():
            self.write_config()
        self.args = args
        # DPODL_* variables would beat the file: the testnet's ports must not move.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPODL_")}
        with open(self.datadir / OUTPUT_NAME, "ab") as out:
            self._output_from = out.tell()
            # A session of its own: a Ctrl-C meant for `testnet up` does not reach it,
            # and it outlives the terminal after `up --detach`.
            self.proc = subprocess.Popen(
                [*dpodl_command(), "node", "--datadir", str(self.datadir), *args], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the node answers RPC; TestnetError if it exits or never answers."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and (code := self.proc.poll()) is not None:
                raise TestnetError(f"{self.name} exited with code {code} while starting; "
                                   f"its output:\n{self.output(20)}")
            try:
                self.rpc("getblockcount", timeout=10.0)
                return
            except RpcClientError:
                pass  # not listening yet, or an old cookie: the node writes a new one
            if time.monotonic() > deadline:
                raise TestnetError(f"{self.name} did not answer RPC within {timeout:.0f} s; "
                                   f"its log: {self.log_path}")
            time.sleep(POLL)

    def output(self, lines: int) -> str:
        """The last lines the node wrote to stdout and stderr since its last start."""
        with open(self.datadir / OUTPUT_NAME, "rb") as out:
            out.seek(self._output_from)
            text = out.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def rpc(self, method: str, *params: object, timeout: float = 60.0) -> object:
        """Call a JSON-RPC method (raises node.client.RpcClientError)."""
        return call(self.config, method, list(params), timeout=timeout)

    def ask_stop(self) -> bool:
        """Ask the node to stop over RPC; False if it did not take the request."""
        self._asked_at = time.monotonic()
        try:
            self.rpc("stop", timeout=10.0)
            return True
        except RpcClientError:
            return False

    def wait_stopped(self, timeout: float = STOP_TIMEOUT, *, asked: bool = True) -> str:
        """After ask_stop: wait for the node to exit, then SIGTERM it, then SIGKILL it;
        say what it took."""
        if self._wait_exit(timeout if asked else 0.0):
            took = time.monotonic() - self._asked_at
            return f"stopped ({took:.1f} s after `stop`){self._exit_code()}"
        why = (f"`stop` went unanswered for {timeout:.0f} s" if asked
               else "it did not answer RPC")
        self._signal(signal.SIGTERM)
        if self._wait_exit(TERM_TIMEOUT):
            return f"stopped by SIGTERM, as {why}{self._exit_code()}"
        self._signal(signal.SIGKILL)
        self._wait_exit(TERM_TIMEOUT)
        return f"killed (SIGKILL): {why}, and SIGTERM for {TERM_TIMEOUT:.0f} s more"

    def stop(self, timeout: float = STOP_TIMEOUT) -> str:
        """Stop the node cleanly (RPC `stop`), with SIGTERM and SIGKILL as fallbacks."""
        if not self.running():
            return "was not running"
        return self.wait_stopped(timeout, asked=self.ask_stop())

    def kill(self) -> None:
        """SIGKILL the node, as a crash or a power cut would end it, and wait for it."""
        self._signal(signal.SIGKILL)
        self._wait_exit(TERM_TIMEOUT)

    def restart(self, args: tuple[str, ...] | None = None) -> None:
        """Stop the node if it runs, then start it again on the same data directory and
        ports, with the flags `args` (default: those of its last start)."""
        self.stop()
        self.start(*(self.args if args is None else args))
        self.wait_ready()

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
        elif (pid := lock_holder(self.datadir)) is not None and pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    def _exit_code(self) -> str:
        code = None if self.proc is None else self.proc.poll()
        return "" if code is None else f", exit code {code}"


def stop_all(nodes: list[LocalNode], timeout: float = STOP_TIMEOUT) -> list[str]:
    """Stop every node that runs, all at once; say what happened to each."""
    asked = [node.ask_stop() if node.running() else None for node in nodes]
    return [f"{node.name}: " + ("was not running" if was is None
                                else node.wait_stopped(timeout, asked=was))
            for node, was in zip(nodes, asked, strict=True)]

