"""Syncing N blocks from a local peer vs verifying the same N blocks in one process.

1. Source: one `dpodl node --mine` on a fresh data directory mines until its chain holds
   --blocks blocks, then stops; N is the height it stopped at (it may overshoot by one
   or two). Every measurement below works on copies of that data directory.
2. "direct": a child Python process (fresh, as a node is: the dataset is loaded and
   scikit-learn imported at the first block check, inside the timing in both cases)
   opens a copy of the source's chain/ LevelDB, reads blocks 1..N by height
   (ChainStore.main_chain_id / get_block) into memory, opens a fresh LevelDB with a
   ChainStore whose DPoDLEngine reads the artifacts (models, histories, checkpoints)
   from the source copy through an ArtifactStore, and times only the add_block loop.
3. "P2P": a node serving a copy of the source data directory (not mining) and a fresh
   node with `--peer` to it. Timed from the fresh node's `received` of its first block
   to its `accepted` of the last (getblock), so process start-up and the torch import
   are out; the handshake, headers, block and artifact transfers, and the node's event
   loop and chain thread are in.

Fairness: `dpodl node` does not call torch.set_num_threads (only the miner's child does,
which these nodes do not start), so its chain thread verifies with PyTorch's default
intra-op threads, as many as the cores; the direct process keeps that default too and
prints the count (--threads N sets N for both: torch.set_num_threads in the direct
process, OMP_NUM_THREADS for the nodes). Both verify with the same engine settings:
q_local = 2 private audits drawn from the OS's randomness, so the work differs slightly
from run to run (each verifier replays its own private intervals). The direct store's
engine reads every artifact from the source's complete store; the P2P node fetches only
what its audits need. In the P2P case a second process (the serving node) shares the
cores.

The two measurements alternate in order from run to run; the medians over runs and the
median of the per-run ratios P2P / direct are reported, and the same for blocks 2..N
alone: on the digits task the first block check loads the dataset (scikit-learn's
import), on both sides, and takes about as long as all the other blocks together. CPU
time (the direct process's; the two nodes', from /proc) is printed beside the wall
times: less sensitive to whatever else runs on the machine.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.propagation import LocalNode, NodeError, close_all, process_cpu_seconds, wait_until
from node.config import DEFAULT_VERIFY_WORKERS

GOAL = 1.2  # P2P sync time / direct verification time, from the issue
START_TIMEOUT = 120.0


# -- direct (run as `python -m bench.sync --direct SOURCE_CHAIN WORKDIR`) ----------------------

def direct(source_chain: Path, workdir: Path, threads: int, workers: int) -> dict:
    """Add the source's main chain to a fresh store in this process; the add_block loop's
    wall time and each block's."""
    import concurrent.futures

    import torch

    if threads:
        torch.set_num_threads(threads)

    from consensus.params import DEV
    from mining.replay import ReplayPool
    from mining.trainer import DataCache
    from mining.verifier import DPoDLEngine
    from storage.artifacts import ArtifactStore
    from storage.chain import ChainStore
    from storage.db import Database

    with Database(source_chain) as source_db:
        artifacts = ArtifactStore(source_db)
        source = ChainStore(source_db, DEV, DPoDLEngine(artifacts, DataCache(None)))
        blocks = []
        for height in range(1, source.height + 1):
            block_id = source.main_chain_id(height)
            block = source.get_block(block_id) if block_id is not None else None
            if block is None:
                raise RuntimeError(f"source: no block at height {height}")
            blocks.append(block)
        # Replays where the node runs them, the workers started and warm before the
        # timing, as a node starts them when it opens (before any block comes).
        pool = ReplayPool(workers, None) if workers else None
        if pool is not None:
            concurrent.futures.wait(pool.prepare(DEV.genesis_task))
        with Database(workdir / "direct-chain") as db:
            store = ChainStore(db, DEV, DPoDLEngine(artifacts, DataCache(None), replayer=pool))
            per_block = []
            cpu0 = process_cpu_seconds(os.getpid())
            t0 = time.perf_counter()
            for block in blocks:
                t = time.perf_counter()
                result = store.add_block(block)
                per_block.append(time.perf_counter() - t)
                if result.status != "connected":
                    raise RuntimeError(f"block {block.header.height}: {result.status}")
            elapsed = time.perf_counter() - t0
            cpu = process_cpu_seconds(os.getpid()) - cpu0
            store.close()
        if pool is not None:
            pool.close()
        source.close()
    return {"seconds": elapsed, "cpu": cpu, "blocks": len(blocks), "per_block": per_block,
            "threads": torch.get_num_threads()}


def run_direct(source: Path, workdir: Path, threads: int, workers: int) -> dict:
    """`direct` in a fresh child process, on a fresh copy of the source's chain."""
    chain = workdir / "source-chain"
    shutil.copytree(source / "chain", chain, ignore=shutil.ignore_patterns(".lock"))
    out = workdir / "direct.json"
    subprocess.run([sys.executable, "-m", "bench.sync", "--direct", str(chain), str(workdir),
                    "--direct-out", str(out), "--threads", str(threads),
                    "--verify-workers", str(workers)],
                   check=True, stdin=subprocess.DEVNULL)
    return json.loads(out.read_text())


