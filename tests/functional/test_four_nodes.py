"""Four nodes, two of them mining against each other: all agree on one chain and state."""

import pytest

from tests.functional.framework import DpodlTestFramework, wait_until

pytestmark = pytest.mark.slow  # four node processes, two mining, for ~20 s

BLOCKS = 20


class FourNodesTwoMiners(DpodlTestFramework):
    num_nodes = 4
    extra_args = (("--mine",), (), ("--mine",), ())

    def run_test(self) -> None:
        miners = [self.nodes[0], self.nodes[2]]
        self.wait_for_height(self.nodes[1], BLOCKS)
        wait_until(lambda: all(m.getmininginfo()["minedblocks"] >= 1 for m in miners),
                   "both miners to find a block")
        for miner in miners:
            assert miner.setgenerate(False) is False
        tip = self.settle(miners[0])
        height = self.nodes[0].getblockcount()
        assert height >= BLOCKS
        for node in self.nodes:
            assert node.getblockcount() == height
            assert [node.getblockhash(h) for h in range(height + 1)] == [
                self.nodes[0].getblockhash(h) for h in range(height + 1)]
            assert [t for t in node.getchaintips() if t["status"] == "active"] == [
                {"height": height, "hash": tip, "branchlen": 0, "status": "active"}]
        # The same state everywhere: both miners' accounts, and who mined each block.
        accounts = [[node.getaccount(m.address) for m in miners] for node in self.nodes]
        assert all(a == accounts[0] for a in accounts), accounts
        mined_by = [self.nodes[3].getblock(self.nodes[3].getblockhash(h))["proof"]["miner"]
                    for h in range(1, height + 1)]
        assert set(mined_by) <= {m.address for m in miners}
        rewarded = [a["balance"] > 0 for a in accounts[0]]
        assert rewarded == [m.address in mined_by for m in miners], (accounts[0], mined_by)


def test_four_nodes_two_miners_agree_on_tip_and_state(tmp_path):
    FourNodesTwoMiners(tmp_path).main()
