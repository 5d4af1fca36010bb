"""Several real `dpodl node` processes talking P2P over TCP on 127.0.0.1.

Each node verifies every block itself (its own private audits, with the checkpoints
fetched from its peers), so agreeing on a tip means agreeing on a checked chain.
"""

import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from consensus.params import DEV
from node.datadir import read_key_file
from node.node import PRUNE_EVERY
from tests.test_node import DPODL, STOP_TIMEOUT, NodeProcess

SYNC_TIMEOUT = 120.0
MINE_TIMEOUT = 400.0  # 30 dev blocks take a minute or two on 2 cores


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = SYNC_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, AssertionError, ValueError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def same_chain(nodes: list[NodeProcess]) -> bool:
    return len({n.call("getbestblockhash") for n in nodes}) == 1


def state_of(node: NodeProcess, miners: list[str]) -> tuple:
    """What the nodes must agree on: the tip, the height and the miners' accounts."""
    return (node.call("getbestblockhash"), node.call("getblockcount"),
            tuple(tuple(sorted(node.call("getaccount", m).items())) for m in miners))


def miners_of(node: NodeProcess) -> list[str]:
    height = node.call("getblockcount")
    return sorted({node.call("getblock", node.call("getblockhash", h))["proof"]["miner"]
                   for h in range(1, height + 1)})


@pytest.fixture
def nodes(tmp_path):
    started: list[NodeProcess] = []

    def start(name: str, *args: str, network: str = "dev") -> NodeProcess:
        node = NodeProcess(tmp_path / name, *args, network=network)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


def checkpoints_held(node: NodeProcess) -> list[str | int]:
    """For each block from height 1: "all" when all its checkpoints are here, else how
    many are (the leaf list, which says how many there are, is never dropped)."""
    proofs = [node.call("getblock", node.call("getblockhash", h))["proof"]
              for h in range(1, node.call("getblockcount") + 1)]
    return ["all" if p["checkpoints_held"] == p["checkpoints"] else p["checkpoints_held"]
            for p in proofs]


def peer(node: NodeProcess) -> str:
    return f"--peer=127.0.0.1:{node.p2p_port}"


def test_three_nodes_converge_and_a_late_node_syncs_30_blocks(nodes):
    a = nodes("a", "--mine")
    b = nodes("b", peer(a), "--keep-checkpoints=10")
    c = nodes("c", peer(b))  # knows only b: finds a through address gossip
    wait_until(lambda: a.call("getblockcount") >= 30, "30 blocks", timeout=MINE_TIMEOUT)
    assert a.call("setgenerate", False) is False
    wait_until(lambda: same_chain([a, b, c]), "a, b and c on one tip")
    wait_until(lambda: len(a.call("getpeerinfo")) == 2, "c to find a by gossip")
    miners = miners_of(a)
    assert state_of(a, miners) == state_of(b, miners) == state_of(c, miners)
    assert a.call("getblockcount") >= 30

    # A node started after 30 blocks, peering with c only, once the miner is gone: c's
    # own audits drew a few intervals of each block, and it fetched the others after
    # (it keeps every checkpoint of its last 32 blocks), so d's audits can be served.
    # b keeps those of its last 10 blocks only (pruning every PRUNE_EVERY blocks, so up
    # to that many more for a while), and the leaf lists of all.
    height = a.call("getblockcount")
    old = height - 10 - PRUNE_EVERY
    wait_until(lambda: checkpoints_held(c) == ["all"] * height, "c's checkpoints")
    wait_until(lambda: checkpoints_held(b)[-10:] == ["all"] * 10, "b's last 10 blocks'")
    # A fetch still in flight at b's last prune (a block's prefetch, the backfill of its
    # window) lands after it and stays until the next: a node prunes when it starts.
    assert b.stop() == 0
    b = nodes("b", peer(a), "--keep-checkpoints=10")
    b.wait_for(lambda: b.call("getblockcount") >= height, "b to restart")
    assert checkpoints_held(b)[:old] == [0] * old
    assert checkpoints_held(b)[-10:] == ["all"] * 10
    a.kill()
    d = nodes("d", peer(c))
    wait_until(lambda: same_chain([c, d]), "d to sync")
    assert state_of(d, miners) == state_of(c, miners)
    tip = d.call("getblock", d.call("getbestblockhash"))
    assert tip["received"] is not None and tip["accepted"] >= tip["received"]
    seed = f"127.0.0.1:{c.p2p_port}"
    wait_until(lambda: seed in [p["addr"] for p in d.call("getpeerinfo")], "d's link to c")
    info = {p["addr"]: p for p in d.call("getpeerinfo")}
    assert info[seed]["manual"] and not info[seed]["inbound"]
    assert d.call("getnetworkinfo")["connections"] == len(info)


