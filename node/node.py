"""The full node: chain storage and validation, the mempool, the miner, P2P, JSON-RPC.

One asyncio event loop owns the node's state. Whatever may take long runs elsewhere:
training in the miner's child process (node/miner_service.py), and checking a block
(its replay audits) or a model transaction on the node's one chain thread, so the loop
keeps answering RPC while a block is verified. Chain and mempool changes happen on that
thread one at a time, in the order they were asked for.
"""

import asyncio
import logging
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from aiohttp import web

from consensus.blocks import Block, assemble_block, block_proofs, compute_block_id
from consensus.checkpoints import FraudProof
from consensus.difficulty import compute_mtx_target
from consensus.encoding import Hash
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey
from consensus.params import NETWORKS, ChainParams
from consensus.proofs import Proof
from consensus.seal import MissingArtifact, Need
from consensus.state import Schedule, compute_schedule
from consensus.tasks import Task, compute_task_id
from consensus.transactions import ModelTx, Transaction, compute_tx_id, sign_tx
from mining.miner import Job, Reference, Solution
from mining.replay import ReplayPool
from mining.trainer import DataCache
from mining.verifier import DPoDLEngine, FraudFound, Verdict
from node.auth import Authenticator, remove_cookie, write_cookie
from node.config import Config
from node.datadir import DataDir, read_key_file
from node.mempool import Mempool
from node.miner_service import MinerService, Progress
from node.rpc import RpcServer
from node.task_results import TaskScorer
from p2p.network import NetConfig, Network
from storage import retention
from storage.artifacts import ArtifactStore
from storage.chain import AddResult, ChainStore, MissingParent, TipState
from storage.db import Database
from storage.results import ResultStore
from storage.schema import STATUS_INVALID

log = logging.getLogger("dpodl.node")

T = TypeVar("T")
EVIDENCE = 64  # histories whose checkpoints are kept as fraud evidence
# Blocks the tip moves between prunes: a prune lists every stored root and reads the
# window's blocks, which during a sync cost as much as the checks (py-spy), so not on
# every block; checkpoints stay up to this many blocks past the window.
PRUNE_EVERY = 8


@dataclass(slots=True)
class MiningStats:
    """What the miner has done since the node started, for getmininginfo and the log."""

    blocks: int = 0
    mtxs: int = 0
    stale: int = 0
    draws: int = 0
    trained: dict[Hash, int] = field(default_factory=dict)  # optimizer steps, by task
    progress: Progress | None = None
    error: str | None = None


