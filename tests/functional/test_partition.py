"""A network split in two, each side mining and taking a transaction; healed, every
node moves to the heavier side's chain, and the lighter side's transaction returns to
the pool and is mined on that chain."""

import pytest

from consensus.keys import PrivateKey
from tests.functional.framework import MINE_TIMEOUT, DpodlTestFramework, TestNode, wait_until

pytestmark = pytest.mark.slow  # four node processes, two mining, for ~25 s

AMOUNT_A, AMOUNT_B, FEE = 7, 5, 1


def find_tx(node: TestNode, txid: str, since: int) -> str | None:
    """The hash of the block on node's main chain above `since` holding txid, or None."""
    for height in range(since + 1, node.getblockcount() + 1):
        block_hash = node.getblockhash(height)
        if txid in node.getblock(block_hash)["tx"]:
            return block_hash
    return None


def send(node: TestNode, payer: TestNode, to: str, amount: int) -> str:
    """`dpodl send` on `node` from `payer`'s miner key; the transaction's id."""
    sent = node.cli("send", "--to", to, "--amount", str(amount), "--fee", str(FEE),
                    "--key", str(payer.key_path))
    assert sent.returncode == 0, sent.stderr
    return sent.stdout.strip()


class Partition(DpodlTestFramework):
    num_nodes = 4
    extra_args = (("--mine",), (), ("--mine",), ())

    def mine_until(self, miner: TestNode, done, what: str) -> None:
        miner.setgenerate(True)
        wait_until(done, what, MINE_TIMEOUT)
        assert miner.setgenerate(False) is False

    def run_test(self) -> None:
        a, b = self.nodes[0], self.nodes[2]  # the miners of side A {0, 1} and side B {2, 3}
        # Both miners need coins on the shared chain: each side spends its miner's.
        self.wait_for_height(self.nodes[1], 3)
        for miner in (a, b):
            miner.setgenerate(False)
        self.settle(a)
        for miner in (a, b):
            self.sync_blocks()
            if self.nodes[1].getaccount(miner.address)["balance"] < AMOUNT_A + FEE:
                self.mine_until(miner, lambda m=miner: m.getaccount(m.address)["balance"]
                                > AMOUNT_A + FEE, f"{miner!r}'s first reward")
        fork = self.sync_blocks()
        fork_height = a.getblockcount()

        for x in (0, 1):
            for y in (2, 3):
                self.disconnect_nodes(x, y)
        assert self.connected(0, 1) and self.connected(2, 3)

        to_a, to_b = (PrivateKey.generate().address.hex() for _ in range(2))
        # Sent to the relays: each reaches its side's miner over P2P.
        tx_a = send(self.nodes[1], a, to_a, AMOUNT_A)
        tx_b = send(self.nodes[3], b, to_b, AMOUNT_B)
        self.mine_until(b, lambda: b.getblockcount() >= fork_height + 2
                        and find_tx(b, tx_b, fork_height), "side B to mine its transaction")
        tip_b = self.sync_blocks(self.nodes[2:])
        work_b = b.getblockchaininfo()["chainwork"]
        self.mine_until(a, lambda: a.getblockchaininfo()["chainwork"] > work_b
                        and a.getblockcount() >= b.getblockcount() + 2
                        and find_tx(a, tx_a, fork_height), "side A to mine more than B")
        tip_a = self.sync_blocks(self.nodes[:2])
        for node in self.nodes:  # still apart
            assert node.getbestblockhash() == (tip_a if node.index < 2 else tip_b)
            assert find_tx(node, tx_b if node.index < 2 else tx_a, fork_height) is None

        for x in (0, 1):
            for y in (2, 3):
                self.connect_nodes(x, y)
        assert self.sync_blocks() == tip_a  # the heavier chain, everywhere
        for node in self.nodes[2:]:
            assert node.getblockheader(tip_b)["confirmations"] == -1  # B's blocks: a fork
            assert node.getblockhash(fork_height) == fork
        # B's transaction is back in its side's pools (nodes 0 and 1 never saw it) ...
        wait_until(lambda: all(tx_b in n.getrawmempool() for n in self.nodes[2:]),
                   "side B's transaction to return to its pools")
        # ... and the next blocks on the winning chain take it.
        for miner in (a, b):
            miner.setgenerate(True)
        wait_until(lambda: all(find_tx(n, tx_b, fork_height) for n in self.nodes),
                   "side B's transaction to be mined again", MINE_TIMEOUT)
        for miner in (a, b):
            miner.setgenerate(False)
        self.settle(a)
        for node in self.nodes:
            for txid in (tx_a, tx_b):
                block = find_tx(node, txid, fork_height)
                assert node.gettransaction(txid, block)["confirmations"] >= 1
            assert node.getaccount(to_a)["balance"] == AMOUNT_A
            assert node.getaccount(to_b)["balance"] == AMOUNT_B
            assert tx_b not in node.getrawmempool()


def test_a_partition_heals_onto_the_heavier_chain_and_loses_no_transaction(tmp_path):
    Partition(tmp_path).main()
