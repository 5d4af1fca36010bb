"""The node daemon as a user runs it: real `dpodl node` processes on real ports, queried
over HTTP JSON-RPC and with `dpodl rpc`, mining real blocks on the digits dev task."""

import base64
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from consensus.blocks import compute_block_id
from consensus.encoding import encode
from consensus.params import DEV, genesis_block
from consensus.tasks import compute_task_id
from consensus.transactions import Transaction, Transfer, sign_tx
from mining.trainer import DataCache
from node.datadir import read_key_file

DPODL = str(Path(sys.executable).parent / "dpodl")
START_TIMEOUT = 60.0  # seconds for a fresh node to import torch, start and mine
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """A `dpodl node` child process with its own HOME (so the default data directory,
    ~/.dpodl/dev, is the test's) and its own RPC port."""

    def __init__(self, home: Path, *args: str, network: str = "dev") -> None:
        self.home = home
        self.datadir = home / ".dpodl" / network
        self.port, self.p2p_port = free_port(), free_port()
        self.env = {**os.environ, "HOME": str(home), "DPODL_RPC_PORT": str(self.port),
                    "DPODL_P2P_PORT": str(self.p2p_port), "DPODL_P2P_BIND": "127.0.0.1",
                    "DPODL_NETWORK": network}
        self.proc = subprocess.Popen([DPODL, "node", *args], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([DPODL, "rpc", *args], env=self.env, capture_output=True,
                              text=True, timeout=STOP_TIMEOUT)

    def post(self, body: object, *, auth: tuple[str, str] | None = None,
             path: str = "/") -> tuple[int, object]:
        """A raw HTTP request: (status, decoded JSON body or None)."""
        user, password = auth or tuple(
            (self.datadir / ".cookie").read_text().strip().split(":", 1))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data,
                                         headers={"Authorization": f"Basic {token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=STOP_TIMEOUT) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def call(self, method: str, *params: object) -> object:
        status, reply = self.post({"jsonrpc": "2.0", "id": 1, "method": method,
                                   "params": list(params)})
        assert status == 200 and "error" not in reply, reply
        return reply["result"]

    def error(self, method: str, *params: object) -> dict:
        status, reply = self.post({"jsonrpc": "2.0", "id": 1, "method": method,
                                   "params": list(params)})
        assert status == 200 and "result" not in reply, reply
        return reply["error"]

    def wait_for(self, predicate, what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"node exited: {self.proc.communicate()}"
            try:
                if predicate():
                    return
            except (OSError, AssertionError, FileNotFoundError, ValueError):
                pass  # not up yet
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_blocks(self, n: int) -> None:
        self.wait_for(lambda: self.call("getblockcount") >= n, f"{n} blocks")

    def stop(self, sig: int | None = None) -> int:
        if sig is None:
            assert self.call("stop") == "dpodl node stopping"
        else:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if not stream.closed:
                stream.close()


@pytest.fixture
def running(tmp_path):
    started: list[NodeProcess] = []

    def start(*args: str, home: Path = tmp_path) -> NodeProcess:
        node = NodeProcess(home, *args)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


def test_dev_node_mines_as_the_readme_says_and_stops_cleanly(running):
    node = running("--mine")
    node.wait_blocks(3)
    count = node.cli("getblockcount")
    assert count.returncode == 0 and int(count.stdout) >= 3
    best = node.cli("getbestblockhash").stdout.strip()
    block = json.loads(node.cli("getblock", best).stdout)
    proof = block["proof"]
    task = DEV.genesis_task
    assert proof["task"] == compute_task_id(task).hex()
    assert proof["n_correct"] >= task.t_acc  # a block under the longest-chain rule
    assert proof["validation_accuracy"] == proof["n_correct"] / task.dataset.val_size
    assert proof["steps"] % task.k == 0 and proof["architecture"]["family"] == "mlp"
    info = json.loads(node.cli("getmininginfo").stdout)
    assert info["generate"] is True and info["minedblocks"] >= 3
    assert node.stop() == 0
    assert not (node.datadir / ".cookie").exists()
    assert "miner stopped" in (node.datadir / "debug.log").read_text()


def test_sigterm_stops_the_node_and_a_restart_keeps_its_chain(running, tmp_path):
    node = running("--mine")
    node.wait_blocks(2)
    assert node.stop(signal.SIGTERM) == 0
    again = running()  # not mining: the chain must come back as it was left
    again.wait_for(lambda: again.call("getblockcount") >= 2, "the stored chain")
    height = again.call("getblockcount")
    tip = again.call("getbestblockhash")
    assert again.call("getblockhash", height) == tip
    assert again.call("getmininginfo")["generate"] is False
    assert again.stop(signal.SIGINT) == 0


def test_an_interactive_terminal_shows_training_progress(tmp_path):
    """On a terminal (a pty here) the node keeps a status line of the draw in training."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "DPODL_RPC_PORT": str(free_port()),
           "DPODL_P2P_PORT": str(free_port()), "DPODL_P2P_BIND": "127.0.0.1"}
    proc = subprocess.Popen([DPODL, "node", "--mine"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while b"validation" not in seen and time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                seen += os.read(controller, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(STOP_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    text = seen.decode(errors="replace")
    assert "\r\x1b[K" in text and "dev height" in text
    line = re.search(r"training draw \d+: step (\d+)/400, validation (\d+\.\d)%", text)
    assert line is not None, text[-2000:]
    assert int(line.group(1)) % DEV.genesis_task.k == 0


def test_a_dead_miner_is_reported_and_setgenerate_starts_a_new_one(running):
    node = running("--mine")
    node.wait_blocks(1)
    log = (node.datadir / "debug.log").read_text()
    pid = int(re.findall(r"miner started \(pid (\d+)", log)[-1])
    os.kill(pid, signal.SIGKILL)
    node.wait_for(lambda: "died" in (node.call("getmininginfo")["error"] or ""),
                  "the death to be noticed", timeout=STOP_TIMEOUT)
    assert node.call("getmininginfo")["generate"] is False
    height = node.call("getblockcount")
    assert node.call("setgenerate", True) is True
    node.wait_blocks(height + 1)
    assert node.stop() == 0


def test_second_node_on_the_same_data_directory_is_refused(running):
    node = running()
    node.wait_for(lambda: node.call("getblockcount") == 0, "the node")
    second = running()
    assert second.proc.wait(STOP_TIMEOUT) == 1
    assert "another dpodl node is using" in second.proc.stderr.read()
    assert node.call("getblockcount") == 0  # the first one is unharmed
    assert node.stop() == 0


def test_rpc_client_errors_are_clear(running, tmp_path):
    node = running()  # never started: no cookie, nothing listening
    node.kill()
    missing = node.cli("getblockcount")
    assert missing.returncode == 1 and "is the node running?" in missing.stderr
    node = running(home=tmp_path / "other")
    node.wait_for(lambda: node.call("getblockcount") == 0, "the node")
    wrong = node.cli("--rpc-user", "nobody", "--rpc-password", "x", "getblockcount")
    assert wrong.returncode == 1 and "refused the credentials" in wrong.stderr
    bad = node.cli("getblockhash", "minus-one")
    assert bad.returncode == 1 and "error code -3" in bad.stderr
    assert node.stop() == 0


@pytest.fixture
def chain_node(running):
    """A node that mined a few blocks and then stopped mining."""
    node = running("--mine")
    node.wait_blocks(4)
    assert node.call("setgenerate", False) is False
    yield node
    assert node.stop() == 0


def test_every_method_against_a_real_node(chain_node):
    node = chain_node
    height = node.call("getblockcount")
    tip = node.call("getbestblockhash")
    genesis = compute_block_id(genesis_block(DEV).header).hex()
    info = node.call("getblockchaininfo")
    assert (info["chain"], info["blocks"], info["bestblockhash"]) == ("dev", height, tip)
    assert node.call("getblockhash", 0) == genesis
    assert node.call("getblockhash", height) == tip
    assert node.error("getblockhash", height + 1)["code"] == -8
    assert node.error("getblockhash", 1 << 64)["code"] == -8
    assert node.error("help", [1])["code"] == -3

    header = node.call("getblockheader", tip)
    assert header["height"] == height and header["confirmations"] == 1
    assert isinstance(node.call("getblockheader", tip, False), str)
    raw = node.call("getblock", tip, 0)
    one = node.call("getblock", tip, 1)
    two = node.call("getblock", tip, 2)
    assert one["hash"] == tip and one["size"] == len(bytes.fromhex(raw))
    assert [t["txid"] for t in two["tx"]] == one["tx"]
    assert node.error("getblock", tip, 3)["code"] == -8
    assert node.error("getblock", "00" * 32)["code"] == -5
    parent = node.call("getblock", one["previousblockhash"])
    assert parent["nextblockhash"] == tip and parent["confirmations"] == 2

    tips = node.call("getchaintips")
    assert tips[0] == {"height": height, "hash": tip, "branchlen": 0, "status": "active"}
    assert node.call("getdifficulty") == header["difficulty"]
    mining = node.call("getmininginfo")
    assert mining["generate"] is False and mining["minedblocks"] >= 4

    # A transfer from the miner's key, which the blocks have paid.
    key = read_key_file(node.datadir / "keys" / "miner.key")
    account = node.call("getaccount", key.address.hex())
    assert account["balance"] > 0 and node.call("getbalance", key.address.hex()) == \
        account["balance"]
    pool_before = set(node.call("getrawmempool"))
    tx = sign_tx(Transfer(key.pubkey, bytes(20), 5, 1, account["nonce"]), key)
    tx_id = node.call("sendrawtransaction", encode(tx, Transaction).hex())
    assert set(node.call("getrawmempool")) == pool_before | {tx_id}
    assert node.call("getrawmempool", True)[tx_id]["amount"] == 5
    assert node.call("getmempoolinfo")["size"] == len(pool_before) + 1
    assert node.call("gettransaction", tx_id)["confirmations"] == 0
    assert node.call("getaccount", key.address.hex())["pendingnonce"] == account["nonce"] + 1
    # The same nonce again is refused with the rule's reason, and changes nothing.
    again = sign_tx(Transfer(key.pubkey, bytes(20), 6, 1, account["nonce"]), key)
    err = node.error("sendrawtransaction", encode(again, Transaction).hex())
    assert err["code"] == -26 and err["message"].startswith("bad-txn-nonce")
    assert node.error("sendrawtransaction", "zz")["code"] == -8
    assert node.error("sendrawtransaction", "00ff")["code"] == -22
    assert set(node.call("getrawmempool")) == pool_before | {tx_id}

    task = node.call("gettask")
    assert task["id"] == compute_task_id(DEV.genesis_task).hex() and task["status"] == "active"
    assert node.call("listtasks")[0]["id"] == task["id"]
    assert node.error("gettask", "11" * 32)["code"] == -5
    model_id = one["proof"]["model"]
    model = node.call("getmodel", model_id, True)
    assert model["onchain"] and model["height"] == height
    assert len(bytes.fromhex(model["weights"])) == 4 * model["parameters"]
    assert node.error("getmodel", "22" * 32)["code"] == -5

    assert node.call("getpeerinfo") == [] and node.call("getconnectioncount") == 0
    info = node.call("getnetworkinfo")
    assert info["protocolversion"] >= 1 and info["networkactive"] and info["connections"] == 0
    assert node.call("addnode", "127.0.0.1:1", "add") is None  # nobody there: it keeps trying
    assert node.error("addnode", "127.0.0.1:1", "add")["code"] == -23
    assert node.call("addnode", "127.0.0.1:1", "remove") is None
    assert node.error("addnode", "127.0.0.1:1", "remove")["code"] == -24
    assert node.error("addnode", "nowhere", "add")["code"] == -8
    assert node.error("addnode", "127.0.0.1:1", "sideways")["code"] == -8
    assert node.error("disconnectnode", "127.0.0.1:1")["code"] == -29
    assert node.call("setban", "10.1.2.3", "add", 60) is None
    assert [b["address"] for b in node.call("listbanned")] == ["10.1.2.3"]
    assert node.error("setban", "not-an-ip", "add")["code"] == -30
    assert node.call("clearbanned") is None and node.call("listbanned") == []
    assert node.call("uptime") >= 0
    assert "getblockcount" in node.call("help").split("\n")
    assert node.call("help", "getblock").startswith("getblock blockhash")

    # Bad input changes nothing: unknown methods, wrong types, garbage, bad credentials.
    assert node.error("nosuchmethod")["code"] == -32601
    assert node.error("getblockhash", "one")["code"] == -3
    assert node.post(b"{not json")[1]["error"]["code"] == -32700
    status, body = node.post({"jsonrpc": "2.0", "id": 1, "method": "getblockcount"},
                             auth=("__cookie__", "wrong"))
    assert status == 401 and "result" not in body
    status, body = node.post(b"x" * (2 << 20))
    assert status == 413
    assert node.call("getbestblockhash") == tip and node.call("getblockcount") == height

    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/health") as response:
        assert json.loads(response.read())["status"] == "ok"

    # The client commands: send from the node's key, export the tip's model.
    sent = subprocess.run([DPODL, "send", "--to", "ab" * 20, "--amount", "7"], env=node.env,
                          capture_output=True, text=True, timeout=STOP_TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    assert node.call("getrawmempool", True)[sent.stdout.strip()]["amount"] == 7
    path = node.home / "tip-model.pt"
    exported = subprocess.run([DPODL, "model", "export", model_id, str(path)], env=node.env,
                              capture_output=True, text=True, timeout=STOP_TIMEOUT)
    assert exported.returncode == 0, exported.stderr
    check_exported_model(path, "val", one["proof"]["n_correct"])

    # A task published from a file: its transaction pooled, then mined and queued.
    task_file = node.home / "task.toml"
    task_file.write_text('dataset = "digits"\nbounty = 50\nduration = 3\nwm_ppm = 20000\n')
    submitted = subprocess.run([DPODL, "task", "submit", str(task_file)], env=node.env,
                               capture_output=True, text=True, timeout=STOP_TIMEOUT)
    assert submitted.returncode == 0, submitted.stderr
    published = json.loads(submitted.stdout)
    assert published["txid"] in node.call("getrawmempool")
    node.call("setgenerate", True)
    node.wait_for(lambda: published["task"] in [t["id"] for t in node.call("listtasks")],
                  "the task to be mined and queued")
    assert node.call("gettask", published["task"])["bounty"] == 50
    # Mined (pooled before the task), the transfer is found through the transaction index.
    mined = node.call("gettransaction", tx_id)
    assert mined["confirmations"] >= 1 and tx_id in node.call("getblock", mined["blockhash"])["tx"]
    assert node.error("gettransaction", "11" * 32) == {
        "code": -5, "message": "No such mempool or blockchain transaction"}

    # Once its three blocks are mined, the task's result: its best model, which the
    # client exports and plain torch scores on the test split exactly as recorded.
    node.wait_for(lambda: node.call("gettask", published["task"])["status"] == "finished",
                  "the task's span to end")
    node.call("setgenerate", False)
    path = node.home / "best-model.pt"
    got = subprocess.run([DPODL, "task", "result", published["task"], "--export", str(path)],
                         env=node.env, capture_output=True, text=True, timeout=STOP_TIMEOUT)
    assert got.returncode == 0, got.stderr
    result = json.loads(got.stdout)
    assert (result["task"], result["models_scored"]) == (published["task"], 3)
    assert check_exported_model(path, "test") == result["test_correct"]
    assert node.call("getblock", result["block"])["proof"]["test_accuracy"] == \
        result["test_accuracy"]
    unknown = subprocess.run([DPODL, "task", "result", "11" * 32], env=node.env,
                             capture_output=True, text=True, timeout=STOP_TIMEOUT)
    assert unknown.returncode == 1 and "Task not found" in unknown.stderr


def check_exported_model(path: Path, split: str = "val", n_correct: int | None = None) -> int:
    """Plain torch, in a fresh interpreter that imports nothing of this project, loads
    the file and scores the dev task's raw images of `split`; the count (within the
    task's eps_correct of `n_correct`, when given: what the chain recorded)."""
    part = getattr(DataCache(None).splits(DEV.genesis_task.dataset), split)
    images, labels = path.with_suffix(".images.npy"), path.with_suffix(".labels.npy")
    np.save(images, part.images.numpy())
    np.save(labels, part.labels.numpy())
    script = ("import sys, numpy, torch; m = torch.jit.load(sys.argv[1]); "
              "x = torch.from_numpy(numpy.load(sys.argv[2])); "
              "y = torch.from_numpy(numpy.load(sys.argv[3])); "
              "print(int((m(x).argmax(1) == y).sum()))")
    scored = subprocess.run([sys.executable, "-I", "-c", script, str(path), str(images),
                             str(labels)], capture_output=True, text=True, cwd=path.parent,
                            timeout=STOP_TIMEOUT)
    assert scored.returncode == 0, scored.stderr
    correct = int(scored.stdout)
    assert n_correct is None or abs(correct - n_correct) <= DEV.genesis_task.eps_correct
    return correct
