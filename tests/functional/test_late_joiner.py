"""A node that joins late, knowing one relay, syncs the whole chain: every block, every
block's model, and every checkpoint of the recent blocks (those it keeps and serves)."""

import pytest

from tests.functional.framework import MINE_TIMEOUT, DpodlTestFramework, TestNode, wait_until

pytestmark = pytest.mark.slow  # four node processes, one mining, for ~15 s

BLOCKS = 15
KEEP = 10  # the joiner's --keep-checkpoints: fewer blocks than the chain will have


def checkpoints(node: TestNode, height: int) -> list[tuple[int | None, int]]:
    """(leaves, leaves held) of the proof of every block from height 1."""
    proofs = [node.getblock(node.getblockhash(h))["proof"] for h in range(1, height + 1)]
    return [(p["checkpoints"], p["checkpoints_held"]) for p in proofs]


class LateJoiner(DpodlTestFramework):
    num_nodes = 3
    extra_args = (("--mine",), (), ())

    def run_test(self) -> None:
        miner, _, relay = self.nodes
        self.wait_for_height(relay, BLOCKS)
        joiner = self.add_node((f"--peer={relay.p2p_addr}", f"--keep-checkpoints={KEEP}"))
        self.start_node(joiner.index)  # while the miner goes on
        self.wait_for_height(joiner, BLOCKS)
        assert miner.setgenerate(False) is False
        tip = self.sync_blocks()
        height = joiner.getblockcount()
        assert joiner.getblockhash(height) == tip
        for h in range(1, height + 1):
            block_hash = joiner.getblockhash(h)
            assert block_hash == miner.getblockhash(h)
            proof = joiner.getblock(block_hash)["proof"]
            assert proof["miner"] == miner.address
            # `architecture` is null unless the model's weights are stored here.
            assert proof["architecture"] is not None, f"block {h}: no model"
            model = joiner.getmodel(proof["model"])
            assert model["onchain"] and model["parameters"] > 0, (h, model)
        assert joiner.getaccount(miner.address) == relay.getaccount(miner.address)
        # Once the block sync is done, the joiner fetches every checkpoint of its recent
        # blocks, not only those its own audits drew, so that it can serve any interval
        # of them in its turn; of older blocks it keeps the leaf list.
        def recent_held() -> bool:
            return all(held == leaves for leaves, held in checkpoints(joiner, height)[-KEEP:])

        wait_until(recent_held, f"the joiner to hold every checkpoint of its last {KEEP} "
                                "blocks", MINE_TIMEOUT)
        assert height > KEEP
        assert all(leaves and leaves > 1 for leaves, _ in checkpoints(joiner, height))


def test_a_late_joiner_syncs_blocks_models_and_recent_checkpoints(tmp_path):
    LateJoiner(tmp_path).main()