@pytest.mark.parametrize("network", ["dev", "dev-accuracy"])
def test_two_miners_at_once_resolve_to_one_chain(nodes, network):
    a = nodes("a", "--mine", network=network)
    b = nodes("b", "--mine", peer(a), network=network)
    wait_until(lambda: a.call("getmininginfo")["minedblocks"] >= 2
               and b.call("getmininginfo")["minedblocks"] >= 2, "both to mine")
    b.call("setgenerate", False)
    stopped = b.call("getblockcount")
    # Equal chains stay apart under the longest-chain rule (each keeps the tip it saw
    # first) until one grows: a mines on until b has moved to a's chain.
    wait_until(lambda: a.call("getblockcount") > stopped and same_chain([a, b]), "one chain")
    a.call("setgenerate", False)
    wait_until(lambda: same_chain([a, b]), "one chain once a stopped")
    miners = miners_of(a)
    assert state_of(a, miners) == state_of(b, miners)
    active = [t for t in a.call("getchaintips") if t["status"] == "active"]
    assert active == [t for t in b.call("getchaintips") if t["status"] == "active"]


def reference_candidates(node: NodeProcess) -> list[tuple[tuple[int, int], str, str, str]]:
    """((n_correct, height), model id, kind, maker's address) of every model a block on
    `node`'s tip may reference, in the order the miner's choice (Node._pick_reference)
    goes through them: newest block first, its own model before its mtxs'."""
    tip, out = node.call("getblockcount"), []
    for height in range(tip, max(0, tip - DEV.genesis_task.l_ref - 1), -1):
        block = node.call("getblock", node.call("getblockhash", height), 2)
        proof = block["proof"]
        out.append(((proof["n_correct"], height), proof["model"], "block", proof["miner"]))
        out += [((tx["proof"]["n_correct"], height), tx["proof"]["model_id"], "mtx", tx["from"])
                for tx in block["tx"] if tx["type"] == "ModelTx"]
    return out


def test_a_model_transaction_made_on_one_node_is_referenced_by_a_block_of_another(nodes):
    a = nodes("a", "--mine")
    b = nodes("b", peer(a))
    a.wait_blocks(2)
    maker = a.call("getblock", a.call("getblockhash", 1))["proof"]["miner"]
    # a mines until the best model b may reference is one of a's model transactions.
    for _ in range(40):
        a.call("setgenerate", False)
        wait_until(lambda: same_chain([a, b]), "b to follow a")
        best = max(reference_candidates(b), key=lambda c: c[0])
        if best[2] == "mtx":
            break
        height = a.call("getblockcount")
        a.call("setgenerate", True)
        wait_until(lambda h=height: a.call("getblockcount") > h, "a's next block")
    else:
        pytest.fail("no model transaction led the reference window in 40 blocks")
    assert best[3] == maker
    start = b.call("getblockcount")
    b.call("setgenerate", True)
    wait_until(lambda: b.call("getmininginfo")["minedblocks"] >= 1, "b's block")
    b.call("setgenerate", False)
    block = b.call("getblock", b.call("getblockhash", start + 1))
    assert block["proof"]["miner"] != maker  # mined on b
    assert block["proof"]["reference_model"] == best[1]  # from a's model transaction
    wait_until(lambda: same_chain([a, b]), "a to take b's block")