class BlockTimes:
    """When this node first had each recent block's bytes (`received`: from a peer, RPC or
    its own miner) and when it had checked and stored it (`accepted`), wall-clock
    seconds, for getblock and the propagation benchmark. Only the last `capacity`
    blocks; nothing survives a restart."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._times: OrderedDict[Hash, list[float | None]] = OrderedDict()

    def received(self, block_id: Hash) -> None:
        if block_id not in self._times:
            self._times[block_id] = [time.time(), None]
            if len(self._times) > self.capacity:
                self._times.popitem(last=False)

    def accepted(self, block_id: Hash) -> None:
        self.received(block_id)
        times = self._times[block_id]
        if times[1] is None:
            times[1] = time.time()

    def get(self, block_id: Hash) -> tuple[float | None, float | None]:
        received, accepted = self._times.get(block_id, (None, None))
        return received, accepted


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.params: ChainParams = NETWORKS[config.network]
        self.datadir = DataDir(config.datadir)
        self.started = time.time()
        self.stats = MiningStats()
        self.block_times = BlockTimes()
        self.stopping = asyncio.Event()
        self._chain_thread = ThreadPoolExecutor(1, thread_name_prefix="dpodl-chain")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._solutions: set[asyncio.Future] = set()  # solutions being handled
        self.db: Database | None = None
        self.key: PrivateKey | None = None
        self.miner: MinerService | None = None
        self.network: Network | None = None
        # Histories whose checkpoints retention must not drop besides the recent blocks',
        # the pooled mtxs' and our own: those we hold fraud evidence about (peers fetch
        # it from us).
        self._evidence: OrderedDict[Hash, None] = OrderedDict()
        self._pruned_at = 0  # the height of the last prune
        self._warming: list[Future] = []  # the replay workers' start-up

    @property
    def replay_ready(self) -> bool:
        """Whether the replay workers have started (there is nothing to start with none)."""
        return all(future.done() for future in self._warming)

    # -- life cycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the data directory and open the chain, the keys and the mempool."""
        self.datadir.lock()
        try:
            self._open_locked()
        except BaseException:
            self.datadir.unlock()
            raise

    def _open_locked(self) -> None:
        if self.config.miner_key is not None:  # a named key must exist: no typo mines
            self.key = read_key_file(self.config.miner_key)  # to a fresh one
        else:
            self.key, created = self.datadir.load_or_create_key()
            if created:
                log.info("created the miner key %s", self.datadir.key_path)
        # Verification trains in --verify-workers processes (mining/replay.py), or on the
        # chain thread with 0, on one torch thread each: that keeps several nodes (or a
        # node beside its miner) from oversubscribing the cores: 10 dev blocks took 1.9 s
        # on 1 thread and 10–13 s on 2 with 8 nodes on 2 cores (bench/propagation.py,
        # docs/benchmarks.md).
        torch.set_num_threads(1)
        self.db = Database(self.datadir.chain_path)
        self.artifacts = ArtifactStore(self.db)
        datasets = None if self.config.datasets is None else str(self.config.datasets)
        self.data = DataCache(datasets)
        workers = self.config.verify_workers
        pool = ReplayPool(workers, datasets) if workers else None
        self.engine = DPoDLEngine(self.artifacts, self.data, replayer=pool)
        self.store = ChainStore(self.db, self.params, self.engine)
        self.mempool = Mempool(self.params, self.store, self.engine)
        self.scorer = TaskScorer(self.store, self.artifacts, self.engine.replayer,
                                 ResultStore(self.db), self.on_chain_thread)
        log.info("%s chain at height %d, tip %s", self.params.name, self.store.height,
                 self.store.tip_id.hex())
        self._prune(set())  # a lowered --keep-checkpoints takes effect at once
        if pool is not None:  # start the workers (torch, the dataset) before a block comes
            self._warming = pool.prepare(self.params.genesis_task)

    async def run(self, rpc: RpcServer) -> None:
        """Serve until SIGINT, SIGTERM or the `stop` RPC; then shut down cleanly."""
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self.stopping.set)
        status = None
        try:
            self._runner = web.AppRunner(rpc.app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.config.rpc_bind, self.config.rpc_port)
            await site.start()
            log.info("JSON-RPC on http://%s:%d/ (cookie %s)", self.config.rpc_bind,
                     self.config.rpc_port, self.datadir.cookie_path)
            await self.start_network()
            if self.config.mine:
                await self.start_mining()
            if sys.stderr.isatty():
                from node.progress import StatusLine, show_status

                status = asyncio.ensure_future(show_status(self, StatusLine(sys.stderr)))
            await self.stopping.wait()
            if status is not None:
                await status
        finally:
            log.info("shutting down")
            await self.close()

    async def start_network(self) -> None:
        """Listen for peers (unless told not to) and dial the configured ones."""
        self._loop = asyncio.get_running_loop()
        config = self.config
        self.network = Network(self, NetConfig(
            bind=config.p2p_bind, port=config.p2p_port if config.listen else 0,
            seeds=config.peers))
        await self.network.start()

    async def close(self) -> None:
        if self.network is not None:
            network, self.network = self.network, None
            await network.close()
        if self.miner is not None:
            miner, self.miner = self.miner, None
            await asyncio.to_thread(miner.stop)
        if self._solutions:  # let the ones under way finish before the chain closes
            await asyncio.gather(*self._solutions, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.db is not None:
            await self.scorer.close()
        remove_cookie(self.datadir.path)
        self._chain_thread.shutdown(wait=True, cancel_futures=True)
        if self.db is not None:
            self.engine.close()
            self.store.close()
            self.db = None
        self.datadir.unlock()

    async def on_chain_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a chain or mempool operation on the chain thread, in order."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._chain_thread, fn, *args)

    # -- chain -----------------------------------------------------------------------------

    def next_schedule(self) -> tuple[Schedule, Task]:
        """The task schedule and the active task of the next block."""
        return compute_schedule(self.params, TipState(self.store), self.store.height + 1)

    def active_task(self) -> Task:
        """The task the next block works on."""
        return self.next_schedule()[1]

    async def submit_block(self, block: Block) -> AddResult:
        """Check and add a block; on a new tip, update the mempool and the miner's job.
        Raises ConsensusError, MissingParent or MissingArtifact."""
        block_id = compute_block_id(block.header)
        self.block_times.received(block_id)
        try:
            result = await self.on_chain_thread(self.store.add_block, block)
        except FraudFound as fraud:
            self._keep_evidence(fraud.ckpt_root)
            raise
        self.block_times.accepted(block_id)
        if result.status == "connected":
            await self._new_tip(result)
        return result

    async def _new_tip(self, result: AddResult) -> None:
        await self.on_chain_thread(self.mempool.update_for_tip, result)
        busy = self.network.busy_roots() if self.network is not None else set()
        if abs(self.store.height - self._pruned_at) >= PRUNE_EVERY:
            await self.on_chain_thread(self._prune, busy | set(self._evidence))
        log.info("new tip %s at height %d", self.store.tip_id.hex(), self.store.height)
        self.scorer.on_tip({self.store.get_header(i).height for i in result.connected})
        if self.network is not None:
            self.network.announce_block(self.store.tip_id)
        await self._renew_job()

    async def invalidate_block(self, block_id: Hash) -> AddResult:
        """Mark a block and its descendants invalid and move to the best valid chain."""
        result = await self.on_chain_thread(self.store.invalidate_block, block_id)
        if result.status == "connected":
            await self._new_tip(result)
        return result

    async def apply_fraud_proof(self, owner_id: Hash, index: int) -> Verdict | None:
        """Check the claim that interval `index` of `owner_id`'s history does not replay
        (§8.8) and, if it holds, drop what it convicts: the block and its descendants, the
        block that included the mtx, or the mtx from the pool. None when the accused is
        not here; MissingArtifact when the interval's checkpoints are not (the accuser
        has them)."""
        found = await self.on_chain_thread(self._find_accused, owner_id)
        if found is None:
            return None
        prev_id, proof, block_id = found
        ends = [self.artifacts.get_checkpoint(proof.ckpt_root, i) for i in (index, index + 1)]
        missing = [Need("checkpoint", proof.ckpt_root, i)
                   for i, ckpt in zip((index, index + 1), ends, strict=True) if ckpt is None]
        if missing:
            raise MissingArtifact(*missing)
        start, end = ends
        assert start is not None and end is not None
        task = self.store.get_task(proof.task_id)
        if task is None:
            return Verdict.REFUTED
        verdict = await self.on_chain_thread(self.engine.check_fraud_proof, self.params,
                                             prev_id, proof, task,
                                             FraudProof(owner_id, start, end))
        if verdict is Verdict.HOLDS:
            self._keep_evidence(proof.ckpt_root)
            if block_id is not None:
                entry = self.store.get_entry(block_id)
                if entry is not None and entry.status < STATUS_INVALID:
                    await self.invalidate_block(block_id)
            # After the block is dropped: its transactions went back to the pool.
            await self.on_chain_thread(self.mempool.remove, owner_id)
        return verdict

    def _keep_evidence(self, ckpt_root: Hash) -> None:
        self._evidence[ckpt_root] = None
        if len(self._evidence) > EVIDENCE:
            self._evidence.popitem(last=False)

    def _prune(self, protect: set[Hash]) -> None:
        """Drop the checkpoints retention does not keep (storage/retention.py): those of
        blocks older than the last keep_checkpoints, except `protect`'s and the pooled
        model transactions'. On the chain thread."""
        self._pruned_at = self.store.height
        pooled = {tx.proof.ckpt_root for tx_id in self.mempool.ids()
                  if isinstance(tx := self.mempool.get(tx_id), ModelTx)}
        dropped = retention.prune(self.store, self.artifacts, self.config.keep_checkpoints,
                                  protect | pooled)
        if dropped:
            log.debug("dropped %d checkpoints of old blocks", dropped)

    def _find_accused(self, owner_id: Hash) -> tuple[Hash, Proof, Hash | None] | None:
        """(prev_id, proof, the block to drop) of a block, or of a model transaction in
        the pool or in a main-chain block (found through the transaction index)."""
        block = self.store.get_block(owner_id)
        if block is not None:
            return block.header.prev_id, block.header.proof, owner_id
        tx = self.mempool.get(owner_id)
        if isinstance(tx, ModelTx):
            return tx.prev_id, tx.proof, None
        block_id = self.store.tx_block(owner_id)
        block = self.store.get_block(block_id) if block_id else None
        for tx in block.txs if block else ():
            if isinstance(tx, ModelTx) and compute_tx_id(tx) == owner_id:
                return tx.prev_id, tx.proof, block_id
        return None

    async def submit_transaction(self, tx: Transaction, *, local: bool = False) -> Hash:
        """Add a transaction to the mempool (ConsensusError says why not); a `local` one
        (from RPC) is announced again on new tips until it is mined."""
        try:
            tx_id = await self.on_chain_thread(self.mempool.add, tx)
        except FraudFound as fraud:
            self._keep_evidence(fraud.ckpt_root)
            raise
        if self.network is not None:
            self.network.announce_tx(tx_id, tx, local=local)
        return tx_id

    # -- mining ----------------------------------------------------------------------------

    async def start_mining(self) -> None:
        """Start the miner on the tip; a miner already at work goes on undisturbed."""
        if self.stopping.is_set():
            raise RuntimeError("the node is stopping")
        if self.miner is not None and self.miner.running:
            return
        self.miner = MinerService(self._from_miner, device=self.config.device,
                                  datasets=self.config.datasets)
        self.miner.start()
        await self._renew_job()

    async def stop_mining(self) -> None:
        if self.miner is not None:
            miner, self.miner = self.miner, None
            await asyncio.to_thread(miner.stop)

    def _make_job(self) -> Job:
        """A job on the tip (on the chain thread: the store's lock may be held long)."""
        assert self.key is not None
        t2 = self.store.next_context().expected_target
        task = self.active_task()
        return Job(self.params, self.store.tip_id, task, t2, compute_mtx_target(self.params, t2),
                   self.key.pubkey, self._pick_reference(task))

    def _pick_reference(self, task: Task) -> Reference | None:
        """The model to train from (§7): the most accurate one of the active task that a
        block on the tip may reference (a block's or an included mtx's, registered
        within l_ref blocks), the newest on a tie; None (HtoA's init) when there is none
        or its file is not here. Our choice: accuracy decides, since a reference at or
        above the block threshold makes every checkpoint of the draw a lottery ticket."""
        task_id, tip = compute_task_id(task), self.store.height
        best: tuple[tuple[int, int], Hash] | None = None
        for height in range(tip, max(0, tip - task.l_ref - 1), -1):
            block_id = self.store.main_chain_id(height)
            block = self.store.get_block(block_id) if block_id else None
            if block is None:
                break
            for proof in block_proofs(block):
                rank = (proof.n_correct, height)
                if proof.task_id == task_id and (best is None or rank > best[0]):
                    best = rank, proof.model_id
        if best is None:
            return None
        record = self.store.get_state(("model", best[1]))
        blob = self.artifacts.get_model(best[1])
        if record is None or blob is None:
            return None
        return Reference(best[1], blob, record.total_steps)

    async def _renew_job(self) -> None:
        if self.miner is None:
            return
        job = await self.on_chain_thread(self._make_job)
        if self.miner is not None and not self.stopping.is_set():
            self.miner.set_job(job)

    def _assemble(self, solution: Solution) -> Block | None:
        """The block of a solution on the tip, with the mempool's transactions; None when
        the tip moved on (on the chain thread, so nothing moves while it is built)."""
        assert self.key is not None
        if solution.prev_id != self.store.tip_id:
            return None
        ctx = self.store.next_context()
        timestamp = max(int(time.time()), ctx.median_time_past + 1)
        return assemble_block(self.store.tip.header, timestamp, ctx.expected_target,
                              solution.proof, self.mempool.select(), self.key)

    def _from_miner(self, kind: str, generation: int, payload: object) -> None:
        """Called on the miner's reader thread: hand over to the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_miner_message, kind, generation, payload)

    def _on_miner_message(self, kind: str, generation: int, payload: object) -> None:
        miner = self.miner
        if miner is None or generation != miner.generation:
            if kind == "solution":
                self.stats.stale += 1
            return
        if kind == "progress":
            assert isinstance(payload, Progress)
            previous = self.stats.progress
            if previous is None or previous.h1 != payload.h1:
                self.stats.draws += 1
            self.stats.progress = payload
            if miner.job is not None:  # a checkpoint: k more steps trained for the task
                task_id = compute_task_id(miner.job.task)
                self.stats.trained[task_id] = self.stats.trained.get(task_id, 0) + miner.job.task.k
        elif kind == "error":
            self.stats.error = str(payload)
            log.error("miner: %s", payload)
        elif kind == "died":
            self.stats.error = f"the miner process died ({payload})"
            log.error("%s; setgenerate true starts a new one", self.stats.error)
            self.miner = None
        elif kind == "solution":
            assert isinstance(payload, Solution) and miner.job is not None
            task = asyncio.ensure_future(self._on_solution(miner.job, generation, payload))
            self._solutions.add(task)
            task.add_done_callback(self._solutions.discard)

    async def _on_solution(self, job: Job, generation: int, solution: Solution) -> None:
        """Store a solution's artifacts, then pool its model transaction or assemble and
        add its block. After a block the miner has stopped: it gets a new job whatever
        became of the block (a refused one too, or mining would stall)."""
        try:
            if solution.prev_id == self.store.tip_id:
                await self.on_chain_thread(self._publish, solution)
                await self._use_solution(job, solution)
            else:
                self.stats.stale += 1
        except Exception:  # a bug here must not go unseen, nor stop the miner
            log.exception("handling the miner's %s failed", solution.kind)
        finally:
            miner = self.miner
            if (solution.kind == "block" and miner is not None
                    and miner.generation == generation and not self.stopping.is_set()):
                await self._renew_job()

    def _publish(self, solution: Solution) -> None:
        """Store a solution's model, leaves and checkpoints, kept as our own for good:
        we are the one peer sure to have them, for a reorg however deep."""
        self.artifacts.keep_own(solution.proof.ckpt_root)
        solution.publish(self.artifacts)

    async def _use_solution(self, job: Job, solution: Solution) -> None:
        assert self.key is not None
        try:
            if solution.kind == "mtx":
                tx = sign_tx(ModelTx(solution.prev_id, solution.proof, 0), self.key)
                await self.submit_transaction(tx)
                self.stats.mtxs += 1
                log.info("model transaction %s: %d steps, %d/%d correct",
                         compute_tx_id(tx).hex(),
                         solution.proof.steps, solution.proof.n_correct,
                         job.task.dataset.val_size)
                return
            block = await self.on_chain_thread(self._assemble, solution)
            if block is None:
                self.stats.stale += 1
                return
            await self.submit_block(block)
            self.stats.blocks += 1
            log.info("mined block %s at height %d: %d steps, %d/%d correct, %d txs",
                     compute_block_id(block.header).hex(), block.header.height,
                     solution.proof.steps, solution.proof.n_correct,
                     job.task.dataset.val_size, len(block.txs))
        except (ConsensusError, MissingParent, MissingArtifact) as e:
            # An mtx whose block left the window while it was signed: the tip moved on.
            stale = isinstance(e, ConsensusError) and e.reason == "bad-mtx-prev"
            log.log(logging.INFO if stale else logging.ERROR, "own %s refused: %s",
                    solution.kind, e)


async def serve(config: Config, build_rpc: Callable[[Node, Authenticator], RpcServer]) -> None:
    """Open a node, serve JSON-RPC and (if configured) mine until told to stop."""
    node = Node(config)
    node.open()
    try:
        auth = Authenticator(write_cookie(node.datadir.path), config.rpc_auth)
        rpc = build_rpc(node, auth)
    except BaseException:
        await node.close()
        raise
    await node.run(rpc)