# -- P2P ------------------------------------------------------------------------------------

def run_p2p(source: Path, workdir: Path, height: int, args: argparse.Namespace,
            nodes: list[LocalNode]) -> dict:
    """A node serving a copy of the source and a fresh node syncing from it."""
    served = workdir / "served"
    shutil.copytree(source, served, ignore=shutil.ignore_patterns(".lock", ".cookie"))
    flags = ("--verify-workers", str(args.verify_workers))
    server = LocalNode("server", workdir, datadir=served, threads=args.threads,
                       log_level=args.log_level, flags=flags)
    nodes.append(server)
    server.wait_rpc()
    if server.call("getblockcount") != height:
        raise NodeError(f"the server is at {server.call('getblockcount')}, not {height}")
    t_start = time.time()
    fresh = LocalNode("fresh", workdir, threads=args.threads, log_level=args.log_level,
                      flags=flags)
    nodes.append(fresh)
    fresh.wait_rpc()
    # Started up, as the direct loop's pool is before its timing: the replay workers have
    # imported torch and loaded the dataset. Then the peer, and the sync.
    wait_until(lambda: fresh.call("getblockchaininfo")["verifyready"],  # type: ignore[index]
               "the fresh node's replay workers", nodes, START_TIMEOUT)
    cpu0 = (fresh.cpu_seconds(), server.cpu_seconds())
    fresh.call("addnode", server.address, "add")
    try:
        wait_until(lambda: fresh.call("getblockcount") == height,
                   f"the fresh node to sync {height} blocks", nodes, args.sync_timeout)
    except NodeError:
        with contextlib.suppress(OSError, NodeError, ValueError):
            print(f"fresh node at {fresh.call('getblockcount')} of {height}")
        for node in nodes:
            print(f"--- {node!r} {node.debug_log()}\n{LocalNode.tail(node.debug_log(), 40)}")
        raise
    cpu = (fresh.cpu_seconds() - cpu0[0], server.cpu_seconds() - cpu0[1])
    received, accepted = [], []
    for h in range(1, height + 1):
        block_hash = fresh.call("getblockhash", h)
        assert isinstance(block_hash, str)
        r, a = fresh.block_times(block_hash)
        if r is None or a is None:
            raise NodeError(f"fresh node: block {h} has no times ({r}, {a})")
        received.append(r)
        accepted.append(a)
    first = min(received)
    # Per block: the time since the previous block was accepted (blocks arrive ahead of
    # their check and queue), comparable with the direct loop's time per add_block.
    done = [first, *accepted]
    return {"seconds": max(accepted) - first, "start_to_first_block": first - t_start,
            "cpu": cpu[0], "server_cpu": cpu[1],
            "per_block": [b - a for a, b in zip(done, done[1:], strict=False)]}


# -- the run --------------------------------------------------------------------------------