def test_a_peer_named_by_host_name_is_dialled_once_and_kept(nodes):
    """As in docker/compose.yaml, where relays name the miners by service name."""
    a = nodes("a")
    b = nodes("b", f"--peer=localhost:{a.p2p_port}")
    wait_until(lambda: b.call("getconnectioncount") == 1, "b's link to a")
    time.sleep(6)  # past the 5 s redial interval: one connection, not a redial loop
    [info] = b.call("getpeerinfo")
    assert info["manual"] and not info["inbound"]
    assert info["addr"] == f"127.0.0.1:{a.p2p_port}"  # the address it reached
    assert a.call("getconnectioncount") == 1
    assert "P2P task failed" not in (b.datadir / "debug.log").read_text()

    # A node linked to a by address (as gossip may teach it) and then told its name:
    # the name leads to the same node, so it stays one link.
    c = nodes("c", f"--peer=127.0.0.1:{a.p2p_port}")
    to_a = f"127.0.0.1:{a.p2p_port}"
    wait_until(lambda: to_a in [p["addr"] for p in c.call("getpeerinfo")], "c's link to a")
    c.call("addnode", f"localhost:{a.p2p_port}", "add")
    time.sleep(6)
    assert [p["addr"] for p in c.call("getpeerinfo")].count(to_a) == 1
    assert [p["inbound"] for p in a.call("getpeerinfo")].count(True) == 2  # b and c


def test_two_nodes_that_dial_each_other_at_once_keep_one_link(nodes):
    """Each end sees both links carry the other's node nonce and closes the same one."""
    a, b = nodes("a"), nodes("b")
    for node in (a, b):
        node.wait_for(lambda n=node: n.call("getconnectioncount") == 0, "the node to start")
    start = threading.Barrier(2)

    def dial(node: NodeProcess, other: NodeProcess) -> None:
        start.wait()
        node.call("addnode", f"127.0.0.1:{other.p2p_port}", "onetry")

    threads = [threading.Thread(target=dial, args=pair) for pair in ((a, b), (b, a))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: a.call("getconnectioncount") == b.call("getconnectioncount") == 1,
               "one link")

    def links() -> list[tuple]:
        return [(p["id"], p["addr"], p["inbound"]) for n in (a, b) for p in n.call("getpeerinfo")]

    (_, _, a_inbound), (_, _, b_inbound) = before = links()
    assert a_inbound != b_inbound
    time.sleep(2)  # the closing of a second link would have reached both ends by now
    assert links() == before


def test_a_transaction_sent_here_goes_out_again_on_each_new_tip_until_mined(nodes):
    """c connects after the transaction was announced, so only a's next tip tells it."""
    a = nodes("a", "--mine")
    a.wait_blocks(1)
    payer = read_key_file(a.datadir / "keys" / "miner.key").address.hex()
    wait_until(lambda: a.call("getaccount", payer)["balance"] > 8, "a's first rewards",
               timeout=MINE_TIMEOUT)
    assert a.call("setgenerate", False) is False
    to = "cd" * 20
    sent = subprocess.run([DPODL, "send", "--to", to, "--amount", "7", "--fee", "1"],
                          env=a.env, capture_output=True, text=True, timeout=STOP_TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    c = nodes("c", peer(a))
    wait_until(lambda: same_chain([a, c]), "c to sync")
    assert sent.stdout.strip() not in c.call("getrawmempool")
    c.call("setgenerate", True)  # its first block is a's new tip: a announces the send again
    wait_until(lambda: c.call("getaccount", to)["balance"] == 7, "c to mine the send",
               timeout=MINE_TIMEOUT)
