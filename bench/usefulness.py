"""Usefulness of what mining delivers (issue 7, PROTOCOL.md §2): on MNIST, the best
model a task delivers (M*, `gettaskresult`) against the same architecture trained
plainly for the same number of steps, test accuracy side by side; and the share of the
mining compute that went into M*'s own training history.

`--nodes` dev nodes mine on loopback, real processes linked over P2P, each reading MNIST
from `--data-dir`. Once the first has mined a block (its fee), it publishes `--tasks`
MNIST tasks with `dpodl task submit` (the testnet's MNIST task, `--duration` blocks
each, with `--t-acc` if given); they queue behind the genesis task's span and run in
turn. When each span ends:

- delivered: M*'s test accuracy on the 10,000 t10k images, as the node counted it;
- plain: M*'s architecture with PyTorch's default initialisation, trained by
  torch.optim.SGD with M*'s own draw's learning rate, momentum and batch size on shuffled
  batches, no watermark, for M*'s total steps (its own plus its references'), scored the
  same way; the median over `--seeds` seeds;
- share: M*'s total steps over the optimizer steps all the miners trained for the task
  (getmininginfo `trainedsteps`, counted per committed checkpoint; the interval a miner
  trains past its last checkpoint when its draw is abandoned is not counted, so the
  share is, if anything, overstated by up to k steps per draw).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import add_data_args, start
from bench.propagation import DPODL, LocalNode, NodeError, wait_until
from consensus.blocks import Block
from consensus.encoding import decode
from consensus.models import Arch, ModelBlob
from consensus.proofs import compute_prehash
from consensus.tasks import MNIST, Task, compute_task_id
from mining.datasets import DatasetError
from mining.htoa import Hpp, compute_htoa
from mining.trainer import DataCache, Splits, build_model, compute_correct, load_model
from node.client import model_blob
from node.datadir import read_key_file
from node.taskfile import load_task_file

TASK_TIMEOUT = 1800.0  # seconds for one task's span to run
FUND_TRIES = 60  # seconds the publisher may wait for a block of its own to stand


def train_plainly(arch: Arch, hpp: Hpp, steps: int, splits: Splits, seed: int) -> int:
    """Test images right after `steps` of plain SGD with momentum from PyTorch's default
    initialisation, on batches of freshly shuffled epochs."""
    torch.manual_seed(seed)
    net = build_model(arch)
    opt = torch.optim.SGD(net.parameters(), lr=hpp.lr, momentum=hpp.momentum)
    x, y = splits.normalised("train")
    order = torch.cat([torch.randperm(len(y)) for _ in range(steps * hpp.batch // len(y) + 2)])
    for step in range(steps):
        rows = order[step * hpp.batch:(step + 1) * hpp.batch]
        loss = F.cross_entropy(net(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return int(compute_correct(net.eval(), *splits.normalised("test")))


def delivered_draw(node: LocalNode, task: Task, block_hash: str) -> tuple[Hpp, Arch]:
    """The hyper-parameters of M*'s own draw and its architecture, re-derived from its
    block as a verifier does."""
    block = decode(Block, bytes.fromhex(node.call("getblock", block_hash, 0)))
    proof = block.header.proof
    h1 = compute_prehash(block.header.prev_id, proof)
    reference = None
    if proof.ref_model:
        reference = load_blob(node, proof.ref_model.hex())
    draw = compute_htoa(task, h1, reference)
    return draw.hpp, draw.arch


def load_blob(node: LocalNode, model_id: str) -> ModelBlob:
    return model_blob(node.call("getmodel", model_id, True))


def submit_tasks(node: LocalNode, workdir: Path, fields: str, count: int) -> list[Task]:
    """Publish `count` MNIST tasks from `node`'s key, differing only in their bounty (a
    task is published once); the tasks, in queue order."""
    key = read_key_file(node.datadir / "keys" / "miner.key")
    tasks = []
    for i in range(count):
        path = workdir / f"task{i}.toml"
        path.write_text(f'dataset = "mnist"\n{fields}bounty = {i + 1}\n')
        for _ in range(FUND_TRIES):  # a reorganisation may take the fee's block back
            done = subprocess.run([DPODL, "task", "submit", str(path), "--datadir",
                                   str(node.datadir), "--rpc-port", str(node.rpc_port)],
                                  capture_output=True, text=True, timeout=60,
                                  env={k: v for k, v in os.environ.items()
                                       if not k.startswith("DPODL_")} | {"HOME": str(workdir)})
            if "bad-txn-balance" not in done.stderr:
                break
            time.sleep(1.0)
        if done.returncode:
            raise NodeError(f"dpodl task submit: {done.stderr}")
        task = load_task_file(path, key.address)
        assert json.loads(done.stdout)["task"] == compute_task_id(task).hex()
        tasks.append(task)
    return tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(ap, threads=1)
    ap.add_argument("--nodes", type=int, default=2, help="mining nodes")
    ap.add_argument("--tasks", type=int, default=3, help="MNIST tasks, run one after another")
    ap.add_argument("--duration", type=int, default=8, help="blocks per task")
    ap.add_argument("--seeds", type=int, default=3, help="plain trainings per task")
    ap.add_argument("--t-acc", type=int, help="validation images a block's model must get "
                                              "right, of 5,000 (default: the testnet's 4,750)")
    args = ap.parse_args()
    start("bench.usefulness", args)
    try:
        splits = DataCache(args.data_dir).splits(MNIST)
    except DatasetError as e:
        print(f"usefulness: skipped, MNIST not found under {args.data_dir}: {e}")
        return
    workdir = Path(tempfile.mkdtemp(prefix="dpodl-useful-"))
    flags = ("--datasets", args.data_dir)
    nodes: list[LocalNode] = []
    try:
        first = LocalNode("n0", workdir, mine=True, flags=flags, threads=args.threads)
        nodes.append(first)
        nodes += [LocalNode(f"n{i}", workdir, mine=True, peers=(first.address,), flags=flags,
                            threads=args.threads) for i in range(1, args.nodes)]
        for node in nodes:
            node.wait_rpc()
        address = read_key_file(first.datadir / "keys" / "miner.key").address.hex()
        wait_until(lambda: first.call("getbalance", address) > 0, "n0 to mine a block",
                   nodes, 300)
        fields = f"duration = {args.duration}\n" + (
            "" if args.t_acc is None else f"t_acc = {args.t_acc}\n")
        tasks = submit_tasks(first, workdir, fields, args.tasks)
        t0 = time.monotonic()
        rows = []
        for task in tasks:
            task_id = compute_task_id(task).hex()
            wait_until(lambda t=task_id: first.call("gettask", t)["status"] == "finished",
                       f"task {task_id[:16]} to finish", nodes, TASK_TIMEOUT)
            result = first.call("gettaskresult", task_id)
            trained = sum(n.call("getmininginfo")["trainedsteps"].get(task_id, 0)
                          for n in nodes)
            hpp, arch = delivered_draw(first, task, result["block"])
            blob = load_blob(first, result["model"])
            assert int(compute_correct(load_model(blob), *splits.normalised("test"))) \
                == result["test_correct"], "the node's count and ours differ"
            plain = [train_plainly(arch, hpp, result["total_steps"], splits, seed)
                     for seed in range(args.seeds)]
            chain = first.call("getblock", result["block"])["proof"]["reference_chain"]
            miners = {result["miner"]} | {link["miner"] for link in chain if link["onchain"]}
            rows.append({
                "task": task_id[:16], "blocks": result["models_scored"],
                "arch": f"{['mlp', 'cnn'][arch.family]} {list(arch.widths)}",
                "hpp": f"lr {hpp.lr:g} m {hpp.momentum:g} b {hpp.batch}",
                "total_steps": result["total_steps"], "references": len(chain),
                "miners_in_history": len(miners),
                "delivered": result["test_correct"] / result["test_size"],
                "validation": result["validation_accuracy"],
                "plain": statistics.median(plain) / result["test_size"],
                "plain_runs": [p / result["test_size"] for p in plain],
                "trained_steps": trained, "share": result["total_steps"] / trained,
                "elapsed_s": round(time.monotonic() - t0)})
            print(json.dumps(rows[-1]), flush=True)
        report(rows)
    finally:
        for node in nodes:
            node.close()
        shutil.rmtree(workdir, ignore_errors=True)


def report(rows: list[dict]) -> None:
    print("\n| task | blocks | M*'s architecture | M*'s draw | total steps | references "
          "| miners in its history | M* test | plain, same steps (median) | M* / plain "
          "| steps mined | share of mining in M* |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['blocks']} | {r['arch']} | {r['hpp']} | {r['total_steps']} "
              f"| {r['references']} | {r['miners_in_history']} | {r['delivered']:.2%} "
              f"| {r['plain']:.2%} | {r['delivered'] / r['plain']:.4f} | {r['trained_steps']} "
              f"| {r['share']:.1%} |")
    ratio = statistics.median(r["delivered"] / r["plain"] for r in rows)
    share = statistics.median(r["share"] for r in rows)
    print(f"\nmedian over {len(rows)} tasks: M* / plain test accuracy {ratio:.4f}; "
          f"share of the task's mining compute in M*'s history {share:.1%}")


if __name__ == "__main__":
    main()