def mine_source(workdir: Path, blocks: int, timeout: float, nodes: list[LocalNode]) -> int:
    """Mine `blocks` blocks into workdir/source; the height the node stopped at."""
    miner = LocalNode("source", workdir, mine=True)
    nodes.append(miner)
    miner.wait_rpc()
    t0 = time.monotonic()
    wait_until(lambda: miner.call("getblockcount") >= blocks, f"{blocks} blocks mined",
               nodes, timeout)
    miner.call("setgenerate", False)
    time.sleep(1.0)  # a solution already being handled may still add a block
    height = miner.call("getblockcount")
    assert isinstance(height, int)
    print(f"source: mined {height} blocks in {time.monotonic() - t0:.1f} s", flush=True)
    close_all(nodes)
    return height


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=30, help="blocks to mine and sync (at least)")
    ap.add_argument("--runs", type=int, default=3, help="runs of both (medians are reported)")
    ap.add_argument("--sync-timeout", type=float, default=600.0,
                    help="seconds for the fresh node to sync, per run")
    ap.add_argument("--mine-timeout", type=float, default=600.0,
                    help="seconds to mine the source chain")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for the direct process and (OMP_NUM_THREADS) "
                         "the nodes; 0: unset, PyTorch's default, as `dpodl node` runs")
    ap.add_argument("--verify-workers", type=int, default=DEFAULT_VERIFY_WORKERS,
                    help="replay worker processes, in the nodes (--verify-workers) and the "
                         "direct loop alike; 0: on the chain thread (default: the node's, "
                         "%(default)s here)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info"),
                    help="the nodes' log level")
    ap.add_argument("--logs", type=Path, help="copy every node's debug.log into this folder")
    ap.add_argument("--direct", nargs=2, metavar=("CHAIN", "WORKDIR"), help=argparse.SUPPRESS)
    ap.add_argument("--direct-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.direct:
        result = direct(Path(args.direct[0]), Path(args.direct[1]), args.threads,
                        args.verify_workers)
        Path(args.direct_out).write_text(json.dumps(result))
        return
    if args.blocks < 1 or args.runs < 1:
        ap.error("need --blocks >= 1 and --runs >= 1")
    print(f"cd {os.getcwd()} && {sys.executable} -m bench.sync --blocks {args.blocks} "
          f"--runs {args.runs} --threads {args.threads} --verify-workers {args.verify_workers} "
          f"--sync-timeout {args.sync_timeout:g} "
          f"--mine-timeout {args.mine_timeout:g} --log-level {args.log_level}"
          + (f" --logs {args.logs}" if args.logs else ""), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    nodes: list[LocalNode] = []
    results: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory(prefix="dpodl-bench-sync-") as tmp:
        try:
            height = mine_source(Path(tmp), args.blocks, args.mine_timeout, nodes)
            source = Path(tmp) / "source"
            for run in range(args.runs):
                out: dict[str, dict] = {}
                for which in (("direct", "p2p") if run % 2 == 0 else ("p2p", "direct")):
                    workdir = Path(tmp) / f"run{run}-{which}"
                    workdir.mkdir()
                    if which == "direct":
                        out[which] = run_direct(source, workdir, args.threads,
                                                args.verify_workers)
                        assert out[which]["blocks"] == height
                    else:
                        try:
                            out[which] = run_p2p(source, workdir, height, args, nodes)
                        finally:
                            close_all(nodes, args.logs)
                d, p = out["direct"], out["p2p"]
                first = "direct" if run % 2 == 0 else "P2P"
                print(f"run {run + 1}/{args.runs} ({first} first): "
                      f"direct {d['seconds']:.2f} s (CPU {d['cpu']:.2f} s, {d['threads']} "
                      f"torch threads), P2P {p['seconds']:.2f} s (CPU {p['cpu']:.2f} s + "
                      f"server {p['server_cpu']:.2f} s; first block "
                      f"{p['start_to_first_block']:.1f} s after the fresh node's start), "
                      f"P2P / direct {p['seconds'] / d['seconds']:.2f}", flush=True)
                results.append((d, p))
        finally:
            close_all(nodes)
    report(args, height, results)


def report(args: argparse.Namespace, height: int, results: list[tuple[dict, dict]]) -> None:
    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    direct_s = [d["seconds"] for d, _ in results]
    p2p_s = [p["seconds"] for _, p in results]
    ratios = [p / d for d, p in zip(direct_s, p2p_s, strict=True)]
    direct_cpu = [d["cpu"] for d, _ in results]
    fresh_cpu = [p["cpu"] for _, p in results]
    server_cpu = [p["server_cpu"] for _, p in results]
    cpu_ratios = [(p["cpu"] + p["server_cpu"]) / d["cpu"] for d, p in results]
    print(f"\n{os.cpu_count()} cores; {height} blocks; {len(results)} runs, medians "
          f"(per-run figures in brackets)")
    print(f"direct add_block loop: {med(direct_s):7.2f} s wall "
          f"({med(direct_s) / height * 1e3:.0f} ms/block) [" + ", ".join(
              f"{s:.2f}" for s in direct_s) + f"]; CPU {med(direct_cpu):.2f} s")
    print(f"P2P sync:              {med(p2p_s):7.2f} s wall "
          f"({med(p2p_s) / height * 1e3:.0f} ms/block) [" + ", ".join(
              f"{s:.2f}" for s in p2p_s) + f"]; CPU fresh node {med(fresh_cpu):.2f} s + "
          f"serving node {med(server_cpu):.2f} s")
    slow = sorted(range(height), key=lambda i: -results[0][0]["per_block"][i])[:3]
    print("slowest blocks (run 1), direct add_block / P2P since the previous accept: "
          + ", ".join(f"#{i + 1} {results[0][0]['per_block'][i]:.2f} / "
                      f"{results[0][1]['per_block'][i]:.2f} s" for i in slow))
    # Block 1 carries the one-time dataset load (scikit-learn's import) on both sides, about
    # as long as all the others together on the digits task: the rest, on its own.
    rest = [(sum(p["per_block"][1:]), sum(d["per_block"][1:])) for d, p in results]
    rest_ratios = [p / d for p, d in rest]
    print(f"blocks 2..{height} only: direct {med([d for _, d in rest]):.2f} s, P2P "
          f"{med([p for p, _ in rest]):.2f} s, P2P / direct {med(rest_ratios):.2f}x (runs "
          f"{min(rest_ratios):.2f}-{max(rest_ratios):.2f})")
    print(f"CPU, both nodes / direct: {med(cpu_ratios):.2f}x (runs {min(cpu_ratios):.2f}-"
          f"{max(cpu_ratios):.2f})")
    print(f"P2P / direct, wall: {med(ratios):.2f}x (runs {min(ratios):.2f}-{max(ratios):.2f})"
          f"   goal <= {GOAL}: {'met' if med(ratios) <= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
