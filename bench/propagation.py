"""Block propagation across 8 local nodes, against a direct 2-node link in the same run.

Each run starts fresh networks of real `dpodl node` processes (own data directory, RPC
and P2P port each, started as a user starts them):
- "8 nodes": node 0 mines, nodes 1..7 do not. Sparse seeds: node i gets `--peer` of
  node i−1 and of one random earlier node (from --seed), so the seed graph is connected.
  --topology fixed (the default) keeps the links to the seed graph: each node listens on
  its own loopback address (127.0.0.2, …) and bans (`setban`) every other node's address
  but its seeds', so address gossip cannot add links and a block must cross relaying
  nodes to reach some of them. --topology gossip runs the nodes as they are, all on
  127.0.0.1: address gossip (getaddr/addr, up to 8 outbound dials per node) then joins
  every pair within seconds, and every node is one hop from the miner.
  The graph is read from getpeerinfo (an outbound entry names the node dialled) when
  mining starts and when it ends; hop distances from node 0 and each node's final
  getconnectioncount are printed.
- "2 nodes" (the baseline): one miner and one peer with `--peer` to it, on 127.0.0.1.

Mining: once every seed link is up, node 0 mines one block at a time: `setgenerate true`,
`setgenerate false` as soon as its height moves, and the next block only once every node
holds the miner's tip. At the genesis difficulty the miner finds a block in a second or
two, far under the dev chain's 5 s target; one block at a time lets each block cross an
otherwise idle network, as it would at the target pace, instead of queueing behind the
checks of the one before (--continuous lets the miner run instead, and shows that).
Pausing restarts the miner's child process for every block; that happens before the
block exists, so it is not in the figures. Model transactions the miner finds on the
way are relayed and checked as usual.

For every block node 0 mined in the run and every other node:
- first seen: `received` on the node − `accepted` on the miner (getblock): from the moment
  the miner had checked and stored its own block (and so announced it) to the moment the
  node had the block's bytes;
- checked: `accepted` on the node − `accepted` on the miner: the node had verified and
  stored it too (replay audits included, artifacts fetched).
Both are wall-clock times of the one machine, so no clock offset enters. Reported: p50,
p95 and max in seconds and as a fraction of the dev chain's target block time, and first
seen by hop distance. The first --warmup blocks of each run are left out (printed
apart): a fresh node's first block check loads the task's dataset (scikit-learn's
import), a one-time cost of a new process, not of propagation.

Why a 2-node link as the baseline: it is the least a block can cost to reach a peer
here (inv, getheaders, headers, getdata, block, nothing in between), measured with the
same code, machine and pacing, so "8 nodes / 2 nodes" is the price of the extra hops (a
node checks a block, replay audits and all, before it announces it) and of eight
processes sharing the cores. The setups alternate in order from run to run; medians over
runs are reported, ratios as medians of per-run ratios.

The nodes use PyTorch's default intra-op threads (all cores each), as `dpodl node` does;
--node-threads N sets OMP_NUM_THREADS=N for them. Everything else running on the machine
is in the figures too.
"""

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from consensus.params import DEV

DPODL = str(Path(sys.executable).parent / "dpodl")
GOAL_P50, GOAL_P95 = 0.01, 0.05  # of the target block interval, from the issue
START_TIMEOUT = 120.0  # seconds for a node to answer RPC, or a network to connect
SYNC_TIMEOUT = 120.0  # seconds for every node to reach the miner's tip
STOP_TIMEOUT = 30.0
POLL = 0.2
_used_ports: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, not one handed out before in this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port


