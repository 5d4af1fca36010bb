"""JSON-RPC throughput: a real `dpodl node` answering getblockcount, idle and while it
mines, against a bare aiohttp endpoint on the same machine, through the same client.

Contenders, each a server in its own process on 127.0.0.1:
- bare: a minimal aiohttp `web.Application`, one POST handler that parses the JSON body
  and answers a JSON-RPC result of a constant int; no auth, no access log (as the node).
- bare A/A: a second, identical bare server, for the noise floor.
- node idle: `dpodl node` (own HOME and DPODL_RPC_PORT, as tests/test_node.py starts it),
  getblockcount with the cookie's credentials, mining off.
- node mining: the same node after `setgenerate true`, measured once getmininginfo shows
  the miner's first draw; a window counts as mining only if getmininginfo's draws or
  minedblocks grew across it. `setgenerate false` follows, so idle and mining samples of
  the one node interleave.
- bare, mining: the bare server measured in the same mining phase, which separates what
  sharing the cores with the miner costs any server from what the node itself loses.

The client runs in this process: an aiohttp ClientSession with a fixed number of workers,
each sending one request at a time over a kept-alive connection for a fixed duration per
sample (after a short warm-up), checking every answer. It competes with the servers (and
the miner) for the same cores, which is part of what the figures show. The order of the
contenders rotates between repetitions; medians over repetitions are reported, ratios as
the median of the per-repetition ratios. Where the client, not the server, runs out of CPU,
requests per second cannot tell the servers apart; the servers' CPU time per request
(from /proc) is printed beside them for that.
"""

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

GOAL_NODE = 0.50  # node idle / bare requests per second, from the issue
GOAL_MINING = 0.80  # node mining / node idle requests per second, from the issue
DPODL = str(Path(sys.executable).parent / "dpodl")
START_TIMEOUT = 90.0  # seconds for a server to answer, or the miner to report its first draw
STOP_TIMEOUT = 30.0
SETTLE = 0.5  # seconds after setgenerate false, for a block check in flight to finish
REQUEST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "getblockcount",
                      "params": []}).encode()
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


# -- the bare server (run as `python -m bench.rpc --serve-bare PORT`) ------------------------

async def _bare_handler(request: web.Request) -> web.Response:
    message = json.loads(await request.read())
    return web.Response(text=json.dumps({"jsonrpc": "2.0", "result": 0, "id": message["id"]}),
                        content_type="application/json")


async def serve_bare(port: int) -> None:
    """Serve the bare endpoint until SIGTERM or SIGINT."""
    app = web.Application()
    app.router.add_post("/", _bare_handler)
    runner = web.AppRunner(app, access_log=None)  # the node turns its access log off too
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# -- server processes ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server child process in its own process group (the node's miner child and
    multiprocessing's helper join it), its URL and the headers its requests carry."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path,
                 port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}/"
        self.headers = {"Content-Type": "application/json"}
        self.log = log
        with open(log, "wb") as out:  # a file, not a pipe nobody reads, which could fill up
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def cpu_seconds(self) -> tuple[float, float]:
        """User + system CPU time so far of the server's main thread (its event loop) and
        of all its other threads (the node's chain thread, the miner's reader thread)."""
        main = other = 0.0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICK
                if task.name == str(self.proc.pid):
                    main += seconds
                else:
                    other += seconds
        return main, other

    def close(self) -> None:
        """SIGTERM (the node stops its miner and removes its cookie), then SIGKILL to
        whatever is left of the process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop in {STOP_TIMEOUT:.0f} s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_bare(name: str, workdir: Path) -> Server:
    port = free_port()
    return Server(name, [sys.executable, "-m", "bench.rpc", "--serve-bare", str(port)],
                  dict(os.environ), workdir / f"{port}.log", port)


def start_node(home: Path) -> Server:
    """`dpodl node`, not mining, with its data directory under `home`."""
    port = free_port()
    env = {**os.environ, "HOME": str(home), "DPODL_RPC_PORT": str(port)}
    env.pop("DPODL_MINE", None)
    env.pop("DPODL_DATADIR", None)
    return Server("node", [DPODL, "node"], env, home / "node.log", port)


def add_cookie(node: Server, home: Path) -> None:
    """Authorize the node's requests with its cookie, as `dpodl rpc` does."""
    cookie = (home / ".dpodl" / "dev" / ".cookie").read_text().strip()
    token = base64.b64encode(cookie.encode()).decode()
    node.headers["Authorization"] = f"Basic {token}"


