"""The node's P2P network: connections, relay, sync, artifacts and fraud proofs (§8, §11).

One asyncio task per connection reads its messages in order and answers the quick
ones at once; whatever waits on the chain (adding a block, a transaction) or on other
peers (fetching artifacts) runs in its own task, so no peer's reader ever waits on
another peer. Blocks are added one at a time, parent first, by one task.

Peer management follows Bitcoin Core where §11 is silent:
- up to `max_outbound` connections we dial (the `--peer` seeds and `addnode` peers are
  dialled on top of those and redialled when they drop) and `max_inbound` accepted;
- addresses are learnt from handshakes (the peer's address with its listening port),
  `getaddr` (asked of every outbound peer, answered once per inbound one) and `addr`
  (at most 0.1 a second per peer after a burst of 1,000; small announcements are
  passed on to two other peers);
- one link per node: a node's version nonce names it while it runs, so two links to
  one node at one address (both dialled by us, or one each way when we dial each
  other at once) are seen and one of them closed, the same one at both ends;
- transactions are announced once to each peer, and those submitted here (RPC) again
  to every peer on a new tip (at most every 30 s) until mined, as Core's wallet
  resends its own: a peer that refused one on its old tip (a payer its branch had not
  paid) learns it again;
- ping every `ping_interval`; a peer silent for `idle_timeout` is dropped;
- misbehaviour (a malformed or oversize frame, an invalid block or header, data not
  asked for, an inv flood) disconnects the peer and bans its address for
  `ban_seconds`. Not scored: one strike. Like Bitcoin Core, peers on 127.0.0.1 and ::1
  are disconnected but not banned, or one bad local process would cut off a local
  testnet; other loopback addresses (127.0.0.2, …) are banned like any other.
- A block that fails a private audit is not held against the peer that relayed it: its
  own audits drew other intervals. A fraud notice (the accused and the interval) goes
  to every peer instead; each fetches the interval's two checkpoints from its sender
  and replays it. A notice whose sender cannot serve them, or whose interval replays
  well within delta, gets the sender banned; one that replays near delta is dropped.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from consensus.blocks import Block, block_proofs, compute_block_id
from consensus.encoding import ZERO_HASH, Hash
from consensus.errors import ConsensusError
from consensus.proofs import Proof
from consensus.seal import MissingArtifact, Need
from consensus.tasks import Task
from consensus.transactions import ModelTx, Transaction, compute_tx_id
from mining.verifier import DPoDLEngine, FraudFound, Verdict
from p2p.addrman import Address, AddressBook, parse_address
from p2p.fetch import Fetcher, FetchFailed
from p2p.framing import ConnectionClosed, FrameError
from p2p.handshake import compute_genesis_id, handshake
from p2p.messages import (
    INV_BLOCK,
    INV_MTX,
    INV_TX,
    MAX_ADDR,
    MAX_CONTROL,
    MAX_INV,
    PROTOCOL_VERSION,
    Addr,
    CkptChunk,
    FraudNotice,
    GetAddr,
    GetCkpt,
    GetData,
    GetHeaders,
    GetModel,
    Headers,
    Inv,
    InvItem,
    Kind,
    Message,
    ModelChunk,
    NetAddress,
    NotFound,
    Ping,
    Pong,
    ProtocolError,
    Tx,
    Version,
)
from p2p.peer import KnownSet, Peer
from p2p.sync import BlockSync, build_locator, headers_after
from storage import retention, schema
from storage.chain import MissingParent

if TYPE_CHECKING:
    from node.node import Node

log = logging.getLogger("dpodl.p2p")

USER_AGENT = b"/dpodl:0.1/"
TX_REQUESTS_PER_PEER = 100
TX_REQUEST_TIMEOUT = 60.0  # seconds a peer has to answer a getdata for a transaction
SERVING_PER_PEER = 16  # chunk requests of one peer being answered at once (fetch asks 8)
SOURCES = 4096  # artifact ids whose sources are remembered
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1"})
# Failures of a block's or transaction's bytes that its id does not commit to (ids leave
# the signatures out, §1) or of our clock: another copy of the same id may be fine.
NOT_COMMITTED = frozenset({"bad-blk-sig", "bad-txn-sig", "bad-txnmrklroot", "bad-blk-length",
                           "bad-txns-duplicate", "time-too-new"})
WAITING_BLOCKS = 64  # blocks that model transactions wait for
WAITING_PER_BLOCK = 16
PARKED_PROOFS = 64  # fraud proofs about blocks or mtxs not here yet
PREFETCH_BLOCKS = 4  # blocks whose artifacts are fetched ahead of their turn at once
# Our own transactions (the last this many) are announced again on a new tip until
# mined, at most every RESEND_EVERY seconds: well inside a peer's inv rate however fast
# blocks come (a node catching up connects dozens a second).
LOCAL_TXS = 100
RESEND_EVERY = 30.0


@dataclass(frozen=True, slots=True)
class NetConfig:
    bind: str = "0.0.0.0"
    port: int = 0  # 0: do not listen
    seeds: tuple[Address, ...] = ()
    max_outbound: int = 8
    max_inbound: int = 32
    handshake_timeout: float = 10.0
    ping_interval: float = 30.0
    idle_timeout: float = 120.0
    stall_timeout: float = 20.0
    fetch_timeout: float = 30.0
    ban_seconds: float = 3600.0
    send_queue_bytes: int = 64 << 20
    tick: float = 0.5  # how often connections, stalls and pings are looked after
    user_agent: bytes = USER_AGENT


@dataclass(slots=True)
class NetStats:
    fraud_proofs: int = 0
    bans: int = 0


class Network:
    def __init__(self, node: "Node", config: NetConfig) -> None:
        self.node, self.config = node, config
        self.params, self.store = node.params, node.store
        self.genesis_id = compute_genesis_id(self.params)
        self.book = AddressBook()
        self.peers: dict[int, Peer] = {}
        self.manual: set[Address] = set(config.seeds)
        self.sync = BlockSync(self.params, self.store, stall_timeout=config.stall_timeout)
        self.fetcher = Fetcher(node.artifacts, timeout=config.fetch_timeout,
                               punish=self.punish)
        self.stats = NetStats()
        self.active = True  # setnetworkactive
        self._sources: OrderedDict[Hash, list[Peer]] = OrderedDict()
        self._tx_requests: dict[Hash, tuple[Peer, float]] = {}
        self._rejected_txs = KnownSet(10_000)  # cleared on each new tip, as in Core
        self._local_txs: OrderedDict[Hash, InvItem] = OrderedDict()  # submitted here
        self._resent = -RESEND_EVERY  # when they last went out again
        self._tx_adding: dict[Hash, Transaction] = {}  # arrived and being checked
        self._adding: Block | None = None  # the block being checked
        self._tip_moved = asyncio.Event()  # wakes the keeper of recent checkpoints
        self._unobtainable = KnownSet(10_000)  # recent checkpoints no peer would serve
        # Model transactions mined on a block we do not have yet, by that block's id.
        self._waiting_txs: OrderedDict[Hash, list[tuple[Peer, Hash, Transaction]]] = (
            OrderedDict())
        self._seen_proofs = KnownSet(1_000)
        self._parked: OrderedDict[Hash, tuple[FraudNotice, Peer]] = OrderedDict()
        # Sent in every version: a node that sees its own back has dialled itself, and
        # two links that carry the same one (from one host) reach the same node.
        self.nonce = random.getrandbits(64)
        self._dialling: set[Address] = set()
        self._handshaking = 0  # inbound connections not yet through their handshake
        self._redial: dict[Address, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._blocks_ready = asyncio.Event()
        self._prefetch_slots = asyncio.Semaphore(PREFETCH_BLOCKS)
        self._prepared: set[Hash] = set()  # tasks whose dataset loading has been started
        self._own_addrs: set[Address] = set()  # where dialling reached ourselves
        self._server: asyncio.Server | None = None
        self._closing = False

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.port:
            self._server = await asyncio.start_server(self._accept, self.config.bind,
                                                      self.config.port)
            log.info("P2P on %s:%d", self.config.bind, self.config.port)
        self._spawn(self._maintain())
        self._spawn(self._add_blocks())
        self._spawn(self._keep_recent_checkpoints())

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for peer in list(self.peers.values()):
            peer.close("shutdown")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closing:
            log.error("P2P task failed", exc_info=task.exception())

    # -- connections -------------------------------------------------------------------

    def add_node(self, addr: Address) -> None:
        """Dial `addr` and keep it connected (`addnode add`, `--peer`)."""
        self.manual.add(addr)
        self._redial.pop(addr, None)

    def remove_node(self, addr: Address) -> bool:
        if addr not in self.manual:
            return False
        self.manual.discard(addr)
        return True

    def dial_once(self, addr: Address) -> None:
        self._spawn(self._dial(addr))

    def ban(self, host: str, seconds: float, reason: str) -> None:
        """Refuse `host` for `seconds` and drop its connections (setban)."""
        self.book.ban(host, seconds, reason)
        for peer in list(self.peers.values()):
            if peer.addr[0] == host:
                peer.close(f"banned: {reason}")

    def disconnect(self, peer_id: int) -> bool:
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        peer.close("disconnected by the operator")
        return True

    def set_active(self, active: bool) -> None:
        self.active = active
        if not active:
            for peer in list(self.peers.values()):
                peer.close("network disabled")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        inbound = sum(p.inbound for p in self.peers.values()) + self._handshaking
        if (not self.active or self._closing or self.book.is_banned(host)
                or inbound >= self.config.max_inbound):
            writer.transport.abort()
            return
        self._handshaking += 1  # counted against the cap until it is a peer or gone
        await self._run(reader, writer, (host, port), inbound=True)

    async def _dial(self, addr: Address) -> None:
        self._dialling.add(addr)
        self.book.attempt(addr)
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                reader, writer = await asyncio.open_connection(*addr)
        except (OSError, TimeoutError) as e:
            log.debug("could not connect to %s:%d: %s", *addr, e)
            self.book.failed(addr)
            return
        finally:
            self._dialling.discard(addr)
        # A manual peer may be named by host name (a compose service, say): the peer is
        # its address as connected, for bans and the address book; the name stays ours.
        host = writer.get_extra_info("peername")[0]
        await self._run(reader, writer, (host, addr[1]), inbound=False, dialled=addr)

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   addr: Address, *, inbound: bool, dialled: Address | None = None) -> None:
        ours = Version(PROTOCOL_VERSION, self.genesis_id, self.store.height,
                       self.config.port, self.nonce, self.config.user_agent)
        try:
            theirs = await handshake(reader, writer, self.params, ours=ours,
                                     timeout=self.config.handshake_timeout,
                                     max_payload=MAX_CONTROL)
        except (FrameError, ConnectionClosed, OSError) as e:
            self._handshaking -= inbound
            reason = getattr(e, "reason", type(e).__name__)
            log.info("handshake with %s:%d failed: %s", *addr, reason)
            if dialled is not None:
                self.book.failed(dialled)
                if reason == "self-connection":
                    self._own_addrs.add(dialled)
            if reason not in ("self-connection", "timeout") and isinstance(e, FrameError):
                self._ban(addr[0], f"handshake: {reason}")
            writer.transport.abort()
            return
        self._handshaking -= inbound
        twin = next((p for p in self.peers.values() if p.alive and
                     p.version.nonce == theirs.nonce and p.addr[0] == addr[0]), None)
        if twin is not None and not (twin.inbound and inbound):
            # One node, two links: both dialled by us (by name and by address from
            # gossip), or one each way (we dialled each other at once). Keep the first
            # of ours; of one each way, both ends keep the one the larger nonce dialled.
            # (The same host only: a nonce from elsewhere proves nothing.)
            keep_new = twin.inbound != inbound and (self.nonce > theirs.nonce) != inbound
            log.info("%s:%d is %r already: keeping the %s link", *addr, twin,
                     "new" if keep_new else "old")
            if not keep_new:
                if dialled in self.manual:  # the link it has stands for the operator's
                    twin.manual, twin.dialled = True, dialled
                writer.transport.abort()
                return
            twin.close("duplicate")
        else:
            twin = None
        peer = Peer(reader, writer, params=self.params, addr=addr, inbound=inbound,
                    version=theirs, send_queue_bytes=self.config.send_queue_bytes)
        peer.dialled = dialled
        peer.manual = dialled in self.manual
        if twin is not None and twin.manual:  # it replaces a link we keep for the operator
            peer.manual, peer.dialled = True, twin.dialled
        peer.listen_addr = self._listen_addr(addr[0], addr[1] if dialled else theirs.listen_port)
        self.peers[peer.id] = peer
        try:
            await self._serve(peer)
        finally:
            peer.close(peer.close_reason or "closed")
            await peer.wait_closed()
            del self.peers[peer.id]
            self.sync.forget_peer(peer)
            self.fetcher.forget_peer(peer)
            for key in [k for k, sources in self._sources.items() if peer in sources]:
                self._sources[key].remove(peer)
            for tx_id in [t for t, (p, _) in self._tx_requests.items() if p is peer]:
                del self._tx_requests[tx_id]
            if peer.listen_addr not in (None, *(p.listen_addr for p in self.peers.values())):
                self.book.disconnected(peer.listen_addr)
            log.info("%r disconnected: %s", peer, peer.close_reason)
            self._blocks_ready.set()

    def _listen_addr(self, host: str, port: int) -> Address | None:
        try:
            return parse_address(host, port) if port else None
        except ValueError:
            return None

    async def _serve(self, peer: Peer) -> None:
        log.info("%r connected (%s, height %d, %s)", peer,
                 "inbound" if peer.inbound else "outbound", peer.version.best_height,
                 peer.version.user_agent.decode(errors="replace"))
        if peer.listen_addr is not None:
            self.book.add(peer.listen_addr)
            self.book.connected(peer.listen_addr)
            host, port = peer.listen_addr  # a node that takes connections: pass it on
            self._relay_addrs([NetAddress(host.encode(), port, int(time.time()))], peer)
        if not peer.inbound:
            peer.send(GetAddr())
        self._ask_headers(peer)
        while peer.alive:
            try:
                msg = await peer.receive(self.config.idle_timeout)
            except ConnectionClosed:
                peer.close("closed by peer")
                return
            except FrameError as e:
                if e.reason == "timeout":
                    peer.close("idle")
                else:
                    self.punish(peer, e.reason)
                return
            except (ConnectionError, OSError):
                peer.close("connection-lost")
                return
            try:
                self._dispatch(peer, msg)
            except FrameError as e:  # ProtocolError from a handler
                self.punish(peer, e.reason)
            except ConsensusError as e:
                self.punish(peer, f"invalid: {e.reason}")

    def punish(self, peer: Peer, reason: str) -> None:
        """Disconnect a misbehaving peer and refuse its address for a while."""
        if not peer.alive:
            return
        log.info("%r misbehaved: %s", peer, reason)
        peer.close(f"misbehaved: {reason}")
        self._ban(peer.addr[0], reason)

    def _ban(self, host: str, reason: str) -> None:
        if host not in LOCAL_HOSTS:
            self.stats.bans += 1
            self.ban(host, self.config.ban_seconds, reason)

    async def _maintain(self) -> None:
        """Dial, ping, and drop stallers, every tick."""
        while True:
            try:
                self._tick()
            except Exception:  # a bug: say so, and keep the node's connections looked after
                log.exception("P2P maintenance failed")
            await asyncio.sleep(self.config.tick)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.active:
            self._dial_more(now)
        for peer in list(self.peers.values()):
            if peer.ping_nonce is None and now - peer.ping_sent > self.config.ping_interval:
                peer.ping_nonce = random.getrandbits(64)
                peer.ping_sent = now
                peer.send(Ping(peer.ping_nonce))
            elif (peer.ping_nonce is not None
                  and now - peer.ping_sent > self.config.idle_timeout):
                peer.close("ping-timeout")
        for peer in self.sync.stallers(now) + self.sync.late_headers(self.peers, now):
            log.info("%r stalled", peer)
            peer.close("stalled")
        best = self.sync.best_height()
        for peer in list(self.peers.values()):
            if peer.best_height > best:  # it has more than we know of: catch up
                self._ask_headers(peer)
        for tx_id, (requested, when) in list(self._tx_requests.items()):
            if now - when > TX_REQUEST_TIMEOUT:  # unanswered: let another announcer try
                del self._tx_requests[tx_id]
                requested.tx_requests -= 1
        self._request_blocks()

    def _dial_more(self, now: float) -> None:
        connected = {a for p in self.peers.values() for a in (p.listen_addr, p.dialled) if a}
        busy = connected | self._dialling | self._own_addrs
        for addr in self.manual - busy:
            if self._redial.get(addr, 0.0) <= now:
                self._redial[addr] = now + 5.0
                self._spawn(self._dial(addr))
        outbound = sum(not p.inbound and not p.manual for p in self.peers.values())
        want = self.config.max_outbound - outbound - len(self._dialling - self.manual)
        for _ in range(max(0, want)):
            addr = self.book.pick(busy | self.manual)
            if addr is None:
                break
            busy.add(addr)
            self._spawn(self._dial(addr))

    # -- messages ----------------------------------------------------------------------

    def _dispatch(self, peer: Peer, msg: Message) -> None:
        handler = self._handlers.get(type(msg))
        if handler is None:  # version or verack again
            raise ProtocolError("unexpected-message", f"{type(msg).__name__} after the handshake")
        handler(self, peer, msg)

    def _on_ping(self, peer: Peer, msg: Ping) -> None:
        peer.send(Pong(msg.nonce))

    def _on_pong(self, peer: Peer, msg: Pong) -> None:
        if msg.nonce == peer.ping_nonce:
            peer.ping_time = time.monotonic() - peer.ping_sent
            peer.ping_nonce = None

    def _on_getaddr(self, peer: Peer, msg: GetAddr) -> None:
        if peer.inbound and not peer.sent_addr:
            peer.sent_addr = True
            peer.send(Addr(tuple(NetAddress(host.encode(), port, int(seen))
                                 for (host, port), seen in self.book.sample(MAX_ADDR))))

    def _on_addr(self, peer: Peer, msg: Addr) -> None:
        fresh = []
        now = time.time()
        for item in msg.addrs:
            if not peer.addr_limit.take():
                break  # over its rate: the rest is dropped, not held against it
            try:
                addr = parse_address(item.host, item.port)
            except ValueError:
                continue
            if self.book.add(addr, seen=min(float(item.seen), now)) and now - item.seen < 600:
                fresh.append(item)
        if fresh and len(msg.addrs) <= 10:  # pass a small announcement on
            self._relay_addrs(fresh, peer)

    def _relay_addrs(self, addrs: list[NetAddress], source: Peer) -> None:
        """Send a few fresh addresses to two random peers other than `source`."""
        others = [p for p in self.peers.values() if p is not source]
        for other in random.sample(others, min(2, len(others))):
            other.send(Addr(tuple(addrs)))

    def _on_inv(self, peer: Peer, msg: Inv) -> None:
        if not peer.inv_limit.take(len(msg.items)):
            raise ProtocolError("inv-flood", f"{len(msg.items)} items over the rate")
        wanted = []
        for item in msg.items:
            if item.kind == INV_BLOCK:
                peer.known_blocks.add(item.id)
                if item.id in self.sync.invalid:
                    continue
                if self.store.get_entry(item.id) is None and item.id not in self.sync.headers:
                    self._ask_headers(peer)
            elif item.kind in (INV_TX, INV_MTX):
                peer.known_txs.add(item.id)
                # The mempool is the chain thread's; one dict lookup from here is safe.
                if (item.id in self._tx_requests or item.id in self._tx_adding
                        or item.id in self._rejected_txs
                        or peer.tx_requests >= TX_REQUESTS_PER_PEER
                        or self.node.mempool.get(item.id) is not None):
                    continue
                self._tx_requests[item.id] = peer, time.monotonic()
                peer.tx_requests += 1
                wanted.append(item)
        if wanted:
            peer.send(GetData(tuple(wanted)))

    def _on_getdata(self, peer: Peer, msg: GetData) -> None:
        missing = []
        for item in msg.items:
            if item.kind == INV_BLOCK:
                peer.block_requests.append(item.id)
            else:
                tx = self.node.mempool.get(item.id)
                if tx is None:
                    missing.append(item)
                else:
                    peer.known_txs.add(item.id)
                    peer.send(Tx(tx))
        if missing:
            peer.send(NotFound(tuple(missing)))
        if len(peer.block_requests) > MAX_INV:
            raise ProtocolError("getdata-flood", f"{len(peer.block_requests)} blocks asked for")
        if peer.block_requests and not peer.sending_blocks:
            peer.sending_blocks = True
            self._spawn(self._send_blocks(peer))

    async def _send_blocks(self, peer: Peer) -> None:
        """Send the blocks `peer` asked for in order, each once its socket has room, so a
        peer syncing big blocks is paced rather than overflowing its send queue."""
        try:
            while peer.block_requests and peer.alive:
                block_id = Hash(peer.block_requests.popleft())
                raw = self.store.db.get(schema.block_key(block_id))
                if raw is None:
                    peer.send(NotFound((InvItem(INV_BLOCK, block_id),)))
                    continue
                await peer.room(len(raw) + 9)
                peer.known_blocks.add(block_id)
                peer.send_raw(Kind.BLOCK, raw)
        finally:
            peer.sending_blocks = False

    def _on_notfound(self, peer: Peer, msg: NotFound) -> None:
        for item in msg.items:
            if item.kind == INV_BLOCK:
                self.sync.not_found(peer, item.id)
            elif self._tx_requests.get(item.id, (None,))[0] is peer:
                del self._tx_requests[item.id]
                peer.tx_requests -= 1

    def _on_getheaders(self, peer: Peer, msg: GetHeaders) -> None:
        headers = headers_after(self.store, msg.locator, msg.stop)
        for header in headers:
            peer.known_blocks.add(compute_block_id(header))
        peer.send(Headers(tuple(headers)))

    def _on_headers(self, peer: Peer, msg: Headers) -> None:
        more = self.sync.add_headers(peer, msg.headers)
        if more:
            last = compute_block_id(msg.headers[-1])
            self.sync.want_headers(peer)
            peer.send(GetHeaders((last, *build_locator(self.store)), ZERO_HASH))
        self._request_blocks()

    def _on_block(self, peer: Peer, block: Block) -> None:
        if not self.sync.on_block(peer, block, peer.last_size):
            if compute_block_id(block.header) in self.sync.cancelled:
                return  # we asked, then dropped the request: a late answer
            raise ProtocolError("unrequested-data", "a block not asked for")
        self.node.block_times.received(compute_block_id(block.header))
        self._note_sources(block_proofs(block), peer)
        self._spawn(self._prefetch(block, peer))
        self._blocks_ready.set()
        self._request_blocks()

    def _on_tx(self, peer: Peer, msg: Tx) -> None:
        tx_id = compute_tx_id(msg.tx)
        if self._tx_requests.get(tx_id, (None,))[0] is not peer:
            raise ProtocolError("unrequested-data", "a transaction not asked for")
        del self._tx_requests[tx_id]
        peer.tx_requests -= 1
        self._start_add_tx(peer, tx_id, msg.tx)

    def _start_add_tx(self, peer: Peer, tx_id: Hash, tx: Transaction) -> None:
        """Check a transaction in its own task; while it runs, nobody fetches it again."""
        self._tx_adding[tx_id] = tx
        task = self._spawn(self._add_tx(peer, tx_id, tx))
        task.add_done_callback(lambda _: self._tx_adding.pop(tx_id, None))

    def _on_getartifact(self, peer: Peer, msg: GetModel | GetCkpt) -> None:
        if peer.serving >= SERVING_PER_PEER:
            raise ProtocolError("request-flood", f"over {SERVING_PER_PEER} chunk requests "
                                                 f"at once")
        key = msg.model_id if isinstance(msg, GetModel) else msg.ckpt_root
        sources = [p for p in self._sources.get(key, ()) if p.alive and p is not peer]
        peer.serving += 1
        task = self._spawn(self.fetcher.serve(peer, msg, sources))
        task.add_done_callback(lambda _: setattr(peer, "serving", peer.serving - 1))

    def _on_chunk(self, peer: Peer, msg: ModelChunk | CkptChunk) -> None:
        if not self.fetcher.on_chunk(peer, msg):
            raise ProtocolError("unrequested-data", "an artifact chunk not asked for")

    def _on_fraud_notice(self, peer: Peer, msg: FraudNotice) -> None:
        key = (msg.owner_id, msg.index)
        if key in self._seen_proofs:
            return
        if peer.checking_fraud:
            raise ProtocolError("fraud-proof-flood", "a second proof before the first is checked")
        self._seen_proofs.add(key)
        peer.checking_fraud = True
        task = self._spawn(self._check_fraud(peer, msg))
        task.add_done_callback(lambda _: setattr(peer, "checking_fraud", False))

    _handlers: dict[type, Any] = {
        Ping: _on_ping, Pong: _on_pong, GetAddr: _on_getaddr, Addr: _on_addr, Inv: _on_inv,
        GetData: _on_getdata, NotFound: _on_notfound, GetHeaders: _on_getheaders,
        Headers: _on_headers, Block: _on_block, Tx: _on_tx, GetModel: _on_getartifact,
        GetCkpt: _on_getartifact, ModelChunk: _on_chunk, CkptChunk: _on_chunk,
        FraudNotice: _on_fraud_notice,
    }

    # -- sync --------------------------------------------------------------------------

    def _ask_headers(self, peer: Peer) -> None:
        if self.sync.want_headers(peer):
            peer.send(GetHeaders(build_locator(self.store), ZERO_HASH))

    def _request_blocks(self) -> None:
        for peer, block_ids in self.sync.requests(list(self.peers.values())).items():
            for i in range(0, len(block_ids), MAX_INV):
                peer.send(GetData(tuple(InvItem(INV_BLOCK, b) for b in block_ids[i:i + MAX_INV])))

    def _note_sources(self, proofs: Iterable[Proof], peer: Peer) -> None:
        """Remember that `peer` can serve the artifacts these proofs name."""
        for proof in proofs:
            for key in (proof.model_id, proof.ckpt_root, proof.ref_model):
                if key:
                    sources = self._sources.setdefault(Hash(key), [])
                    if peer not in sources:
                        sources.append(peer)
                    self._sources.move_to_end(Hash(key))
                    if len(self._sources) > SOURCES:
                        self._sources.popitem(last=False)

    def _sources_of(self, needs: Iterable[Any], first: Peer,
                    block_id: Hash | None = None) -> list[Peer]:
        """Who to ask for `needs`: the peer the block or mtx came from, then the others
        that gave us those artifacts' ids, then those that sent the block's header."""
        peers = [first]
        for need in needs:
            peers += [p for p in self._sources.get(need.key, ()) if p not in peers]
        if block_id is not None:
            peers += [p for i in self.sync.holders.get(block_id, ())
                      if (p := self.peers.get(i)) is not None and p not in peers]
        return [p for p in peers if p.alive]

    async def _add_blocks(self) -> None:
        """Add arrived blocks, parent first, one at a time."""
        while True:
            await self._blocks_ready.wait()
            self._blocks_ready.clear()
            while (item := self.sync.next_ready()) is not None:
                self._adding = item[0]
                try:
                    await self._add_block(*item)
                finally:
                    self._adding = None
                self._request_blocks()

    async def _add_block(self, block: Block, peer: Peer) -> None:
        block_id = compute_block_id(block.header)
        self._prepare(block.header.proof.task_id)
        # Each proof (the block's, each mtx's) may ask twice: for its model and history,
        # then for the checkpoints its audits drew.
        rounds = 2 * (1 + sum(isinstance(tx, ModelTx) for tx in block.txs)) + 1
        for _ in range(rounds):
            try:
                t0 = time.monotonic()
                await self.node.submit_block(block)
                log.debug("block %s added in %.3fs", block_id.hex()[:12], time.monotonic() - t0)
            except MissingArtifact as missing:
                log.debug("block %s: %s", block_id.hex()[:12], missing)
                if await self._fetch_missing(missing, peer, block_id, f"block {block_id.hex()}"):
                    continue
                break
            except FraudFound as fraud:
                log.warning("block %s: %s; sending the fraud proof", block_id.hex(), fraud)
                self.sync.reject(block_id, convicted=True)
                self.broadcast(_notice(fraud))
            except ConsensusError as e:
                log.info("block %s from %r refused: %s", block_id.hex(), peer, e)
                if e.reason in NOT_COMMITTED:  # this copy is bad, not the block: ask again
                    self.sync.drop(block_id)
                else:
                    self.sync.reject(block_id)
                self.punish(peer, f"invalid-block: {e.reason}")
            except MissingParent:
                log.info("block %s from %r: parent gone", block_id.hex(), peer)
                self.sync.drop(block_id)
            except Exception:  # a bug, or a task's dataset missing here: not the peer's
                log.exception("adding block %s failed", block_id.hex())
                self.sync.drop(block_id)
            else:
                self.sync.done(block_id)
                self._check_parked(block_id)
            return
        self.sync.drop(block_id)

    def _prepare(self, task_id: Hash) -> None:
        """The first time a block of a task is to be checked, load the task's dataset on a
        worker thread, so that it loads while the block's artifacts are fetched instead of
        after them (it is the check's own cost either way). A failure is the check's to
        report: it loads the dataset again."""
        if task_id in self._prepared:
            return
        self._prepared.add(task_id)
        task = self.store.get_task(task_id)
        if task is not None:
            self._spawn(asyncio.to_thread(_prepare_quietly, self.node.engine, task))

    async def _fetch_missing(self, missing: MissingArtifact, peer: Peer,
                             block_id: Hash | None, what: str) -> bool:
        """Fetch what checking a block or mtx from `peer` lacked; False when it could not
        be had. A peer that sent it and then says it lacks the model or history its proof
        names misbehaves: it could not have checked what it relayed. (Not so for
        checkpoints: a relay keeps only some and may fail to fetch the rest.)"""
        try:
            await self.fetcher.fetch(missing.needs,
                                     self._sources_of(missing.needs, peer, block_id))
        except FetchFailed as e:
            log.info("%s from %r not checked: %s", what, peer, e)
            if e.need.kind != "checkpoint" and peer in e.refused:
                self.punish(peer, f"withheld-{e.need.kind}")
            return False
        return True

    def busy_roots(self) -> set[Hash]:
        """The histories of the blocks and model transactions here to be checked: their
        checkpoints are fetched for a check to come, so retention must leave them."""
        blocks = [block for block, _ in self.sync.arrived.values()]
        txs = [*self._tx_adding.values(),
               *(tx for waiting in self._waiting_txs.values() for _, _, tx in waiting)]
        return ({proof.ckpt_root for block in blocks + [self._adding] if block is not None
                 for proof in block_proofs(block)}
                | {tx.proof.ckpt_root for tx in txs if isinstance(tx, ModelTx)})

    async def _keep_recent_checkpoints(self) -> None:
        """Fetch every checkpoint of the last keep_checkpoints blocks, not only those our
        audits drew, so that this node serves any interval of a recent block once its
        miner has gone (§8; storage/retention.py). After each new tip, while block sync
        is idle: during a catch-up most of what it would fetch leaves the window soon."""
        keep = self.node.config.keep_checkpoints
        while True:
            await self._tip_moved.wait()
            self._tip_moved.clear()
            while not (self.sync.in_flight or self.sync.arrived or self.sync.adding
                       or self.sync.best_height() > self.store.height):
                needs = [need for need in await self.node.on_chain_thread(
                    retention.missing, self.store, self.node.artifacts, keep,
                    retention.MISSING_LIMIT + len(self._unobtainable))
                    if need not in self._unobtainable][:retention.MISSING_LIMIT]
                if not needs:
                    break
                results = await asyncio.gather(
                    *(self.fetcher.fetch([need], self._holders_of(need)) for need in needs),
                    return_exceptions=True)
                for need, result in zip(needs, results, strict=True):
                    if isinstance(result, FetchFailed):
                        self._unobtainable.add(need)
                    elif isinstance(result, BaseException):
                        raise result

    def _holders_of(self, need: Need) -> list[Peer]:
        """Who may have an artifact no block is waiting for: the peers that named its id
        first, then every other peer."""
        named = [p for p in self._sources.get(need.key, ()) if p.alive]
        return named + [p for p in self.peers.values() if p.alive and p not in named]

    async def _prefetch(self, block: Block, peer: Peer) -> None:
        """Fetch the models and histories the block's proofs name, then the checkpoints
        the verifier's audits will read, while earlier blocks are being checked. The
        verifier's cheap checks do not wait for this: a block that fails them costs no
        download, and a fetch it then asks for joins the one under way."""
        needs = []
        for proof in block_proofs(block):
            needs += [Need("model", proof.model_id), Need("history", proof.ckpt_root)]
            if proof.ref_model:
                needs.append(Need("model", Hash(proof.ref_model)))
        missing = [n for n in needs if not self.fetcher.have(n)]
        # A few blocks ahead at once, lowest (first to come) first. A failure here is
        # _add_block's to meet: it asks again, and says so.
        async with self._prefetch_slots:
            with contextlib.suppress(FetchFailed):
                await self.fetcher.fetch(missing, self._sources_of(missing, peer))
                # With the histories here, the engine can name its audits' checkpoints.
                owners = [(compute_block_id(block.header), block.header.proof.ckpt_root),
                          *((compute_tx_id(tx), tx.proof.ckpt_root) for tx in block.txs
                            if isinstance(tx, ModelTx))]
                checkpoints = [need for owner, root in owners for need in
                               await asyncio.to_thread(self.node.engine.audit_needs, owner,
                                                       root)]
                await self.fetcher.fetch(checkpoints, self._sources_of(checkpoints, peer))

    async def _add_tx(self, peer: Peer, tx_id: Hash, tx: Transaction) -> None:
        if isinstance(tx, ModelTx):
            self._note_sources([tx.proof], peer)
        for _ in range(3):  # model and history, then checkpoints; one spare
            try:
                await self.node.submit_transaction(tx)
            except MissingArtifact as missing:
                if await self._fetch_missing(missing, peer, None, f"tx {tx_id.hex()}"):
                    continue
                return
            except FraudFound as fraud:
                self._rejected_txs.add(tx_id)
                self.broadcast(_notice(fraud))
            except ConsensusError as e:
                log.debug("tx %s from %r refused: %s", tx_id.hex(), peer, e)
                if (e.reason == "bad-mtx-prev" and isinstance(tx, ModelTx)
                        and self.store.get_entry(tx.prev_id) is None):
                    self._wait_for_block(tx.prev_id, peer, tx_id, tx)  # an orphan, for now
                elif e.reason not in NOT_COMMITTED and e.reason != "txn-already-in-mempool":
                    self._rejected_txs.add(tx_id)
            else:
                self._check_parked(tx_id)
            return

    # -- relay -------------------------------------------------------------------------

    def _wait_for_block(self, block_id: Hash, peer: Peer, tx_id: Hash,
                        tx: Transaction) -> None:
        waiting = self._waiting_txs.setdefault(block_id, [])
        if len(waiting) < WAITING_PER_BLOCK:
            waiting.append((peer, tx_id, tx))
        if len(self._waiting_txs) > WAITING_BLOCKS:
            self._waiting_txs.popitem(last=False)

    def announce_block(self, block_id: Hash) -> None:
        """Tell every peer that does not know it yet about a new tip; retry what waited
        for the blocks now here (state-dependent refusals may not hold any more)."""
        self._tip_moved.set()
        self._rejected_txs = KnownSet(self._rejected_txs.capacity)
        for waited in [i for i in self._waiting_txs if self.store.get_entry(i) is not None]:
            for peer, tx_id, tx in self._waiting_txs.pop(waited):
                if peer.alive and tx_id not in self._tx_adding:
                    self._start_add_tx(peer, tx_id, tx)
        item = InvItem(INV_BLOCK, block_id)
        for peer in self.peers.values():
            if block_id not in peer.known_blocks:
                peer.known_blocks.add(block_id)
                peer.send(Inv((item,)))
        if self._local_txs and time.monotonic() - self._resent >= RESEND_EVERY:
            self._resend_local_txs()

    def _resend_local_txs(self) -> None:
        """Announce our own pooled transactions again, to every peer: one that refused
        them on its old tip (a bounty its branch could not pay) may take them on this."""
        for tx_id in [i for i in self._local_txs if self.store.tx_block(i) is not None]:
            del self._local_txs[tx_id]  # mined
        # Not dropped when missing from the pool: a lookup can meet the pool half rebuilt.
        items = tuple(item for tx_id, item in self._local_txs.items()
                      if self.node.mempool.get(tx_id) is not None)
        if items:
            self._resent = time.monotonic()
            for peer in self.peers.values():
                peer.send(Inv(items))

    def announce_tx(self, tx_id: Hash, tx: Transaction, *, local: bool = False) -> None:
        """Tell every peer that does not know it yet about a new pooled transaction;
        a `local` one (submitted here) is announced again on new tips until mined."""
        item = InvItem(INV_MTX if isinstance(tx, ModelTx) else INV_TX, tx_id)
        if local:
            self._local_txs[tx_id] = item
            if len(self._local_txs) > LOCAL_TXS:
                self._local_txs.popitem(last=False)
        for peer in self.peers.values():
            if tx_id not in peer.known_txs:
                peer.known_txs.add(tx_id)
                peer.send(Inv((item,)))

    def broadcast(self, notice: FraudNotice) -> None:
        """Tell every peer about a forged interval; they fetch its two checkpoints from
        us (we hold them: we audited them)."""
        self._seen_proofs.add((notice.owner_id, notice.index))
        self.stats.fraud_proofs += 1
        for peer in self.peers.values():
            peer.send(notice)

    def _check_parked(self, owner_id: Hash) -> None:
        """A block or mtx just came in: check a fraud notice that arrived before it."""
        parked = self._parked.pop(owner_id, None)
        if parked is not None and parked[1].alive:
            notice, peer = parked
            self._seen_proofs.add((notice.owner_id, notice.index))
            self._spawn(self._check_fraud(peer, notice))

    async def _check_fraud(self, peer: Peer, notice: FraudNotice) -> None:
        """Fetch the accused interval's checkpoints from the accuser and replay it; if the
        proof holds, the node drops the convicted and we pass the notice on. An accuser
        that cannot serve its evidence, or whose interval replays well within delta,
        misbehaved; one whose interval replays near delta (another device's rounding
        could explain it) did not, and nothing changes."""
        for _ in range(2):  # the leaf list and both checkpoints arrive in one round
            try:
                verdict = await self.node.apply_fraud_proof(notice.owner_id, notice.index)
                break
            except MissingArtifact as missing:
                try:
                    await self.fetcher.fetch(missing.needs,
                                             self._sources_of(missing.needs, peer))
                except FetchFailed as e:
                    log.info("fraud notice from %r not backed: %s", peer, e)
                    if peer.alive:
                        self.punish(peer, "fraud-proof-unbacked")
                    return
        else:
            return
        if verdict is None:  # about a block or mtx not here (yet): checked when it comes
            self._seen_proofs.discard((notice.owner_id, notice.index))
            self._parked[notice.owner_id] = notice, peer
            if len(self._parked) > PARKED_PROOFS:
                self._parked.popitem(last=False)
        elif verdict is Verdict.REFUTED:
            self.punish(peer, "bad-fraud-proof")
        elif verdict is Verdict.INCONCLUSIVE:
            log.info("fraud notice from %r about %s: interval %d replays near delta; "
                     "not acted on", peer, notice.owner_id.hex(), notice.index)
        else:
            log.warning("fraud proof from %r holds: dropped %s", peer, notice.owner_id.hex())
            self.sync.reject(notice.owner_id, convicted=True)
            self._rejected_txs.add(notice.owner_id)
            self.broadcast(notice)


def _notice(fraud: FraudFound) -> FraudNotice:
    return FraudNotice(fraud.proof.owner_id, fraud.proof.start.leaf.index)


def _prepare_quietly(engine: DPoDLEngine, task: Task) -> None:
    with contextlib.suppress(Exception):  # the check meets the same error and says so
        engine.prepare(task)
