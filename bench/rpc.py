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

The client runs in this process: an aiohttp ClientSession with a fixed number of workers,
each sending one request at a time over a kept-alive connection for a fixed duration per
sample (after a short warm-up), checking every answer. It competes with the servers (and
the miner) for the same cores, which is part of what the figures show. The order of the
contenders rotates between repetitions; medians over repetitions are reported, ratios as
the median of the per-repetition ratios.
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
from dataclasses import dataclass
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

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all its threads, so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK

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
    server_cpu_us: float  # server process CPU per request
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
        server_cpu = server.cpu_seconds() - server_cpu
        client_cpu = time.process_time() - client_cpu
        busy, total = (b - a for a, b in zip(cores, machine_cpu(), strict=True))
    n = len(latencies)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Sample(n / elapsed, cuts[49] * 1e3, cuts[98] * 1e3, server_cpu / n * 1e6,
                  client_cpu / n * 1e6, busy / max(total, 1))


# -- the run ---------------------------------------------------------------------------------

BARE, BARE_AA, IDLE, MINING = "bare aiohttp", "bare A/A", "node idle", "node mining"


@dataclass(slots=True)
class MiningLog:
    windows: int = 0
    confirmed: int = 0
    draws: int = 0
    blocks: int = 0
    steps: int = 0  # miner progress reports whose step count moved


async def run(args: argparse.Namespace, home: Path, servers: list[Server]) -> None:
    bare = start_bare(BARE, home)
    servers.append(bare)
    bare_aa = start_bare(BARE_AA, home)
    servers.append(bare_aa)
    node = start_node(home)
    servers.append(node)

    async with aiohttp.ClientSession() as control:
        for server in (bare, bare_aa):
            await wait_until(server, lambda s=server: call(control, s, "ping"),
                             f"{server.name} to answer")

        async def node_up() -> bool:
            add_cookie(node, home)
            return await call(control, node, "getblockcount") >= 0

        t0 = time.monotonic()
        await wait_until(node, node_up, "the node to answer getblockcount")
        print(f"node up in {time.monotonic() - t0:.1f} s at height "
              f"{await call(control, node, 'getblockcount')}", flush=True)

        log = MiningLog()

        async def mining_window() -> Sample:
            before = await call(control, node, "getmininginfo")
            assert await call(control, node, "setgenerate", True) is True
            await wait_until(node, lambda: _moved(control, node, before),
                             "the miner's first draw")
            start = await call(control, node, "getmininginfo")
            sample = await measure(node, args.workers, args.duration, args.warmup)
            end = await call(control, node, "getmininginfo")
            assert await call(control, node, "setgenerate", False) is False
            log.windows += 1
            log.draws += end["draws"] - start["draws"]
            log.blocks += end["minedblocks"] - start["minedblocks"]
            log.steps += (start["current"] or {}).get("steps") != (end["current"] or {}).get(
                "steps")
            if end["draws"] > start["draws"] or end["minedblocks"] > start["minedblocks"]:
                log.confirmed += 1
            if end["error"]:
                raise RuntimeError(f"the miner reported an error: {end['error']}")
            await asyncio.sleep(SETTLE)
            return sample

        async def idle_window() -> Sample:
            info = await call(control, node, "getmininginfo")
            assert info["generate"] is False, info
            return await measure(node, args.workers, args.duration, args.warmup)

        contenders = {
            BARE: lambda: measure(bare, args.workers, args.duration, args.warmup),
            IDLE: idle_window,
            BARE_AA: lambda: measure(bare_aa, args.workers, args.duration, args.warmup),
            MINING: mining_window,
        }
        names = list(contenders)
        samples: dict[str, list[Sample]] = {name: [] for name in names}
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:  # rotated, so no contender always follows the miner's stop
                samples[name].append(await contenders[name]())
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{name} {samples[name][-1].rps:,.0f}" for name in names) + " req/s",
                flush=True)
        height = await call(control, node, "getblockcount")

    report(args, samples, log, height)


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
    print(f"{'contender':<14}{'req/s':>9}{'min':>8}{'max':>8}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'server us/req':>15}{'client us/req':>15}{'cores busy':>12}")
    for name, ss in samples.items():
        rps = [s.rps for s in ss]
        med = {field: statistics.median(getattr(s, field) for s in ss)
               for field in ("p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us", "busy")}
        print(f"{name:<14}{statistics.median(rps):>9,.0f}{min(rps):>8,.0f}{max(rps):>8,.0f}"
              f"{med['p50_ms']:>8.2f}{med['p99_ms']:>8.2f}{med['server_cpu_us']:>15.0f}"
              f"{med['client_cpu_us']:>15.0f}{med['busy']:>11.0%}")
    print(f"mining windows: {log.confirmed}/{log.windows} with draws or minedblocks growing "
          f"across the window ({log.draws} draws, {log.blocks} blocks in all; chain height "
          f"{height} at the end)")
    rows = [("A/A: bare A/A / bare", BARE_AA, BARE, None),
            ("node idle / bare", IDLE, BARE, GOAL_NODE),
            ("node mining / node idle", MINING, IDLE, GOAL_MINING),
            ("node mining / bare", MINING, BARE, None)]
    for label, a, b, goal in rows:
        med, lo, hi = ratio(samples, a, b)
        verdict = "" if goal is None else (
            f"   goal >= {goal:.2f}: {'met' if med >= goal else 'NOT met'}")
        print(f"{label:<26}{med:>6.2f}  (reps {lo:.2f}-{hi:.2f}){verdict}")
    if log.confirmed < log.windows:
        print(f"warning: {log.windows - log.confirmed} mining window(s) showed no new draw or "
              "block; the miner's draws may outlast a window (progress moved in "
              f"{log.steps} of them)")


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
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="dpodl-bench-rpc-") as tmp:
        try:
            asyncio.run(run(args, Path(tmp), servers))
        finally:
            for server in reversed(servers):  # the node first: its miner must not outlive it
                server.close()


if __name__ == "__main__":
    main()