async def call(session: aiohttp.ClientSession, server: Server, method: str,
               *params: object) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
    async with session.post(server.url, data=body, headers=server.headers) as response:
        reply = await response.json()
    if response.status != 200 or "error" in reply:
        raise RuntimeError(f"{server.name}: {method} answered {response.status} {reply}")
    return reply["result"]


async def wait_until(server: Server, predicate, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        with contextlib.suppress(OSError, aiohttp.ClientError, RuntimeError, ValueError):
            if await predicate():
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"timed out after {START_TIMEOUT:.0f} s waiting for {what}")


# -- the client ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    loop_cpu_us: float  # the server's main thread (event loop) CPU per request
    other_cpu_us: float  # the server's other threads' CPU per request
    client_cpu_us: float  # this process's CPU per request
    busy: float  # share of all cores busy (anyone's work, steal included) in the window


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


async def load(session: aiohttp.ClientSession, server: Server, workers: int,
               seconds: float) -> list[float]:
    """Keep `workers` requests in flight for `seconds`; each one's latency in seconds."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while (t0 := time.perf_counter()) < deadline:
            async with session.post(server.url, data=REQUEST, headers=server.headers) as r:
                raw = await r.read()
            latencies.append(time.perf_counter() - t0)
            if r.status != 200 or not isinstance(json.loads(raw).get("result"), int):
                raise RuntimeError(f"{server.name} answered {r.status}: {raw[:200]!r}")

    await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies


async def measure(server: Server, workers: int, seconds: float, warmup: float) -> Sample:
    connector = aiohttp.TCPConnector(limit=workers)  # one kept-alive connection per worker
    async with aiohttp.ClientSession(connector=connector) as session:
        await load(session, server, workers, warmup)
        server_cpu, client_cpu, cores = server.cpu_seconds(), time.process_time(), machine_cpu()
        t0 = time.perf_counter()
        latencies = await load(session, server, workers, seconds)
        elapsed = time.perf_counter() - t0
        server_cpu = [b - a for a, b in zip(server_cpu, server.cpu_seconds(), strict=True)]
        client_cpu = time.process_time() - client_cpu
        busy, total = (b - a for a, b in zip(cores, machine_cpu(), strict=True))
    n = len(latencies)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Sample(n / elapsed, cuts[49] * 1e3, cuts[98] * 1e3, server_cpu[0] / n * 1e6,
                  server_cpu[1] / n * 1e6, client_cpu / n * 1e6, busy / max(total, 1))


# -- the run ---------------------------------------------------------------------------------

BARE, BARE_AA, IDLE = "bare aiohttp", "bare A/A", "node idle"
MINING, BARE_MINING = "node mining", "bare, mining"  # the latter: bare while the node mines
NAMES = (BARE, IDLE, BARE_AA, MINING, BARE_MINING)


@dataclass(slots=True)
class MiningLog:
    """What getmininginfo said across the windows measured while the node mined."""

    windows: int = 0
    confirmed: int = 0  # windows across which draws or minedblocks grew
    trained: int = 0  # of the others, windows across which the draw in training moved on
    draws: int = 0
    blocks: int = 0
    mtxs: int = 0
    node_solutions: int = 0  # blocks and model txs found while the node itself was measured
    node_seconds: float = 0.0
    quiet: list[float] = field(default_factory=list)  # node req/s in windows with no solution

    def record(self, start: dict, end: dict, node_rps: float | None, seconds: float) -> None:
        if end["error"] or not end["generate"]:
            raise RuntimeError(f"the node is not mining: {end}")
        self.windows += 1
        if end["draws"] > start["draws"] or end["minedblocks"] > start["minedblocks"]:
            self.confirmed += 1
        elif start["current"] != end["current"]:  # one long draw: its checkpoints advanced
            self.trained += 1
        self.draws += end["draws"] - start["draws"]
        self.blocks += end["minedblocks"] - start["minedblocks"]
        self.mtxs += end["modeltxs"] - start["modeltxs"]
        solutions = (end["minedblocks"] - start["minedblocks"]
                     + end["modeltxs"] - start["modeltxs"])
        if node_rps is not None:
            self.node_solutions += solutions
            self.node_seconds += seconds
            if not solutions:
                self.quiet.append(node_rps)


async def run(args: argparse.Namespace, home: Path, servers: list[Server]) -> None:
    bare = start_bare(BARE, home)
    servers.append(bare)
    bare_aa = start_bare(BARE_AA, home)
    servers.append(bare_aa)
    node = start_node(home)
    servers.append(node)

    async with aiohttp.ClientSession() as control:
        for server in (bare, bare_aa):
            await wait_until(server, lambda s=server: _answers(control, s),
                             f"{server.name} to answer")

        async def node_up() -> bool:
            add_cookie(node, home)
            return await call(control, node, "getblockcount") >= 0

        t0 = time.monotonic()
        await wait_until(node, node_up, "the node to answer getblockcount")
        print(f"node up in {time.monotonic() - t0:.1f} s at height "
              f"{await call(control, node, 'getblockcount')}", flush=True)

        log = MiningLog()
        samples: dict[str, list[Sample]] = {name: [] for name in NAMES}

        async def idle_phase(order: list[tuple[str, Server]]) -> None:
            info = await call(control, node, "getmininginfo")
            if info["generate"]:
                raise RuntimeError(f"the node still mines: {info}")
            for name, server in order:
                samples[name].append(await measure(server, args.workers, args.duration,
                                                   args.warmup))

        async def mining_phase(order: list[tuple[str, Server]]) -> None:
            before = await call(control, node, "getmininginfo")
            assert await call(control, node, "setgenerate", True) is True
            # Not before the miner's first draw: the child's start (torch's import) is not
            # the steady state the goal is about.
            await wait_until(node, lambda: _moved(control, node, before),
                             "the miner's first draw")
            try:
                for name, server in order:
                    t0 = time.perf_counter()
                    start = await call(control, node, "getmininginfo")
                    sample = await measure(server, args.workers, args.duration, args.warmup)
                    end = await call(control, node, "getmininginfo")
                    log.record(start, end, sample.rps if server is node else None,
                               time.perf_counter() - t0)
                    samples[name].append(sample)
            finally:
                assert await call(control, node, "setgenerate", False) is False
            await asyncio.sleep(SETTLE)

        for rep in range(args.reps):
            # Rotated orders, and the mining phase first in every other repetition, so
            # that no contender always runs first, or right after the miner stopped.
            idle = _rotate([(BARE, bare), (IDLE, node), (BARE_AA, bare_aa)], rep)
            mining = _rotate([(MINING, node), (BARE_MINING, bare)], rep)
            if rep % 2 == 0:
                await idle_phase(idle)
                await mining_phase(mining)
            else:
                await mining_phase(mining)
                await idle_phase(idle)
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{name} {samples[name][-1].rps:,.0f}" for name in NAMES) + " req/s",
                flush=True)
        height = await call(control, node, "getblockcount")

    report(args, samples, log, height)


def _rotate(items: list, n: int) -> list:
    n %= len(items)
    return items[n:] + items[:n]


async def _answers(session: aiohttp.ClientSession, server: Server) -> bool:
    return await call(session, server, "ping") == 0


async def _moved(session: aiohttp.ClientSession, node: Server, before: dict) -> bool:
    info = await call(session, node, "getmininginfo")
    return info["draws"] > before["draws"] or info["minedblocks"] > before["minedblocks"]


def ratio(samples: dict[str, list[Sample]], a: str, b: str) -> tuple[float, float, float]:
    """Median, min and max over repetitions of a's requests/s over b's."""
    per_rep = [x.rps / y.rps for x, y in zip(samples[a], samples[b], strict=True)]
    return statistics.median(per_rep), min(per_rep), max(per_rep)


def report(args: argparse.Namespace, samples: dict[str, list[Sample]], log: MiningLog,
           height: int) -> None:
    cores = os.cpu_count()
    print(f"\n{cores} cores ({len(os.sched_getaffinity(0))} usable here), shared by the client "
          f"(this process), the server and, while mining, the miner's child process (1 torch "
          f"thread); {args.workers} workers, {args.duration:g} s per sample after "
          f"{args.warmup:g} s warm-up, median of {args.reps} reps")
    print(f"'{BARE_MINING}': the bare server measured while the node mines. CPU per request: "
          "the server's event-loop thread, its other threads, the client; cores busy: all "
          "processes")
    print(f"{'contender':<14}{'req/s':>9}{'min':>8}{'max':>8}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'loop us':>9}{'other us':>10}{'client us':>11}{'cores busy':>12}")
    for name, ss in samples.items():
        rps = [s.rps for s in ss]
        med = {key: statistics.median(getattr(s, key) for s in ss)
               for key in ("p50_ms", "p99_ms", "loop_cpu_us", "other_cpu_us", "client_cpu_us",
                             "busy")}
        print(f"{name:<14}{statistics.median(rps):>9,.0f}{min(rps):>8,.0f}{max(rps):>8,.0f}"
              f"{med['p50_ms']:>8.2f}{med['p99_ms']:>8.2f}{med['loop_cpu_us']:>9.0f}"
              f"{med['other_cpu_us']:>10.0f}{med['client_cpu_us']:>11.0f}{med['busy']:>12.0%}")
    print(f"mining windows: {log.confirmed}/{log.windows} with draws or minedblocks growing "
          f"across the window ({log.draws} draws, {log.blocks} blocks, {log.mtxs} model txs in "
          f"all; chain height {height} at the end); while the node itself was measured "
          f"mining it received {log.node_solutions / log.node_seconds:.1f} solutions/s "
          "(blocks and model txs), each published and checked on its chain thread")
    if log.quiet:
        idle = statistics.median(s.rps for s in samples[IDLE])
        print(f"mining windows in which the node received no solution (no block or model tx "
              f"to check): {len(log.quiet)}, median {statistics.median(log.quiet):,.0f} req/s "
              f"= {statistics.median(log.quiet) / idle:.2f} of node idle")
    rows = [("A/A: bare A/A / bare", BARE_AA, BARE, None),
            ("node idle / bare", IDLE, BARE, GOAL_NODE),
            ("node mining / node idle", MINING, IDLE, GOAL_MINING),
            ("node mining / bare", MINING, BARE, None),
            ("bare, mining / bare", BARE_MINING, BARE, None),
            ("node mining / bare, mining", MINING, BARE_MINING, None)]
    for label, a, b, goal in rows:
        med, lo, hi = ratio(samples, a, b)
        verdict = "" if goal is None else (
            f"   goal >= {goal:.2f}: {'met' if med >= goal else 'NOT met'}")
        print(f"{label:<28}{med:>6.2f}  (reps {lo:.2f}-{hi:.2f}){verdict}")
    cpu = statistics.median((b.loop_cpu_us + b.other_cpu_us) / (n.loop_cpu_us + n.other_cpu_us)
                            for b, n in zip(samples[BARE], samples[IDLE], strict=True))
    print(f"server CPU per request, bare / node idle: {cpu:.2f} (the node's capacity relative "
          "to bare where the server, not the client, is what runs out of CPU)")
    if log.confirmed < log.windows:
        print(f"warning: {log.windows - log.confirmed} window(s) while mining showed no new "
              f"draw or block; in {log.trained} of them the draw in training advanced")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds timed per sample")
    ap.add_argument("--warmup", type=float, default=0.3,
                    help="seconds of untimed load before each sample")
    ap.add_argument("--workers", type=int, default=8,
                    help="concurrent client requests (one connection each)")
    ap.add_argument("--reps", type=int, default=7,
                    help="repetitions of every contender (median is reported)")
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare is not None:
        asyncio.run(serve_bare(args.serve_bare))
        return
    from bench.common import start  # here: the bare server's process need not import torch

    start("bench.rpc", args)
    # SIGTERM ends this process through the finally below, which stops the servers: they
    # run in their own sessions, so nothing else would.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="dpodl-bench-rpc-") as tmp:
        try:
            asyncio.run(run(args, Path(tmp), servers))
        finally:
            for server in reversed(servers):  # the node first: its miner must not outlive it
                server.close()


if __name__ == "__main__":
    main()
