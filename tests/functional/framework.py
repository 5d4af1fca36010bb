"""Multi-node functional tests in the shape of Bitcoin Core's test_framework.

A scenario subclasses DpodlTestFramework, sets `num_nodes` and `extra_args` (each
node's flags) and writes `run_test()`; a pytest test runs it with
`Scenario(tmp_path).main()`. The nodes are real `dpodl node` processes, started through
node/testnet.py's LocalNode as `dpodl testnet` starts them, each on its own data
directory under the test's tmp_path; whatever happens they are gone when main()
returns, and if the test failed, the end of every node's log is printed.

Each node listens for P2P on a loopback address of its own, 127.0.0.<i+2>, so that
`setban` of that address keeps two nodes apart (disconnect_nodes) without cutting the
others off: every connection comes *from* 127.0.0.1, which a ban could not tell apart,
but goes *to* the listener's own address, and a node dials no banned address. A node
that takes an inbound connection only learns 127.0.0.1 and the dialler's listening
port; the framework holds that port on 127.0.0.1 (bound, never listening) while the
test runs, so that such an address, gossiped on, reaches nothing, never another test's
node.
"""

import contextlib
import functools
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from node.client import RpcClientError
from node.datadir import KEY_NAME, KEYS_DIR, read_key_file
from node.testnet import OUTPUT_NAME, LocalNode, dpodl_command, free_port, stop_all, tail

SYNC_TIMEOUT = 90.0  # seconds for nodes to agree once nothing mines
MINE_TIMEOUT = 120.0  # for the dev chain's blocks, a few a second to one every few seconds

# Core's RPC error codes the helpers expect
NODE_ALREADY_ADDED = -23
NODE_NOT_ADDED = -24
CLIENT_INVALID_IP_OR_SUBNET = -30


