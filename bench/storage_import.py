"""Block import: dpodl's ChainStore.add_block against raw plyvel puts of the same bytes."""

import argparse
import os
import statistics
import sys
import tempfile
import time

import plyvel

from consensus.blocks import Block, compute_block_id
from consensus.encoding import encode, tagged_hash
from consensus.params import DEV, ChainParams
from consensus.seal import NoProofEngine
from storage import schema
from storage.chain import ChainStore
from storage.db import Database
from tests.builder import MINER, ChainBuilder, funded_params, transfer

GOAL = 0.25  # dpodl/raw(sync=True), from the issue


def build_chain(params: ChainParams, n_blocks: int, n_txs: int) -> list[Block]:
    """`n_blocks` blocks on genesis, each carrying `n_txs` transfers from the funded MINER."""
    builder = ChainBuilder(params)
    parent_id, nonce, blocks = builder.genesis_id, 0, []
    for _ in range(n_blocks):
        txs = tuple(transfer(MINER, tagged_hash("bench-to", n)[:20], 1, n)
                    for n in range(nonce, nonce + n_txs))
        nonce += n_txs
        blocks.append(builder.extend(parent_id, txs))
        parent_id = compute_block_id(blocks[-1].header)
    return blocks


def time_dpodl(params: ChainParams, blocks: list[Block], now: int, where: str) -> float:
    """Seconds to add every block to a fresh chain store; checks it ends on the last block."""
    with tempfile.TemporaryDirectory(dir=where) as tmp, Database(tmp) as db:
        store = ChainStore(db, params, NoProofEngine())
        t0 = time.perf_counter()
        for block in blocks:
            store.add_block(block, now=now)
        elapsed = time.perf_counter() - t0
        last = blocks[-1].header
        assert store.height == last.height == len(blocks), (store.height, len(blocks))
        assert store.tip_id == compute_block_id(last)
    return elapsed


def time_raw(items: list[tuple[bytes, bytes]], sync: bool, where: str) -> float:
    """Seconds to put every (key, encoded block) into a fresh LevelDB, one put per block."""
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        db = plyvel.DB(tmp, create_if_missing=True)
        try:
            t0 = time.perf_counter()
            for key, value in items:
                db.put(key, value, sync=sync)
            return time.perf_counter() - t0
        finally:
            db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", type=int, default=500, help="blocks in the chain")
    ap.add_argument("--txs", type=int, default=10, help="transfers per block")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median is reported)")
    ap.add_argument("--dir", default=tempfile.gettempdir(),
                    help="where the temporary databases go (fsync cost depends on the disk)")
    args = ap.parse_args()
    print(f"cd {os.getcwd()} && {sys.executable} -m bench.storage_import --blocks {args.blocks} "
          f"--txs {args.txs} --reps {args.reps} --dir {args.dir}")

    params = funded_params(DEV, MINER)
    blocks = build_chain(params, args.blocks, args.txs)
    now = blocks[-1].header.timestamp  # DEV's genesis lies in the future of the real clock
    items = [(schema.block_key(compute_block_id(b.header)), encode(b)) for b in blocks]
    assert all(len(key) == 33 for key, _ in items)

    contenders = {
        "dpodl ChainStore.add_block": lambda: time_dpodl(params, blocks, now, args.dir),
        "raw plyvel put sync=True": lambda: time_raw(items, True, args.dir),
        "raw plyvel put sync=False": lambda: time_raw(items, False, args.dir),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.reps):  # interleaved, so machine and disk noise hit every contender
        for name, fn in contenders.items():
            times[name].append(fn())

    rate = {name: args.blocks / statistics.median(ts) for name, ts in times.items()}
    ours = rate["dpodl ChainStore.add_block"]
    size = statistics.mean(len(v) for _, v in items)
    print(f"{args.blocks} blocks x {args.txs} transfers ({size:.0f} B/block encoded), "
          f"median of {args.reps} reps, databases under {args.dir}")
    print(f"{'contender':<28}{'blocks/s':>10}{'min s':>9}{'max s':>9}{'dpodl/this':>12}")
    for name, ts in times.items():
        print(f"{name:<28}{rate[name]:>10.0f}{min(ts):>9.3f}{max(ts):>9.3f}"
              f"{ours / rate[name]:>12.3f}")
    ratio = ours / rate["raw plyvel put sync=True"]
    print(f"goal: dpodl/raw >= {GOAL:.2f} against raw sync=True, since every dpodl block ends "
          "in a synced batch (equal durability per block); sync=False is shown only to "
          "size the fsync cost")
    print(f"result: {ratio:.3f} -> {'met' if ratio >= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
