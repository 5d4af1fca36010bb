"""One connection to a peer after its handshake: sending, receiving, what it knows.

Sending never blocks the caller: frames go into the peer's queue and one writer task
drains it, so a slow peer slows only itself. The queue is bounded in bytes; a peer that
does not read what we owe it is disconnected (`send-queue-full`) rather than let it
hold our memory, as Bitcoin Core does with its send buffer.

What a peer has announced or been sent is remembered in bounded sets (`known_blocks`,
`known_txs`), so the relay never announces an item to a peer twice, nor back to the
peer it came from.
"""

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Hashable

from consensus.params import ChainParams
from p2p.addrman import Address
from p2p.framing import encode_frame, read_frame
from p2p.messages import Message, Version, decode_payload, encode_payload, max_payload

_ids = itertools.count(1)


class KnownSet:
    """A set that forgets its oldest members beyond `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, item: Hashable) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def discard(self, item: Hashable) -> None:
        self._items.pop(item, None)

    def __len__(self) -> int:
        return len(self._items)


class RateLimit:
    """A token bucket: `rate` tokens a second, holding at most `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self._at = time.monotonic()

    def take(self, n: float = 1.0, now: float | None = None) -> bool:
        """Spend `n` tokens if there are that many; False (nothing spent) if not."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class Peer:
    """A connected, handshaken peer. `close(reason)` ends it; `closed` is set once the
    socket is gone."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 params: ChainParams, addr: Address, inbound: bool, version: Version,
                 send_queue_bytes: int, known_capacity: int = 50_000) -> None:
        self.id = next(_ids)
        self.params, self.addr, self.inbound, self.version = params, addr, inbound, version
        self._reader, self._writer = reader, writer
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._send_queue_bytes = send_queue_bytes
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()  # set each time the socket has taken what we wrote
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.connected_at = time.time()
        self.last_send = self.last_recv = 0.0
        self.bytes_sent = self.bytes_recv = 0
        self.last_size = 0  # the payload bytes of the last message received
        self.best_height = version.best_height
        self.known_blocks = KnownSet(known_capacity)
        self.known_txs = KnownSet(known_capacity)
        self.ping_nonce: int | None = None
        self.ping_sent = 0.0
        self.ping_time: float | None = None  # seconds, of the last answered ping
        self.sent_addr = False  # answered its getaddr already
        self.listen_addr: Address | None = None  # where it accepts connections, if anywhere
        self.dialled: Address | None = None  # what we dialled (maybe a name), if outbound
        self.manual = False  # dialled because the operator named it (--peer, addnode)
        self.inv_limit = RateLimit(rate=1000.0, burst=5000.0)  # inv items
        self.addr_limit = RateLimit(rate=0.1, burst=1000.0)  # addresses (Bitcoin Core's)
        self.tx_requests = 0  # transactions asked of it and not yet answered
        self.serving = 0  # its chunk requests being answered
        self.block_requests: deque[bytes] = deque()  # blocks it asked for, not yet sent
        self.sending_blocks = False  # a task is sending them
        self.checking_fraud = False  # one of its fraud proofs is being checked
        self._writer_task = asyncio.ensure_future(self._drain())
        # Set when the writer is done, even if it was cancelled before it ever ran.
        self._writer_task.add_done_callback(lambda _: self.closed.set())

    def __repr__(self) -> str:
        return f"peer={self.id} {self.addr[0]}:{self.addr[1]}"

    @property
    def alive(self) -> bool:
        return self.close_reason is None

    def send(self, msg: Message) -> None:
        """Queue `msg`; a peer owed more than the queue's bound is disconnected."""
        self.send_raw(*encode_payload(msg))

    def send_raw(self, kind: int, payload: bytes) -> None:
        """Queue a payload already encoded (a stored block's bytes, say)."""
        if not self.alive:
            return
        frame = encode_frame(self.params.magic, kind, payload)
        if self._queued + len(frame) > self._send_queue_bytes:
            self.close("send-queue-full")
            return
        self._queue.append(frame)
        self._queued += len(frame)
        self._wakeup.set()

    async def room(self, size: int) -> None:
        """Wait until `size` more bytes fit within the send queue's bound, counting what
        the socket has not taken yet; or until the socket has caught up (so one message
        bigger than the bound still goes). For answers that can be paced, such as the
        blocks of a getdata."""
        transport = self._writer.transport
        while self.alive:
            buffered = self._queued + transport.get_write_buffer_size()
            if (buffered + size <= self._send_queue_bytes
                    or buffered <= transport.get_write_buffer_limits()[1]):
                return
            self._drained.clear()
            await self._drained.wait()

    async def receive(self, timeout: float) -> Message:
        """The next message; FrameError (ProtocolError included) or ConnectionClosed."""
        kind, payload = await read_frame(
            self._reader, self.params.magic, timeout=timeout,
            max_payload=lambda kind: max_payload(self.params, kind))
        self.last_recv = time.time()
        self.last_size = len(payload)
        self.bytes_recv += len(payload) + 9
        return decode_payload(kind, payload)

    def close(self, reason: str) -> None:
        """Drop the connection at once (what is still queued is not sent); the first
        reason given is kept."""
        if self.close_reason is None:
            self.close_reason = reason
            self._queue.clear()
            self._writer.transport.abort()
            self._writer_task.cancel()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def _drain(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._queue:
                    frame = self._queue.popleft()
                    self._queued -= len(frame)
                    self._writer.write(frame)
                    self.bytes_sent += len(frame)
                    self.last_send = time.time()
                await self._writer.drain()
                self._drained.set()
        except (ConnectionError, OSError):
            self.close_reason = self.close_reason or "connection-lost"
        except asyncio.CancelledError:
            pass
        finally:
            self._writer.transport.abort()
            self._drained.set()  # nobody waits for room on a closed connection