def wait_until(predicate: Callable[[], object], what: str,
               timeout: float = SYNC_TIMEOUT) -> None:
    """Poll `predicate` until it is true; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


@contextlib.contextmanager
def ignore_rpc_error(code: int) -> Iterator[None]:
    """Let an RPC error with `code` pass (e.g. "already added")."""
    try:
        yield
    except RpcClientError as e:
        if e.code != code:
            raise


class TestNode(LocalNode):
    """A LocalNode whose JSON-RPC methods are its attributes: `node.getblockcount()`."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, index: int, datadir: Path, *, network: str, rpc_port: int,
                 p2p_port: int) -> None:
        super().__init__(datadir, network=network, rpc_port=rpc_port, p2p_port=p2p_port,
                         p2p_bind=f"127.0.0.{index + 2}")
        self.index = index
        self.die_with_parent = True

    def __getattr__(self, method: str) -> Callable[..., object]:
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(self.rpc, method)

    def __repr__(self) -> str:
        return f"node{self.index}"

    @property
    def key_path(self) -> Path:
        """The node's miner key (made at its first start)."""
        return self.datadir / KEYS_DIR / KEY_NAME

    @property
    def address(self) -> str:
        return read_key_file(self.key_path).address.hex()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run `dpodl ARGS --datadir DIR` as a user would, e.g. cli("send", "--to", …)."""
        return subprocess.run([*dpodl_command(), *args, "--datadir", str(self.datadir)],
                              capture_output=True, text=True, timeout=60)

    def peer_addrs(self) -> set[str]:
        return {p["addr"] for p in self.getpeerinfo()}


class DpodlTestFramework:
    """Start `num_nodes` nodes, connect them, run `run_test`, and clean up."""

    num_nodes = 1
    extra_args: Sequence[Sequence[str]] = ()  # the flags of node i, e.g. (("--mine",), ())
    network = "dev"

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.nodes: list[TestNode] = []
        self._held_ports: list[socket.socket] = []

    # -- what a scenario writes --------------------------------------------------------------

    def run_test(self) -> None:
        raise NotImplementedError

    def setup_network(self) -> None:
        """Start the nodes and link them in a line, 0-1-2-…; gossip adds the rest."""
        self.start_nodes()
        for i in range(1, self.num_nodes):
            self.connect_nodes(i, i - 1)

    # -- running it --------------------------------------------------------------------------

    def main(self) -> None:
        """Set up, run the test, and stop (after a failure: kill) every node."""
        passed = False
        try:
            self.setup_network()
            self.run_test()
            passed = True
        except BaseException:
            self.print_logs()
            raise
        finally:
            self._shutdown(passed)

    def _shutdown(self, passed: bool) -> None:
        try:
            if passed:  # a node that does not stop cleanly after a passing test fails it
                results = stop_all(self.nodes)
                assert all(r.endswith("exit code 0") or r.endswith("was not running")
                           for r in results), results
        finally:
            for node in self.nodes:
                node.kill()
            for held in self._held_ports:
                held.close()

    def print_logs(self, lines: int = 40) -> None:
        for node in self.nodes:
            print(f"\n===== {node!r} ({node.datadir}): the end of debug.log =====")
            print(tail(node.log_path, lines))
            if node.proc is not None and node.proc.poll():  # it died: how, if not logged
                print(f"----- {node!r} exited with code {node.proc.returncode}; the end of "
                      f"its {OUTPUT_NAME} (stdout, stderr) -----")
                print(node.output(10))

    # -- nodes -------------------------------------------------------------------------------

    def add_node(self, extra_args: Sequence[str] = ()) -> TestNode:
        """A new node, not started, with its ports and data directory."""
        index = len(self.nodes)
        # Held on 127.0.0.1 for the test: see the module's docstring.
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        self._held_ports.append(held)
        node = TestNode(index, self.tmp_path / f"node{index}", network=self.network,
                        rpc_port=free_port(), p2p_port=held.getsockname()[1])
        node.write_config()
        node.args = tuple(extra_args)
        self.nodes.append(node)
        return node

    def start_nodes(self) -> None:
        """Add the first num_nodes nodes and start them all at once."""
        for i in range(self.num_nodes):
            self.add_node(self.extra_args[i] if i < len(self.extra_args) else ())
        for node in self.nodes:
            node.start(*node.args)
        for node in self.nodes:
            node.wait_ready()

    def start_node(self, i: int, extra_args: Sequence[str] | None = None) -> None:
        node = self.nodes[i]
        node.start(*(node.args if extra_args is None else extra_args))
        node.wait_ready()

    def stop_node(self, i: int) -> str:
        return self.nodes[i].stop()

    def kill_node(self, i: int) -> None:
        """SIGKILL, as a crash or a power cut would end it."""
        self.nodes[i].kill()

    def restart_node(self, i: int, extra_args: Sequence[str] | None = None) -> None:
        """Start node i again on its data directory and ports (stopping it first if it
        runs), with `extra_args` or else the flags it ran with."""
        self.nodes[i].restart(None if extra_args is None else tuple(extra_args))

    # -- the network -------------------------------------------------------------------------

    def connected(self, a: int, b: int) -> bool:
        """Whether a and b have a connection (each one is outbound from one of them)."""
        x, y = self.nodes[a], self.nodes[b]
        return y.p2p_addr in x.peer_addrs() or x.p2p_addr in y.peer_addrs()

    def connect_nodes(self, a: int, b: int) -> None:
        """Lift the bans between a and b, and have a keep a connection to b."""
        x, y = self.nodes[a], self.nodes[b]
        for p, q in ((x, y), (y, x)):
            with ignore_rpc_error(CLIENT_INVALID_IP_OR_SUBNET):  # not banned
                p.setban(q.p2p_bind, "remove")
        with ignore_rpc_error(NODE_ALREADY_ADDED):
            x.addnode(y.p2p_addr, "add")
        wait_until(lambda: self.connected(a, b), f"{x!r} and {y!r} to connect")

    def disconnect_nodes(self, a: int, b: int) -> None:
        """Drop the connection between a and b and keep them apart: each bans the other's
        address (which also closes its connection to it) and stops dialling it."""
        x, y = self.nodes[a], self.nodes[b]
        for p, q in ((x, y), (y, x)):
            p.setban(q.p2p_bind, "add", 24 * 3600)
            with ignore_rpc_error(NODE_NOT_ADDED):
                p.addnode(q.p2p_addr, "remove")
        wait_until(lambda: not self.connected(a, b), f"{x!r} and {y!r} to disconnect")

    def sync_blocks(self, nodes: Sequence[TestNode] | None = None,
                    timeout: float = SYNC_TIMEOUT) -> str:
        """Wait until the nodes (default: all that run) share a tip; return it."""
        nodes = nodes or [n for n in self.nodes if n.running()]
        wait_until(lambda: len({n.getbestblockhash() for n in nodes}) == 1,
                   f"{nodes} to agree on a tip", timeout)
        return nodes[0].getbestblockhash()

    def settle(self, miner: TestNode) -> str:
        """The tip every running node agrees on, once the miners have stopped. Miners that
        stopped together may have left two tips of one height, each node keeping the one
        it saw first (the longest-chain rule), so `miner` first mines past them alone."""
        top = max(node.getblockcount() for node in self.nodes if node.running())
        miner.setgenerate(True)
        wait_until(lambda: miner.getblockcount() > top, f"{miner!r} to mine past every tip",
                   MINE_TIMEOUT)
        miner.setgenerate(False)
        return self.sync_blocks()

    def sync_mempools(self, nodes: Sequence[TestNode] | None = None,
                      timeout: float = SYNC_TIMEOUT) -> None:
        nodes = nodes or [n for n in self.nodes if n.running()]
        wait_until(lambda: len({frozenset(n.getrawmempool()) for n in nodes}) == 1,
                   f"{nodes} to hold the same transactions", timeout)

    def wait_for_height(self, node: TestNode, height: int,
                        timeout: float = MINE_TIMEOUT) -> None:
        wait_until(lambda: node.getblockcount() >= height, f"{node!r} at height {height}",
                   timeout)
