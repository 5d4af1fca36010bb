"""Imports a chain file into a data directory, for test_crash to kill at random moments.

Run as `python -m tests.crash_child DATADIR CHAINFILE` from the repository root. The
chain file is a msgpack array of encoded blocks, added in order; after every add that
moves the tip the child prints `tip <height> <block id hex>` and flushes, so the parent
knows which blocks were reported connected before the kill. It prints `done` at the end.
"""

import sys
from pathlib import Path

import msgpack

from consensus.blocks import Block
from consensus.encoding import decode
from consensus.keys import PrivateKey
from consensus.params import DEV
from consensus.seal import NoProofEngine
from storage.chain import ChainStore
from storage.db import Database
from tests.builder import funded_params

# The parent builds the chain under these same parameters; both import them from here.
SENDERS = tuple(PrivateKey(bytes([i]) * 32) for i in range(2, 6))
PARAMS = funded_params(DEV, *SENDERS)
# A clock far past every block, so no timestamp is ever "too new".
NOW = DEV.genesis_time + 10**9


def read_chain(path: Path) -> list[Block]:
    return [decode(Block, raw) for raw in msgpack.unpackb(path.read_bytes())]


def main(datadir: str, chainfile: str) -> None:
    blocks = read_chain(Path(chainfile))
    with Database(datadir) as db:
        store = ChainStore(db, PARAMS, NoProofEngine())
        for block in blocks:
            if store.add_block(block, now=NOW).status == "connected":
                print(f"tip {store.height} {store.tip_id.hex()}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
