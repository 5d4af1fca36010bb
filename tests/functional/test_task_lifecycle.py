"""A task's whole life on three nodes: published through a node that does not mine,
gossiped to the two that do, mined and queued, trained for its span, and scored by
every node when it ends, each finding the same best model."""

import json

import pytest

from tests.functional.framework import MINE_TIMEOUT, DpodlTestFramework, wait_until

pytestmark = pytest.mark.slow  # three node processes, two mining, for ~30 s


class TaskLifecycle(DpodlTestFramework):
    num_nodes = 3
    extra_args = (("--mine",), (), ("--mine",))

    def run_test(self) -> None:
        miner, relay, other = self.nodes
        # node2 pauses while node0 funds the publisher: no rival chain takes node0's
        # rewards back while the task waits to be mined.
        other.setgenerate(False)
        wait_until(lambda: relay.getbalance(miner.address) > 600, "node0's first reward",
                   MINE_TIMEOUT)
        # node0's key publishes through node1, whose pool gossips it to the miners.
        task_file = self.tmp_path / "task.toml"
        task_file.write_text('dataset = "digits"\nduration = 3\nbounty = 600\n')
        done = relay.cli("task", "submit", str(task_file), "--key", str(miner.key_path))
        assert done.returncode == 0, done.stderr
        task_id = json.loads(done.stdout)["task"]
        wait_until(lambda: all(task_id in [t["id"] for t in n.listtasks() if t["status"]
                                           == "queued"] for n in self.nodes),
                   "the task to be mined and queued on every node")
        assert relay.gettask(task_id)["bounty"] == 600
        other.setgenerate(True)

        wait_until(lambda: all(n.gettask(task_id)["status"] == "finished" for n in self.nodes),
                   "the task's span to end on every node", MINE_TIMEOUT)
        for node in (miner, other):
            node.setgenerate(False)
        self.settle(miner)
        results = [n.gettaskresult(task_id) for n in self.nodes]
        for result in results:
            result.pop("scored_at")  # when each node scored it
        assert results[0]["models_scored"] == 3
        assert all(result == results[0] for result in results), results
        span = range(results[0]["start"], results[0]["end"] + 1)
        mined = [relay.getblock(relay.getblockhash(h))["proof"] for h in span]
        assert {p["task"] for p in mined} == {task_id}
        assert results[0]["model"] in {p["model"] for p in mined}
        assert results[0]["test_correct"] == max(
            round(p["test_accuracy"] * results[0]["test_size"]) for p in mined)


def test_a_task_is_published_gossiped_trained_and_scored_by_every_node(tmp_path):
    TaskLifecycle(tmp_path).main()