class NodeError(RuntimeError):
    """A node died, stalled or answered an error."""


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) and of its live children,
    from /proc."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += process_cpu_seconds(int(child))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return total + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LocalNode:
    """A `dpodl node` child process in its own session (its miner child joins it), with
    its own data directory and ports, started as a user starts it."""

    def __init__(self, name: str, workdir: Path, *, peers: tuple[str, ...] = (),
                 mine: bool = False, datadir: Path | None = None, host: str = "127.0.0.1",
                 log_level: str = "info", threads: int = 0, flags: tuple[str, ...] = ()
                 ) -> None:
        self.name = name
        self.datadir = datadir or workdir / name
        self.host = host
        self.rpc_port, self.p2p_port = free_port(), free_port()
        self.out = workdir / f"{name}.out"
        argv = [DPODL, "node", "--datadir", str(self.datadir), "--rpc-port", str(self.rpc_port),
                "--p2p-port", str(self.p2p_port), "--p2p-bind", host, "--log-level", log_level]
        for peer in peers:
            argv += ["--peer", peer]
        if mine:
            argv.append("--mine")
        argv += flags
        # Only the flags configure it: no DPODL_* variable of the caller's, no ~/.dpodl.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPODL_")}
        env["HOME"] = str(workdir)
        if threads:  # torch's intra-op threads (the node itself leaves PyTorch's default)
            env["OMP_NUM_THREADS"] = str(threads)
        self._auth: str | None = None
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def __repr__(self) -> str:
        return f"{self.name} (pid {self.proc.pid}, p2p {self.host}:{self.p2p_port})"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.p2p_port}"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise NodeError(f"{self.name} exited with {self.proc.returncode}:\n"
                            + self.tail(self.out, 30))

    def call(self, method: str, *params: object, timeout: float = 30.0) -> object:
        if self._auth is None:
            cookie = (self.datadir / ".cookie").read_text().strip()
            self._auth = "Basic " + base64.b64encode(cookie.encode()).decode()
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                           "params": list(params)}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.rpc_port}/", body,
            headers={"Authorization": self._auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as e:
            reply = json.loads(e.read() or b"{}")
        if "error" in reply and reply["error"] is not None:
            raise NodeError(f"{self.name}: {method}{list(params)}: {reply['error']}")
        return reply["result"]

    def wait_rpc(self) -> None:
        """Until the node answers getblockcount (its cookie is written before RPC starts)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError, NodeError, ValueError):
                self.call("getblockcount", timeout=5.0)
                return
            self._auth = None  # a cookie of an earlier start, or none yet
            time.sleep(POLL)
        raise NodeError(f"{self.name} did not answer RPC in {START_TIMEOUT:.0f} s")

    def block_times(self, block_hash: str) -> tuple[float | None, float | None]:
        block = self.call("getblock", block_hash)
        assert isinstance(block, dict)
        return block["received"], block["accepted"]

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the node process and its live children
        (replay workers, the miner)."""
        return process_cpu_seconds(self.proc.pid)

    def debug_log(self) -> Path:
        return self.datadir / "debug.log"

    @staticmethod
    def tail(path: Path, lines: int) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return f"({path} does not exist)"

    def terminate(self) -> None:
        """Ask the node to stop (SIGTERM: it stops its miner and P2P, closes its database)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """SIGTERM, a wait, then SIGKILL to whatever is left of its session."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self!r} did not stop in {STOP_TIMEOUT:.0f} s; killing it", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def wait_until(predicate, what: str, nodes: list[LocalNode], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            node.check_alive()
        with contextlib.suppress(OSError, NodeError, ValueError):
            if predicate():
                return
        time.sleep(POLL)
    raise NodeError(f"timed out after {timeout:.0f} s waiting for {what}")


def quantile(values: list[float], q: float) -> float:
    """The q-quantile, linear between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> tuple[float, float, float]:
    return quantile(values, 0.5), quantile(values, 0.95), max(values)


# -- one network -------------------------------------------------------------------------------

def seed_peers(n: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Node i's seeds (indices): node i−1 and one random earlier node."""
    seeds: list[tuple[int, ...]] = [()]
    for i in range(1, n):
        extra = {rng.randrange(i - 1)} if i >= 2 else set()
        seeds.append(tuple(sorted({i - 1} | extra)))
    return seeds


def read_graph(nodes: list[LocalNode]) -> set[frozenset[int]]:
    """Links between nodes, from each node's outbound connections (inbound ones show the
    dialler's ephemeral port, which names no node)."""
    by_port = {n.p2p_port: i for i, n in enumerate(nodes)}
    edges = set()
    for i, node in enumerate(nodes):
        peers = node.call("getpeerinfo")
        assert isinstance(peers, list)
        for p in peers:
            port = int(p["addr"].rsplit(":", 1)[1])
            if not p["inbound"] and port in by_port and by_port[port] != i:
                edges.add(frozenset((i, by_port[port])))
    return edges


def hops(n: int, edges: set[frozenset[int]]) -> list[int | None]:
    """Breadth-first distance from node 0 (None: not reachable)."""
    dist: list[int | None] = [None] * n
    dist[0] = 0
    queue = deque([0])
    while queue:
        a = queue.popleft()
        for edge in edges:
            if a in edge:
                (b,) = edge - {a}
                if dist[b] is None:
                    dist[b] = dist[a] + 1  # type: ignore[operator]
                    queue.append(b)
    return dist


def run_network(label: str, n: int, args: argparse.Namespace, workdir: Path,
                nodes: list[LocalNode], rng: random.Random) -> dict:
    """Start `n` nodes, mine, wait for everyone; the per-block delays and the topology."""
    seeds = seed_peers(n, rng)
    fixed = args.topology == "fixed" and n > 2
    t0 = time.monotonic()
    for i in range(n):  # a node's seeds are started before it, so their ports are known
        nodes.append(LocalNode(f"{label.replace(' ', '')}-{i}", workdir,
                               peers=tuple(nodes[j].address for j in seeds[i]),
                               host=f"127.0.0.{2 + i}" if fixed else "127.0.0.1",
                               log_level=args.log_level, threads=args.node_threads))
        if fixed:
            # Each node refuses to dial any node but its seeds, as soon as it answers RPC:
            # the links are the seed graph's (a peer's inbound connections come from
            # 127.0.0.1, which is not banned, so the seed links stand).
            nodes[i].wait_rpc()
            for j in range(n):
                if j != i and j not in seeds[i]:
                    nodes[i].call("setban", f"127.0.0.{2 + j}", "add", 3600)
    for node in nodes:
        node.wait_rpc()
    miner = nodes[0]

    seed_edges = {frozenset((i, j)) for i in range(n) for j in seeds[i]}

    def connected() -> bool:
        return seed_edges <= read_graph(nodes)

    wait_until(connected, f"{label}: every seed link up", nodes, START_TIMEOUT)
    up = time.monotonic() - t0
    edges_start = read_graph(nodes)
    start_height = miner.call("getblockcount")
    assert isinstance(start_height, int)
    target = start_height + args.warmup + args.blocks

    def synced() -> bool:
        tip = miner.call("getbestblockhash")
        return all(node.call("getbestblockhash") == tip for node in nodes[1:])

    def wait_synced() -> None:
        try:
            wait_until(synced, f"{label}: every node at the miner's tip", nodes, SYNC_TIMEOUT)
        except NodeError:
            heights = [node.call("getblockcount") for node in nodes]
            print(f"{label}: heights {heights}; debug.log tails of the nodes behind:")
            for node, h in zip(nodes, heights, strict=True):
                if h != heights[0]:
                    print(f"--- {node!r} {node.debug_log()}\n"
                          f"{LocalNode.tail(node.debug_log(), 40)}")
            raise

    def tip_height() -> int:
        h = miner.call("getblockcount")
        assert isinstance(h, int)
        return h

    t_mine = time.monotonic()
    if args.continuous:
        assert miner.call("setgenerate", True) is True
        wait_until(lambda: tip_height() >= target, f"{label}: {target} blocks", nodes,
                   args.mine_timeout)
        assert miner.call("setgenerate", False) is False
        time.sleep(1.0)  # a solution already being handled may still add a block
        wait_synced()
    else:
        # One block at a time: the miner stops once its height moves, and starts again once
        # every node holds its tip (a block found meanwhile is measured too).
        while (h := tip_height()) < target:
            if time.monotonic() - t_mine > args.mine_timeout:
                raise NodeError(f"{label}: {h - start_height} blocks in {args.mine_timeout} s")
            assert miner.call("setgenerate", True) is True
            wait_until(lambda h=h: tip_height() > h, f"{label}: block {h + 1}", nodes,
                       args.mine_timeout)
            assert miner.call("setgenerate", False) is False
            time.sleep(0.2)  # a solution already being handled may still add a block
            wait_synced()
    mining_s = time.monotonic() - t_mine
    end_height = miner.call("getblockcount")
    assert isinstance(end_height, int)
    edges_end = read_graph(nodes)
    degrees = [node.call("getconnectioncount") for node in nodes]
    dist_start, dist_end = hops(n, edges_start), hops(n, edges_end)

    blocks = []  # per block: its height and, per other node, (first seen, checked)
    for height in range(start_height + 1, end_height + 1):
        block_hash = miner.call("getblockhash", height)
        assert isinstance(block_hash, str)
        _, mined = miner.block_times(block_hash)
        if mined is None:
            raise NodeError(f"{miner!r}: block {height} has no accepted time")
        per_node = []
        for i, node in enumerate(nodes[1:], start=1):
            received, accepted = node.block_times(block_hash)
            if received is None or accepted is None:
                raise NodeError(f"{node!r}: block {height} {block_hash} has no times "
                                f"({received}, {accepted})")
            per_node.append((i, received - mined, accepted - mined))
        blocks.append((height, per_node))
    return {"label": label, "up_s": up, "mining_s": mining_s, "blocks": blocks,
            "warmup": args.warmup, "mined": end_height - start_height,
            "edges_start": edges_start, "edges_end": edges_end, "degrees": degrees,
            "hops_start": dist_start, "hops_end": dist_end, "seeds": seeds}


def close_all(nodes: list[LocalNode], logs: Path | None = None) -> None:
    """Stop the nodes; with `logs`, keep a copy of each one's debug.log there."""
    # All asked at once (a node may finish a block check before it exits); one that cannot
    # be signalled must not leave the others running.
    for node in nodes:
        with contextlib.suppress(OSError):
            node.terminate()
    for node in nodes:
        with contextlib.suppress(OSError):
            node.close()
        if logs is not None and node.debug_log().exists():
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(node.debug_log(), logs / f"{node.datadir.parent.name}-{node.name}.log")
    nodes.clear()


# -- reporting ---------------------------------------------------------------------------------

def delays(result: dict) -> tuple[list[float], list[float], list[tuple[int, float]]]:
    """First-seen and checked delays past the warm-up blocks, and (hop, first seen)."""
    first, checked, by_hop = [], [], []
    for k, (_, per_node) in enumerate(result["blocks"]):
        if k < result["warmup"]:
            continue
        for i, seen, acc in per_node:
            first.append(seen)
            checked.append(acc)
            by_hop.append((result["hops_start"][i], seen))
    return first, checked, by_hop


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms ({seconds / DEV.target_block_time:6.2%})"


def print_run(result: dict) -> None:
    first, checked, by_hop = delays(result)
    n = len(result["degrees"])
    interval = result["mining_s"] / max(result["mined"], 1)
    print(f"  {result['label']}: up and connected in {result['up_s']:.1f} s; mined "
          f"{result['mined']} blocks in {result['mining_s']:.1f} s (one per {interval:.2f} s; "
          f"first {result['warmup']} left out), {len(first)} block arrivals")
    if n > 2:
        seeds = " ".join(f"{i}<-{','.join(map(str, s))}" for i, s in enumerate(result["seeds"])
                         if s)
        print(f"    seeds (node<-its --peer): {seeds}")
        print(f"    links at start {len(result['edges_start'])}, at end "
              f"{len(result['edges_end'])}; hops from the miner at start "
              f"{result['hops_start'][1:]}, at end {result['hops_end'][1:]}; "
              f"final getconnectioncount {result['degrees']}")
    for name, values in (("first seen", first), ("checked", checked)):
        p50, p95, top = summary(values)
        print(f"    {name:<10} p50 {fmt(p50)}  p95 {fmt(p95)}  max {fmt(top)}")
    if n > 2:
        for hop in sorted({h for h, _ in by_hop if h is not None}):
            values = [s for h, s in by_hop if h == hop]
            print(f"    first seen at {hop} hop(s), {len(values):3d} arrivals: "
                  f"p50 {values and fmt(quantile(values, 0.5))}  max {fmt(max(values))}")
    for height, per_node in result["blocks"][:result["warmup"]]:
        print(f"    warm-up block {height}: first seen max "
              f"{fmt(max(s for _, s, _ in per_node))}, checked max "
              f"{fmt(max(a for _, _, a in per_node))}")


def report(args: argparse.Namespace, results: list[tuple[dict, dict]]) -> None:
    tbt = DEV.target_block_time
    print(f"\n{os.cpu_count()} cores; target block time {tbt} s (consensus.params.DEV); "
          f"{len(results)} run(s) of {args.blocks} measured blocks (+{args.warmup} warm-up) "
          "each; medians over runs of each run's figures")
    rows = {}
    for which, index in ((f"{args.nodes} nodes", 0), ("2 nodes", 1)):
        per_run = [(summary(delays(r[index])[0]), summary(delays(r[index])[1]))
                   for r in results]
        rows[which] = per_run
        med = [statistics.median(x[k][j] for x in per_run) for k in (0, 1) for j in (0, 1, 2)]
        print(f"{which + ':':<9} first seen p50 {fmt(med[0])} p95 {fmt(med[1])} max {fmt(med[2])}")
        print(f"{'':<9} checked    p50 {fmt(med[3])} p95 {fmt(med[4])} max {fmt(med[5])}")
    for k, name in ((0, "first seen"), (1, "checked")):
        ratios = [a[k][j] / b[k][j] for a, b in zip(rows[f"{args.nodes} nodes"], rows["2 nodes"],
                                                     strict=True) for j in (0, 1)]
        p50s, p95s = ratios[0::2], ratios[1::2]
        print(f"{args.nodes} nodes / 2 nodes, {name}: p50 {statistics.median(p50s):.2f}x "
              f"(runs {min(p50s):.2f}-{max(p50s):.2f}), p95 {statistics.median(p95s):.2f}x "
              f"(runs {min(p95s):.2f}-{max(p95s):.2f})")
    p50 = statistics.median(x[0][0] for x in rows[f"{args.nodes} nodes"]) / tbt
    p95 = statistics.median(x[0][1] for x in rows[f"{args.nodes} nodes"]) / tbt
    print(f"goal, {args.nodes} nodes first seen: p50 {p50:.2%} <= {GOAL_P50:.0%}: "
          f"{'met' if p50 <= GOAL_P50 else 'NOT met'}; p95 {p95:.2%} <= {GOAL_P95:.0%}: "
          f"{'met' if p95 <= GOAL_P95 else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8, help="nodes in the measured network")
    ap.add_argument("--blocks", type=int, default=10, help="measured blocks per run")
    ap.add_argument("--warmup", type=int, default=1,
                    help="blocks mined first in each run and left out (a fresh node's first "
                         "check loads the dataset)")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs, each one of both networks (medians are reported)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random seed links")
    ap.add_argument("--topology", choices=("fixed", "gossip"), default="fixed",
                    help="gossip: the seed links plus whatever address gossip adds (the "
                         "nodes as they run); fixed: only the seed links, each node on its "
                         "own loopback address and banning the others' (setban)")
    ap.add_argument("--node-threads", type=int, default=0,
                    help="OMP_NUM_THREADS for the nodes (0: unset, PyTorch's default)")
    ap.add_argument("--continuous", action="store_true",
                    help="let the miner run through all the blocks, not one block at a time")
    ap.add_argument("--mine-timeout", type=float, default=300.0,
                    help="seconds to wait for a run's blocks")
    ap.add_argument("--log-level", default="info", choices=("debug", "info"),
                    help="the nodes' log level")
    ap.add_argument("--logs", type=Path, help="copy every node's debug.log into this folder")
    args = ap.parse_args()
    if args.nodes < 2 or args.blocks < 1 or args.runs < 1 or args.warmup < 0:
        ap.error("need --nodes >= 2, --blocks >= 1, --runs >= 1, --warmup >= 0")
    print(f"cd {os.getcwd()} && {sys.executable} -m bench.propagation "
          + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if v is not None and v is not False).replace(" True", ""), flush=True)
    # SIGTERM ends this process through the finally below, which stops the nodes: they run
    # in their own sessions, so nothing else would.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rng = random.Random(args.seed)
    results = []
    nodes: list[LocalNode] = []
    with tempfile.TemporaryDirectory(prefix="dpodl-bench-prop-") as tmp:
        try:
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", flush=True)
                out = {}
                order = [(f"{args.nodes} nodes", args.nodes, 0), ("2 nodes", 2, 1)]
                for label, n, index in order if run % 2 == 0 else order[::-1]:
                    workdir = Path(tmp) / f"run{run}-{index}"
                    workdir.mkdir()
                    try:
                        out[index] = run_network(label, n, args, workdir, nodes, rng)
                    finally:
                        close_all(nodes, args.logs)
                    print_run(out[index])
                results.append((out[0], out[1]))
        finally:
            close_all(nodes, args.logs)
    report(args, results)


if __name__ == "__main__":
    main()
