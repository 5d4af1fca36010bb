"""The node's JSON-RPC methods (Bitcoin Core's names where one exists).

Hashes, ids, keys and addresses are lowercase hex; amounts are integer base units;
every block shows its proof of useful work. Errors use Core's codes: -5 for an unknown
block, transaction, task or model, -8 for a parameter out of range, -22 for data that
does not decode, -25/-26 for a block or transaction the rules refuse (the message
starts with the stable reason string).
"""

import dataclasses
import inspect
import time
from typing import Any

from consensus.blocks import Block, BlockHeader, compute_block_id
from consensus.difficulty import compute_difficulty
from consensus.encoding import DecodeError, Hash, decode, encode
from consensus.errors import ConsensusError
from consensus.keys import compute_address
from consensus.seal import MissingArtifact
from consensus.state import SCHEDULE_KEY, Account, ModelRecord, Schedule, Span
from consensus.tasks import FAMILY_CNN, FAMILY_MLP, compute_task_id
from consensus.transactions import ModelTx, TaskTx, Transaction, compute_tx_id, signer_address
from mining.datasets import DatasetError
from node.auth import Authenticator
from node.config import ConfigError, parse_peer
from node.node import Node
from node.rpc import (
    INVALID_ADDRESS_OR_KEY,
    INVALID_PARAMETER,
    MISC_ERROR,
    VERIFY_ERROR,
    VERIFY_REJECTED,
    RpcError,
    RpcServer,
    param_bool,
    param_hex,
    param_int,
    param_str,
)
from node.task_results import TaskNotFinished
from p2p.addrman import parse_address
from p2p.messages import PROTOCOL_VERSION
from p2p.network import USER_AGENT, Network
from storage.chain import ChainStore, MissingParent
from storage.results import TaskResult
from storage.schema import STATUS_INVALID, STATUS_VALID

DESERIALIZATION_ERROR = -22  # Core's RPC_DESERIALIZATION_ERROR
# Core's client-side P2P codes
P2P_DISABLED = -9
NODE_ALREADY_ADDED = -23
NODE_NOT_ADDED = -24
NODE_NOT_CONNECTED = -29
CLIENT_INVALID_IP_OR_SUBNET = -30
FAMILY_NAMES = {FAMILY_MLP: "mlp", FAMILY_CNN: "cnn"}
REFERENCE_CHAIN_SHOWN = 256  # links of a reference chain a block's record lists


