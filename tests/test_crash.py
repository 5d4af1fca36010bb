"""Crash safety for real: a child process importing a long chain is SIGKILLed at random
moments, and after every kill the data directory must reopen on a consistent chain.

The chain (~1,500 blocks, transfers in most of them) carries a short decoy branch every
~12 blocks, placed before the main-chain blocks that outgrow it, so the import keeps
reorganising onto a decoy and back. After each kill the test opens the store itself and
checks that the tip is a block it built, that its state is exactly the builder's replay
from genesis, that the height index and undo data describe the tip's ancestry, and that
no block the child reported connected was lost.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from consensus.blocks import compute_block_id
from consensus.encoding import Hash, encode, tagged_hash
from consensus.seal import NoProofEngine
from storage import schema
from storage.chain import ChainStore
from storage.db import Database
from tests.builder import MINER, ChainBuilder, transfer
from tests.crash_child import PARAMS, SENDERS

REPO = Path(__file__).resolve().parent.parent
SEED = 20_240_611
MAIN_BLOCKS = 1_500
MIN_KILLS = 30


@dataclass
class Chain:
    builder: ChainBuilder
    order: list  # every block, in the order the child adds them
    main: list[Hash]  # main-chain ids, height 1 first
    decoys: set[Hash] = field(default_factory=set)


def bid(block) -> Hash:
    return compute_block_id(block.header)


def build_chain(rng: random.Random) -> Chain:
    """The main chain with transfers, and every ~12 blocks a decoy branch forking 1–3
    blocks below the tip and one block longer, so it is connected first (it is heavier)
    and abandoned two main blocks later (equal weight keeps the first seen)."""
    builder = ChainBuilder(PARAMS)
    chain = Chain(builder, [], [])
    tip, next_decoy = builder.genesis_id, 10

    def txs_on(parent: Hash, tag: str) -> tuple:
        nonces = {k.address: builder.states[parent].entries[("account", k.address)].nonce
                  for k in SENDERS}
        out = []
        for i in range(rng.choice((0, 1, 1, 2, 3))):
            key = rng.choice(SENDERS)
            to = rng.choice((MINER.address, rng.choice(SENDERS).address,
                             tagged_hash(tag, parent, i)[:20]))  # a new account
            out.append(transfer(key, to, rng.randint(1, 10**6), nonces[key.address],
                                fee=rng.randint(0, 5)))
            nonces[key.address] += 1
        return tuple(out)

    for height in range(1, MAIN_BLOCKS + 1):
        block = builder.extend(tip, txs_on(tip, "main"), dt=rng.randint(1, 9))
        chain.order.append(block)
        chain.main.append(tip := bid(block))
        if height == next_decoy and height < MAIN_BLOCKS - 5:
            depth = rng.randint(1, 3)
            parent = chain.main[height - depth - 1]
            for _ in range(depth + 1):
                block = builder.extend(parent, txs_on(parent, "decoy"), dt=rng.randint(1, 9))
                chain.order.append(block)
                chain.decoys.add(parent := bid(block))
            next_decoy += rng.randint(8, 16)
    return chain


def child_command(datadir: Path, chainfile: Path) -> list[str]:
    return [sys.executable, "-m", "tests.crash_child", str(datadir), str(chainfile)]


@dataclass
class Child:
    """One run of tests/crash_child.py, its output going to files: a pipe fills at 64 KiB
    and would stall the child on `print` while the parent sleeps."""

    datadir: Path
    chainfile: Path
    logs: Path

    def __post_init__(self) -> None:
        self.out = open(self.logs / "out", "w+")  # noqa: SIM115 (closed in finish)
        self.err = open(self.logs / "err", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(child_command(self.datadir, self.chainfile), cwd=REPO,
                                     stdout=self.out, stderr=self.err)

    def finish(self, timeout: float) -> tuple[list[str], str]:
        """Wait for the child; its complete output lines and its stderr."""
        self.proc.wait(timeout=timeout)
        self.out.seek(0)
        self.err.seek(0)
        text, err = self.out.read(), self.err.read()
        self.out.close()
        self.err.close()
        # A kill can cut a line short; only newline-terminated lines were printed whole.
        return text.split("\n")[:-1], err


def tips_printed(lines: list[str]) -> list[tuple[int, Hash]]:
    out = []
    for line in lines:
        if line.startswith("tip "):
            _, height, hex_id = line.split()
            out.append((int(height), Hash(bytes.fromhex(hex_id))))
    return out


def check_store(datadir: Path, chain: Chain, reported: list[Hash], why: str) -> Hash:
    """Open `datadir` as a restarted node would and check it; returns the tip."""
    with Database(datadir) as db:
        store = ChainStore(db, PARAMS, NoProofEngine())
        tip = store.tip_id
        assert tip in chain.builder.blocks, f"{why}: tip {tip.hex()} is no block we built"
        for block_id in reported:
            assert store.get_entry(block_id) is not None, (
                f"{why}: block {block_id.hex()} was reported connected, then lost")
        if reported:
            last = store.get_entry(reported[-1])
            assert store.tip.chain_weight >= last.chain_weight, (
                f"{why}: tip weight {store.tip.chain_weight} fell below the last reported "
                f"tip's {last.chain_weight} ({reported[-1].hex()})")
        assert dict(store.iterate_state()) == chain.builder.states[tip].entries, (
            f"{why}: state at tip {store.height} {tip.hex()} differs from the replay")
        ancestry, block_id = set(), tip
        while block_id != store.genesis_id:
            entry = store.get_entry(block_id)
            assert store.main_chain_id(entry.header.height) == block_id, (
                f"{why}: height index at {entry.header.height} is not the tip's ancestor")
            ancestry.add(block_id)
            block_id = entry.header.prev_id
        assert store.main_chain_id(store.height + 1) is None, f"{why}: height index past tip"
        undone = {Hash(k[len(schema.UNDO):]) for k, _ in db.iterate(schema.UNDO)}
        assert undone == ancestry, f"{why}: undo data is not exactly the main chain's"
        return tip


def run_to_completion(datadir: Path, chainfile: Path) -> tuple[list[str], float, float]:
    """Run a child to the end; its output lines, and seconds to its first line and to exit."""
    start = time.monotonic()
    proc = subprocess.Popen(child_command(datadir, chainfile), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()
        to_first = time.monotonic() - start
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = (first + rest).splitlines()
    assert proc.returncode == 0 and lines[-1:] == ["done"], (
        f"seed {SEED}: the child failed: {err[-3000:]}")
    return lines, to_first, time.monotonic() - start


def test_import_survives_sigkill_at_random_moments(tmp_path):
    rng = random.Random(SEED)
    chain = build_chain(rng)
    chainfile = tmp_path / "chain.msgpack"
    chainfile.write_bytes(msgpack.packb([encode(block) for block in chain.order]))
    final_tip = chain.main[-1]

    # An uninterrupted import first: the baseline, and the timings the kills aim at.
    lines, startup, full = run_to_completion(tmp_path / "baseline", chainfile)
    assert check_store(tmp_path / "baseline", chain, [], f"seed {SEED}: baseline") == final_tip
    assert sum(t in chain.decoys for _, t in tips_printed(lines)) > MAIN_BLOCKS // 20, (
        "the import should have followed decoy branches")
    window = full - startup  # start-up: interpreter, imports, chain file, opening the store

    kills = mid_import = on_decoy = runs = fresh = 0
    datadir, reported = tmp_path / "data0", []
    while kills < MIN_KILLS:
        runs += 1
        assert runs < 10 * MIN_KILLS, f"seed {SEED}: the kills keep missing the child"
        # A quarter of the kills aim at start-up and opening, the rest at the import.
        if rng.random() < 0.25:
            delay = rng.uniform(0.05, startup)
        else:
            delay = startup + rng.uniform(0, 0.3 * window)
        child = Child(datadir, chainfile, tmp_path)
        time.sleep(delay)
        if child.proc.poll() is None:
            os.kill(child.proc.pid, signal.SIGKILL)
        lines, err = child.finish(timeout=60)
        # The exit status, not the poll, says whether the kill landed: the child may have
        # exited in between.
        landed = child.proc.returncode == -signal.SIGKILL
        why = f"seed {SEED}, run {runs}, kill {kills + landed} after {delay:.3f} s"
        printed = [t for _, t in tips_printed(lines)]
        reported += printed
        if landed:
            kills += 1
            mid_import += bool(printed)
        else:
            assert child.proc.returncode == 0 and lines[-1:] == ["done"], (
                f"{why}: child failed (exit {child.proc.returncode}): {err[-3000:]}")
        tip = check_store(datadir, chain, reported, why)
        on_decoy += tip in chain.decoys
        if not landed:
            assert tip == final_tip, f"{why}: finished on {tip.hex()}, not the main tip"
            fresh += 1
            shutil.rmtree(datadir)
            datadir, reported = tmp_path / f"data{fresh}", []

    lines, _, _ = run_to_completion(datadir, chainfile)
    reported += [t for _, t in tips_printed(lines)]
    assert check_store(datadir, chain, reported, f"seed {SEED}: final") == final_tip
    summary = (f"seed {SEED}: {kills} kills in {runs} runs, {mid_import} mid-import, "
               f"{on_decoy} left on a decoy branch, {fresh} imports finished between kills; "
               f"uninterrupted import {full:.2f} s, first block after {startup:.2f} s")
    print(summary)
    # Kills only at start-up would test nothing: many must land while blocks go in (about
    # two in three do; a third leaves room for slow start-ups on a loaded machine).
    assert mid_import >= MIN_KILLS // 3, summary
