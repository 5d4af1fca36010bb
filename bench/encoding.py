"""Block encode+decode: dpodl's canonical msgpack encoding against stdlib json."""

import argparse
import json
import os
import random
import statistics
import sys
import time

from consensus.blocks import BLOCK_VERSION, Block, BlockHeader, compute_tx_root, sign_header
from consensus.encoding import decode, encode
from consensus.keys import PrivateKey
from consensus.params import DEV
from consensus.proofs import Proof
from consensus.tasks import compute_task_id
from consensus.transactions import ModelTx, Transfer, sign_tx

MODEL_TXS = 5  # a block carries mostly transfers and a few model transactions


def build_block(n_txs: int) -> Block:
    """A signed block on DEV's genesis task with `n_txs` signed transactions."""
    rng = random.Random(0)
    keys = [PrivateKey(seed=bytes([i]) * 32) for i in range(1, 51)]
    pubkeys = [k.pubkey for k in keys]
    task = DEV.genesis_task
    task_id = compute_task_id(task)

    def proof(miner: bytes, ref: bytes) -> Proof:
        return Proof(task_id=task_id, ref_model=ref, miner=miner, nonce=rng.getrandbits(64),
                     steps=task.k * rng.randint(task.s_min // task.k, task.s_max // task.k),
                     n_correct=rng.randint(task.t_acc, task.dataset.val_size),
                     model_id=rng.randbytes(32), ckpt_root=rng.randbytes(32))

    prev_id = rng.randbytes(32)
    nonces = [0] * len(keys)
    txs = []
    for i in range(n_txs):
        j = rng.randrange(len(keys))
        if i % max(1, n_txs // MODEL_TXS) == 0:
            tx = ModelTx(prev_id=prev_id, proof=proof(pubkeys[j], b""), fee=rng.randint(1, 10**6))
        else:
            tx = Transfer(pubkey=pubkeys[j], to=rng.randbytes(20), amount=rng.randint(1, 10**12),
                          fee=rng.randint(1, 10**6), nonce=nonces[j])
            nonces[j] += 1
        txs.append(sign_tx(tx, keys[j]))
    txs = tuple(txs)
    header = BlockHeader(version=BLOCK_VERSION, height=1234, prev_id=prev_id,
                         timestamp=DEV.genesis_time + 6170, target=DEV.t2_genesis,
                         tx_root=compute_tx_root(txs), proof=proof(pubkeys[0], rng.randbytes(32)))
    return Block(sign_header(header, keys[0]), txs)


# What a node speaking JSON would write by hand: bytes as hex, ints as numbers.
def proof_to_dict(p: Proof) -> dict:
    return {"task_id": p.task_id.hex(), "ref_model": p.ref_model.hex(), "miner": p.miner.hex(),
            "nonce": p.nonce, "steps": p.steps, "n_correct": p.n_correct,
            "model_id": p.model_id.hex(), "ckpt_root": p.ckpt_root.hex()}


def tx_to_dict(tx: Transfer | ModelTx) -> dict:
    if type(tx) is Transfer:
        return {"kind": "transfer", "pubkey": tx.pubkey.hex(), "to": tx.to.hex(),
                "amount": tx.amount, "fee": tx.fee, "nonce": tx.nonce,
                "signature": tx.signature.hex()}
    return {"kind": "model", "prev_id": tx.prev_id.hex(), "proof": proof_to_dict(tx.proof),
            "fee": tx.fee, "signature": tx.signature.hex()}


def block_to_dict(b: Block) -> dict:
    h = b.header
    return {"header": {"version": h.version, "height": h.height, "prev_id": h.prev_id.hex(),
                       "timestamp": h.timestamp, "target": h.target, "tx_root": h.tx_root.hex(),
                       "proof": proof_to_dict(h.proof), "signature": h.signature.hex()},
            "txs": [tx_to_dict(tx) for tx in b.txs]}


def proof_from_dict(d: dict) -> Proof:
    hx = bytes.fromhex
    return Proof(hx(d["task_id"]), hx(d["ref_model"]), hx(d["miner"]), d["nonce"], d["steps"],
                 d["n_correct"], hx(d["model_id"]), hx(d["ckpt_root"]))


def tx_from_dict(d: dict) -> Transfer | ModelTx:
    hx = bytes.fromhex
    if d["kind"] == "transfer":
        return Transfer(hx(d["pubkey"]), hx(d["to"]), d["amount"], d["fee"], d["nonce"],
                        hx(d["signature"]))
    return ModelTx(hx(d["prev_id"]), proof_from_dict(d["proof"]), d["fee"], hx(d["signature"]))


def block_from_dict(d: dict) -> Block:
    h, hx = d["header"], bytes.fromhex
    header = BlockHeader(h["version"], h["height"], hx(h["prev_id"]), h["timestamp"], h["target"],
                         hx(h["tx_root"]), proof_from_dict(h["proof"]), hx(h["signature"]))
    return Block(header, tuple([tx_from_dict(tx) for tx in d["txs"]]))


def dumps(tree: dict) -> str:
    return json.dumps(tree, separators=(",", ":"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--txs", type=int, default=1000, help="transactions in the block")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions (median is reported)")
    args = ap.parse_args()
    print(f"cd {os.getcwd()} && {sys.executable} -m bench.encoding --txs {args.txs} "
          f"--reps {args.reps}")

    block = build_block(args.txs)
    tree = block_to_dict(block)
    ours = encode(block)
    assert decode(Block, ours) == block
    assert block_from_dict(json.loads(dumps(block_to_dict(block)))) == block
    assert json.loads(dumps(tree)) == tree

    contenders = {
        "ours (Block->msgpack->Block)": (lambda: decode(Block, encode(block)), len(ours)),
        "json (text only)": (lambda: json.loads(dumps(tree)), len(dumps(tree).encode())),
        "json (object round trip)": (
            lambda: block_from_dict(json.loads(dumps(block_to_dict(block)))),
            len(dumps(tree).encode())),
    }
    for fn, _ in contenders.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.reps):  # interleaved, so machine noise hits every contender alike
        for name, (fn, _) in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    ours_ms = med["ours (Block->msgpack->Block)"]
    n_model = sum(type(tx) is ModelTx for tx in block.txs)
    print(f"block: {args.txs} txs ({n_model} ModelTx), median of {args.reps} reps")
    print(f"{'contender':<30}{'median ms':>10}{'min ms':>9}{'bytes':>10}{'ours/this':>11}")
    for name, (_, size) in contenders.items():
        print(f"{name:<30}{med[name]:>10.3f}{min(times[name]) * 1e3:>9.3f}{size:>10}"
              f"{ours_ms / med[name]:>11.2f}")
    print("goal: ours/json <= 0.50")


if __name__ == "__main__":
    main()
