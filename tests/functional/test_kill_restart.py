"""A node killed with SIGKILL while it mines and syncs comes back with every block it had
reported, and catches up with the others; and so does one restarted cleanly."""

import pytest

from tests.functional.framework import MINE_TIMEOUT, DpodlTestFramework, wait_until

pytestmark = pytest.mark.slow  # three node processes, two mining, for ~30 s

KILLS = 3


class KillWhileMiningAndSyncing(DpodlTestFramework):
    num_nodes = 3
    extra_args = (("--mine",), ("--mine",), ())  # node1 is the one killed

    def run_test(self) -> None:
        miner, victim, relay = self.nodes
        for kill in range(KILLS):
            # Kill it at a new tip, while blocks arrive from the other miner and its own
            # miner works: as good a time as any to catch a half-written block.
            seen = victim.getblockcount()
            wait_until(lambda s=seen: victim.getblockcount() > s and miner.getblockcount() > s,
                       "new blocks on both miners", MINE_TIMEOUT)
            height, tip = victim.getblockcount(), victim.getbestblockhash()
            self.kill_node(1)
            assert not victim.running()
            self.start_node(1)
            assert victim.getblockcount() >= height, f"kill {kill}: blocks lost"
            assert victim.getblockheader(tip)["hash"] == tip  # the reported tip is kept
            # RPC answers before the miner starts: give it a moment.
            wait_until(lambda: victim.getmininginfo()["generate"], "mining to resume")
        # It catches up with the others, who went on mining and relaying meanwhile.
        wait_until(lambda: victim.getblockcount() > height and victim.getmininginfo()[
            "minedblocks"] >= 1, "the restarted node to mine again", MINE_TIMEOUT)
        assert miner.setgenerate(False) is False
        # And a clean restart, without --mine this time, keeps what it had too.
        height = victim.getblockcount()
        self.restart_node(1, extra_args=())
        assert victim.getblockcount() >= height
        assert victim.getmininginfo()["generate"] is False
        tip = self.settle(miner)
        height = relay.getblockcount()
        for h in range(height + 1):
            assert victim.getblockhash(h) == relay.getblockhash(h)
        assert victim.getblock(tip)["proof"]["architecture"] is not None
        log = victim.log_path.read_text()
        assert log.count("chain at height") == KILLS + 2  # one start-up line per start


def test_a_node_killed_while_mining_and_syncing_loses_nothing(tmp_path):
    KillWhileMiningAndSyncing(tmp_path).main()