def to_json(value: Any) -> Any:
    """Dataclasses as objects, bytes as hex, tuples as lists, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    return value


class Methods:
    """The node's methods, registered on an RpcServer by `register`."""

    def __init__(self, node: Node) -> None:
        self.node = node

    # -- helpers ---------------------------------------------------------------------------

    @property
    def store(self) -> ChainStore:
        return self.node.store

    def _block_id(self, value: object, name: str = "blockhash") -> Hash:
        block_id = Hash(param_hex(value, name, size=32))
        if self.store.get_entry(block_id) is None:
            raise RpcError(INVALID_ADDRESS_OR_KEY, "Block not found")
        return block_id

    def _confirmations(self, block_id: Hash, height: int) -> int:
        if not self.store.is_main_chain(block_id):
            return -1
        return self.store.height - height + 1

    def _proof_json(self, header: BlockHeader) -> dict:
        """The block's proof of useful work, with what the chain knows about its model."""
        proof = header.proof
        task = self.store.get_task(proof.task_id)
        record: ModelRecord | None = self.store.get_state(("model", proof.model_id))
        blob = self.node.artifacts.get_model(proof.model_id)
        history = self.node.artifacts.get_history(proof.ckpt_root)
        test = self.node.scorer.results.score(proof.model_id)
        val_size = task.dataset.val_size if task else None
        out = {
            "task": proof.task_id.hex(),
            "dataset": task.dataset.name.decode() if task else None,
            "architecture": None if blob is None else {
                "family": FAMILY_NAMES.get(blob.arch.family, str(blob.arch.family)),
                "input": [blob.arch.channels, blob.arch.height, blob.arch.width],
                "widths": list(blob.arch.widths), "classes": blob.arch.classes},
            "steps": proof.steps,
            "total_steps": None if record is None else record.total_steps,
            "n_correct": proof.n_correct,
            "validation_size": val_size,
            "validation_accuracy": None if not val_size else proof.n_correct / val_size,
            # counted on the test split once the block's task span ends (gettaskresult)
            "test_accuracy": None if test is None or task is None
            else test / task.dataset.test_size,
            "reference_model": proof.ref_model.hex() or None,
            "reference_chain": self._reference_chain(proof.ref_model),
            "model": proof.model_id.hex(),
            "checkpoint_root": proof.ckpt_root.hex(),
            # What this node can serve of the history: all of it for recent blocks
            # (--keep-checkpoints), none once pruned; the leaf list is always kept.
            "checkpoints": None if history is None else len(history.leaves),
            "checkpoints_held": len(self.node.artifacts.checkpoint_indexes(proof.ckpt_root)),
            "miner": compute_address(proof.miner).hex(),
            "nonce": proof.nonce,
        }
        return out

    def _reference_chain(self, model_id: bytes) -> list[dict]:
        """The models a model was trained from, each with its own steps and history's
        total, back to HtoA's initialisation (the first REFERENCE_CHAIN_SHOWN of them)."""
        out: list[dict] = []
        while model_id and len(out) < REFERENCE_CHAIN_SHOWN:
            origin = self.store.model_origin(Hash(model_id))
            if origin is None:  # a side branch's model: this chain never registered it
                out.append({"model": model_id.hex(), "onchain": False})
                break
            record, block_id, proof = origin
            kind = "block" if self.store.get_header(block_id).proof == proof else "mtx"
            out.append({"model": model_id.hex(), "onchain": True, "kind": kind,
                        "block": block_id.hex(), "height": record.height,
                        "miner": compute_address(proof.miner).hex(), "steps": proof.steps,
                        "total_steps": record.total_steps, "n_correct": proof.n_correct})
            model_id = proof.ref_model
        return out

    def _header_json(self, header: BlockHeader) -> dict:
        block_id = compute_block_id(header)
        entry = self.store.get_entry(block_id)
        nxt = self.store.main_chain_id(header.height + 1)
        on_main = self.store.is_main_chain(block_id)
        return {
            "hash": block_id.hex(),
            "confirmations": self._confirmations(block_id, header.height),
            "height": header.height,
            "version": header.version,
            "previousblockhash": header.prev_id.hex() if header.height else None,
            "nextblockhash": nxt.hex() if on_main and nxt is not None else None,
            "time": header.timestamp,
            "target": f"{header.target:064x}",
            "difficulty": compute_difficulty(header.target),
            "chainwork": entry.chain_weight if entry else None,
            # when this node first had the block, and had checked it (unix seconds; null
            # for blocks from before the node's last start)
            "received": self.node.block_times.get(block_id)[0],
            "accepted": self.node.block_times.get(block_id)[1],
            "txroot": header.tx_root.hex(),
            "proof": self._proof_json(header),
        }

    def _tx_json(self, tx: Transaction) -> dict:
        out = {"txid": compute_tx_id(tx).hex(), "type": type(tx).__name__,
               "from": signer_address(tx).hex(), "size": len(encode(tx, Transaction))}
        out.update(to_json(tx))
        return out

    # -- blockchain ------------------------------------------------------------------------

    async def getblockchaininfo(self) -> dict:
        tip = self.store.tip.header
        schedule: Schedule = self.store.get_state(SCHEDULE_KEY)
        return {"chain": self.node.params.name, "blocks": self.store.height,
                "bestblockhash": self.store.tip_id.hex(),
                "difficulty": compute_difficulty(tip.target), "time": tip.timestamp,
                "chainwork": self.store.tip.chain_weight,
                "forkrule": self.node.params.fork_rule,
                "activetask": schedule.active.hex(), "taskends": schedule.end,
                "verifyworkers": self.node.config.verify_workers,
                "verifyready": self.node.replay_ready}

    async def getblockcount(self) -> int:
        return self.store.height

    async def getbestblockhash(self) -> str:
        return self.store.tip_id.hex()

    async def getblockhash(self, height: object) -> str:
        h = param_int(height, "height", min=0, max=(1 << 64) - 1)
        block_id = self.store.main_chain_id(h)
        if block_id is None:
            raise RpcError(INVALID_PARAMETER, "Block height out of range")
        return block_id.hex()

    async def getblockheader(self, blockhash: object, verbose: object = True) -> Any:
        header = self.store.get_header(self._block_id(blockhash))
        assert header is not None
        if not param_bool(verbose, "verbose"):
            return encode(header).hex()
        return self._header_json(header)

    async def getblock(self, blockhash: object, verbosity: object = 1) -> Any:
        level = param_int(verbosity, "verbosity", min=0, max=2)
        block: Block | None = self.store.get_block(self._block_id(blockhash))
        if block is None:  # index entry without a stored body cannot happen; be explicit
            raise RpcError(INVALID_ADDRESS_OR_KEY, "Block not available")
        if level == 0:
            return encode(block).hex()
        out = self._header_json(block.header)
        out["size"] = len(encode(block))
        out["tx"] = [self._tx_json(tx) if level == 2 else compute_tx_id(tx).hex()
                     for tx in block.txs]
        return out

    async def getchaintips(self) -> list:
        return await self.node.on_chain_thread(self._chain_tips)  # the index may change

    def _chain_tips(self) -> list:
        tips = []
        leaves = dict(self.store.chain_tips())
        leaves.setdefault(self.store.tip_id, self.store.tip)  # also under invalid children
        for block_id, entry in leaves.items():
            fork = entry
            while not self.store.is_main_chain(compute_block_id(fork.header)):
                fork = self.store.get_entry(fork.header.prev_id)
            if block_id == self.store.tip_id:
                status = "active"
            elif entry.status >= STATUS_INVALID:
                status = "invalid"
            elif entry.status == STATUS_VALID:
                status = "valid-fork"
            else:
                status = "valid-headers"
            tips.append({"height": entry.header.height, "hash": block_id.hex(),
                         "branchlen": entry.header.height - fork.header.height,
                         "status": status})
        return sorted(tips, key=lambda t: (t["status"] != "active", -t["height"]))

    async def getdifficulty(self) -> float:
        return compute_difficulty(self.store.tip.header.target)

    # -- mining ----------------------------------------------------------------------------

    async def getmininginfo(self) -> dict:
        node, stats = self.node, self.node.stats
        ctx = await node.on_chain_thread(self.store.next_context)  # waits out a block check
        task = node.active_task()
        progress = stats.progress
        return {"blocks": self.store.height, "difficulty": compute_difficulty(ctx.expected_target),
                "target": f"{ctx.expected_target:064x}", "generate": node.miner is not None,
                "device": node.config.device, "task": compute_task_id(task).hex(),
                "minedblocks": stats.blocks, "modeltxs": stats.mtxs, "stale": stats.stale,
                "draws": stats.draws, "error": stats.error,
                # optimizer steps of the checkpoints the miner committed, by task
                "trainedsteps": {task_id.hex(): steps for task_id, steps in stats.trained.items()},
                "current": None if progress is None else {
                    "h1": progress.h1.hex(), "steps": progress.steps,
                    "n_correct": progress.n_correct,
                    "validation_accuracy": None if progress.n_correct is None
                    else progress.n_correct / task.dataset.val_size}}

    async def setgenerate(self, generate: object) -> bool:
        if param_bool(generate, "generate"):
            try:
                await self.node.start_mining()
            except RuntimeError as e:
                raise RpcError(MISC_ERROR, str(e)) from None
        else:
            await self.node.stop_mining()
        return self.node.miner is not None

    # -- mempool and transactions ----------------------------------------------------------

    # The mempool belongs to the chain thread: it is read there, never half-rebuilt.

    async def getmempoolinfo(self) -> dict:
        return await self.node.on_chain_thread(self.node.mempool.info)

    async def getrawmempool(self, verbose: object = False) -> Any:
        pool = self.node.mempool
        txs = await self.node.on_chain_thread(lambda: [(i, pool.get(i)) for i in pool.ids()])
        if not param_bool(verbose, "verbose"):
            return [i.hex() for i, _ in txs]
        return {i.hex(): self._tx_json(tx) for i, tx in txs}

    def _decode_tx(self, hexstring: object) -> Transaction:
        try:
            return decode(Transaction, param_hex(hexstring, "hexstring"))
        except DecodeError as e:
            raise RpcError(DESERIALIZATION_ERROR, f"TX decode failed: {e}") from None

    async def _submit_tx(self, tx: Transaction) -> Hash:
        try:
            return await self.node.submit_transaction(tx, local=True)
        except ConsensusError as e:
            raise RpcError(VERIFY_REJECTED, str(e)) from None
        except MissingArtifact as e:
            raise RpcError(VERIFY_ERROR, f"missing-artifact: {e}") from None

    async def sendrawtransaction(self, hexstring: object) -> str:
        return (await self._submit_tx(self._decode_tx(hexstring))).hex()

    async def submittask(self, hexstring: object) -> dict:
        """Publish a task: a signed task transaction (see `dpodl task submit`)."""
        tx = self._decode_tx(hexstring)
        if not isinstance(tx, TaskTx):
            raise RpcError(INVALID_PARAMETER, "not a task transaction: use sendrawtransaction")
        tx_id = await self._submit_tx(tx)
        return {"txid": tx_id.hex(), "task": compute_task_id(tx.task).hex()}

    async def submitblock(self, hexdata: object) -> str | None:
        raw = param_hex(hexdata, "hexdata")
        try:
            block = decode(Block, raw)
        except DecodeError as e:
            raise RpcError(DESERIALIZATION_ERROR, f"Block decode failed: {e}") from None
        try:
            result = await self.node.submit_block(block)
        except ConsensusError as e:
            return str(e)  # Core answers a refused block with its reason, not an error
        except MissingParent:
            return "prev-blk-not-found"
        except MissingArtifact as e:
            return f"missing-artifact: {e}"
        return "duplicate" if result.status == "duplicate" else None

    async def gettransaction(self, txid: object, blockhash: object = None) -> dict:
        """A pooled or main-chain transaction (looked up in the transaction index), or
        one of the block `blockhash`, on the main chain or not."""
        tx_id = Hash(param_hex(txid, "txid", size=32))
        if blockhash is None:
            tx = await self.node.on_chain_thread(self.node.mempool.get, tx_id)
            if tx is not None:
                return self._tx_json(tx) | {"confirmations": 0}
            block_id = self.store.tx_block(tx_id)
            if block_id is None:
                raise RpcError(INVALID_ADDRESS_OR_KEY, "No such mempool or blockchain transaction")
        else:
            block_id = self._block_id(blockhash)
        block = self.store.get_block(block_id)
        if block is None:
            raise RpcError(INVALID_ADDRESS_OR_KEY, "Block not available")
        for tx in block.txs:
            if compute_tx_id(tx) == tx_id:
                height = block.header.height
                return self._tx_json(tx) | {"blockhash": block_id.hex(),
                                            "confirmations": self._confirmations(block_id,
                                                                                 height)}
        raise RpcError(INVALID_ADDRESS_OR_KEY, "No such transaction in the given block")

    async def getaccount(self, address: object) -> dict:
        """Balance and nonce on the tip; `pendingnonce` counts the account's pooled
        transfers and tasks too: the nonce its next transaction takes (geth's pending)."""
        addr = param_hex(address, "address", size=20)
        pool = self.node.mempool

        def read() -> tuple[Account, int]:
            txs = [pool.get(i) for i in pool.ids()]
            return self.store.account(addr), sum(
                1 for tx in txs if not isinstance(tx, ModelTx) and signer_address(tx) == addr)

        account, pooled = await self.node.on_chain_thread(read)
        return {"balance": account.balance, "nonce": account.nonce,
                "pendingnonce": account.nonce + pooled}

    async def getbalance(self, address: object) -> int:
        return (await self.getaccount(address))["balance"]

    # -- tasks and models ------------------------------------------------------------------

    def _task_json(self, task_id: Hash, status: str, start: int | None = None,
                   end: int | None = None) -> dict:
        task = self.store.get_task(task_id)
        out = {"id": task_id.hex(), "status": status, **to_json(task)}
        out["dataset"]["name"] = task.dataset.name.decode()
        if start is not None:
            out["start"], out["end"] = start, end
        return out

    def _finished_spans(self, task_id: Hash | None = None) -> list[tuple[int, Span]]:
        """The spans that have ended on the main chain (of one task), newest first."""
        tip = self.store.height
        return [(start, span) for start, span in reversed(self.store.spans())
                if span.end <= tip and task_id in (None, span.task_id)]

    def _result_json(self, result: TaskResult) -> dict:
        dataset = self.store.get_task(result.task_id).dataset
        return {"task": result.task_id.hex(), "start": result.start, "end": result.end,
                "model": result.model_id.hex(), "block": result.block_id.hex(),
                "height": result.height, "miner": result.miner.hex(),
                "validation_correct": result.n_correct, "validation_size": dataset.val_size,
                "validation_accuracy": result.n_correct / dataset.val_size,
                "test_correct": result.test_correct, "test_size": dataset.test_size,
                "test_accuracy": result.test_correct / dataset.test_size,
                "total_steps": result.total_steps, "models_scored": result.scored,
                "scored_at": result.time}

    async def listtasks(self, finished: object = 10) -> list:
        """The active task, the queued ones in order, then the last `finished` spans that
        ended, newest first, each with its result once scored (see gettaskresult)."""
        count = param_int(finished, "finished", min=0, max=10_000)
        schedule, _ = self.node.next_schedule()
        out = ([self._task_json(schedule.active, "active", schedule.start, schedule.end)]
               + [self._task_json(i, "queued") for i in schedule.queue])
        for start, span in self._finished_spans()[:count]:
            result = self.node.scorer.current(start, span)
            out.append(self._task_json(span.task_id, "finished", start, span.end)
                       | {"result": None if result is None else self._result_json(result)})
        return out

    async def gettask(self, task_id: object = None) -> dict:
        """A task and its status: active, queued or finished (with its last span)."""
        schedule, active = self.node.next_schedule()
        if task_id is None:
            return self._task_json(compute_task_id(active), "active", schedule.start,
                                   schedule.end)
        wanted = Hash(param_hex(task_id, "task_id", size=32))
        if self.store.get_task(wanted) is None:
            raise RpcError(INVALID_ADDRESS_OR_KEY, "Task not found")
        if wanted == schedule.active:
            return self._task_json(wanted, "active", schedule.start, schedule.end)
        if wanted in schedule.queue:
            return self._task_json(wanted, "queued")
        spans = self._finished_spans(wanted)
        if not spans:  # known from a side branch only
            raise RpcError(INVALID_ADDRESS_OR_KEY, "Task not on the main chain")
        start, span = spans[0]
        return self._task_json(wanted, "finished", start, span.end)

    async def gettaskresult(self, task_id: object = None, height: object = None) -> dict:
        """The best model a finished task delivered (M*, PROTOCOL.md §2): the span's block
        model with the most test images right, as this node counted them. By default the
        last span that ended (of `task_id`, when given); `height` picks the span that
        covers it. A span not yet scored is scored now."""
        wanted = None
        if task_id is not None:
            wanted = Hash(param_hex(task_id, "task_id", size=32))
            if self.store.get_task(wanted) is None:
                raise RpcError(INVALID_ADDRESS_OR_KEY, "Task not found")
        spans = self._finished_spans(wanted)
        if height is not None:
            at = param_int(height, "height", min=1)
            spans = [(start, span) for start, span in spans if start <= at <= span.end]
        if not spans:
            raise RpcError(MISC_ERROR, "task-not-finished: no span of it has ended on the "
                                       f"main chain (height {self.store.height})")
        try:
            return self._result_json(await self.node.scorer.result(*spans[0]))
        except TaskNotFinished as e:  # a reorganisation shortened the chain meanwhile
            raise RpcError(MISC_ERROR, f"task-not-finished: {e}") from None
        except DatasetError as e:
            raise RpcError(MISC_ERROR, f"dataset-unavailable: {e}") from None

    async def getmodel(self, model_id: object, weights: object = False) -> dict:
        mid = Hash(param_hex(model_id, "model_id", size=32))
        origin = self.store.model_origin(mid)
        blob = self.node.artifacts.get_model(mid)
        if origin is None and blob is None:
            raise RpcError(INVALID_ADDRESS_OR_KEY, "Model not found")
        out: dict[str, Any] = {"id": mid.hex(), "onchain": origin is not None}
        if origin is not None:  # its training history: own steps, then what it built on
            record, block_id, proof = origin
            out |= {"height": record.height, "task": record.task_id.hex(),
                    "block": block_id.hex(), "miner": compute_address(proof.miner).hex(),
                    "steps": proof.steps, "total_steps": record.total_steps,
                    "reference_chain": self._reference_chain(proof.ref_model)}
        if blob is not None:
            out["architecture"] = to_json(blob.arch)
            out["parameters"] = len(blob.params) // 4
            if param_bool(weights, "weights"):
                out["weights"] = blob.params.hex()  # little-endian float32, declared order
        return out

    # -- network ---------------------------------------------------------------------------

    @property
    def network(self) -> Network:
        if self.node.network is None:
            raise RpcError(P2P_DISABLED, "P2P networking is not running")
        return self.node.network

    async def getpeerinfo(self) -> list:
        network = self.network
        now = time.monotonic()
        return [{
            "id": p.id, "addr": f"{p.addr[0]}:{p.addr[1]}", "inbound": p.inbound,
            "manual": p.manual, "version": p.version.protocol,
            "subver": p.version.user_agent.decode(errors="replace"),
            "startingheight": p.version.best_height, "synced_headers": p.best_height,
            "conntime": int(p.connected_at), "lastsend": int(p.last_send),
            "lastrecv": int(p.last_recv), "bytessent": p.bytes_sent, "bytesrecv": p.bytes_recv,
            "pingtime": p.ping_time,
            "pingwait": None if p.ping_nonce is None else now - p.ping_sent,
        } for p in sorted(network.peers.values(), key=lambda p: p.id)]

    async def getconnectioncount(self) -> int:
        return len(self.network.peers)

    async def getnetworkinfo(self) -> dict:
        from importlib.metadata import version

        network, config = self.node.network, self.node.config
        peers = list(network.peers.values()) if network else []
        return {"version": version("dpodl"), "subversion": USER_AGENT.decode(),
                "protocolversion": PROTOCOL_VERSION, "connections": len(peers),
                "connections_in": sum(p.inbound for p in peers),
                "connections_out": sum(not p.inbound for p in peers),
                "networkactive": bool(network and network.active),
                "localaddresses": ([{"address": config.p2p_bind, "port": config.p2p_port}]
                                   if config.listen else []),
                "addresses_known": len(network.book) if network else 0, "warnings": ""}

    async def addnode(self, node: object, command: object) -> None:
        """Keep a peer connected (add), stop doing so (remove), or dial it once (onetry)."""
        text, command = param_str(node, "node"), param_str(command, "command")
        try:
            addr = parse_peer(text, "node")
        except ConfigError as e:
            raise RpcError(INVALID_PARAMETER, str(e)) from None
        network = self.network
        if command == "add":
            if addr in network.manual:
                raise RpcError(NODE_ALREADY_ADDED, "Error: Node already added")
            network.add_node(addr)
        elif command == "remove":
            if not network.remove_node(addr):
                raise RpcError(NODE_NOT_ADDED, "Error: Node could not be removed. It has not "
                                               "been added previously.")
        elif command == "onetry":
            network.dial_once(addr)
        else:
            raise RpcError(INVALID_PARAMETER, f"command must be add, remove or onetry, "
                                              f"not {command!r}")

    async def disconnectnode(self, address: object = None, nodeid: object = None) -> None:
        network = self.network
        if nodeid is not None:
            peer_id = param_int(nodeid, "nodeid")
            peers = [p for p in network.peers.values() if p.id == peer_id]
        else:
            text = param_str(address, "address")
            peers = [p for p in network.peers.values() if f"{p.addr[0]}:{p.addr[1]}" == text]
        if not peers:
            raise RpcError(NODE_NOT_CONNECTED, "Node not found in connected nodes")
        for peer in peers:
            network.disconnect(peer.id)

    async def listbanned(self) -> list:
        return [{"address": host, "banned_until": int(until), "ban_reason": reason}
                for host, until, reason in self.network.book.bans()]

    async def setban(self, subnet: object, command: object, bantime: object = 86400) -> None:
        """Ban an IP address (add) or lift its ban (remove)."""
        host, command = param_str(subnet, "subnet"), param_str(command, "command")
        try:
            host = parse_address(host, 1)[0]
        except ValueError as e:
            raise RpcError(CLIENT_INVALID_IP_OR_SUBNET, f"Error: Invalid IP/Subnet: {e}") from None
        network = self.network
        if command == "add":
            seconds = param_int(bantime, "bantime")
            if seconds <= 0:
                raise RpcError(INVALID_PARAMETER, "bantime must be positive")
            network.ban(host, seconds, "manually added")
        elif command == "remove":
            if not network.book.unban(host):
                raise RpcError(CLIENT_INVALID_IP_OR_SUBNET, "Error: Unban failed. Requested "
                                                            "address/subnet was not previously "
                                                            "manually banned.")
        else:
            raise RpcError(INVALID_PARAMETER, f"command must be add or remove, not {command!r}")

    async def clearbanned(self) -> None:
        for host, _, _ in self.network.book.bans():
            self.network.book.unban(host)

    async def setnetworkactive(self, state: object) -> bool:
        active = param_bool(state, "state")
        self.network.set_active(active)
        return active

    # -- control ---------------------------------------------------------------------------

    async def uptime(self) -> int:
        return int(time.time() - self.node.started)

    async def stop(self) -> str:
        self.node.stopping.set()
        return "dpodl node stopping"


def build_rpc(node: Node, auth: Authenticator) -> RpcServer:
    """An RpcServer with every method of `Methods` and `help`."""
    server = RpcServer(auth)
    methods = Methods(node)
    for name in sorted(n for n in dir(Methods) if not n.startswith("_")
                       and n not in ("store", "network") and callable(getattr(Methods, n))):
        fn = getattr(methods, name)
        args = " ".join(p if v.default is inspect.Parameter.empty else f"[{p}]"
                        for p, v in inspect.signature(fn).parameters.items())
        server.method(name, fn, f"{name} {args}".strip())

    async def help(command: object = None) -> str:  # noqa: A001 (the RPC's name)
        names = server.methods()
        if command is None:
            return "\n".join(sorted(names))
        command = param_str(command, "command")
        if command not in names:
            raise RpcError(MISC_ERROR, f"help: unknown command: {command}")
        return names[command]

    server.method("help", help, "List the commands, or describe one.")
    server.health = lambda: {"status": "ok", "blocks": node.store.height}
    return server
