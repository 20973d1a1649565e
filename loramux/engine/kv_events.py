"""KV-cache events over ZeroMQ, in vLLM's wire format, for KV-aware routers (S5.5).

Boundary: takes the prefix cache's events once per engine step and publishes
them; knows nothing of the cache itself. A step's events go out as one
`KVEventBatch`, the way vLLM's `ZmqEventPublisher` sends them, so routers
written for vLLM (llm-d's KV-cache manager, Dynamo, vLLM's own examples)
consume loramux unchanged:

- PUB socket, one multipart message per batch: (topic, sequence number as 8
  bytes big-endian, msgpack payload);
- payload: `[timestamp, [event, ...], data_parallel_rank]` (msgspec's array
  form of `KVEventBatch`); each event a map tagged by `"type"`:
  `BlockStored` {block_hashes, parent_block_hash, token_ids, block_size,
  lora_id, medium, lora_name} and `BlockRemoved` {block_hashes, medium} (the
  cache is never cleared at once, so `AllBlocksCleared` is never sent);
- optional ROUTER replay socket: a client sends a start sequence number (8
  bytes big-endian) and gets every buffered batch from there, as
  (b"", topic, seq, payload) frames, then an end marker (b"", b"", -1, b"").

Block hashes are loramux's per-namespace chain (a page's hash chains from its
parent's, and a namespace's first page from `lora:<name>:<content digest>`),
so two adapters, or two versions of one, never share a hash. Device pages
are reported with medium "GPU" (vLLM's name for the serving tier, also on a
CPU device), host-tier pages with "CPU": a page offloaded to host memory is a
`BlockRemoved` on "GPU" and a `BlockStored` on "CPU" (and the reverse when it
comes back), as vLLM's offloading reports it. The engine thread never blocks
on the network: batches wait in a bounded queue for the sending thread, and
when a subscriber cannot keep up and the queue is full, the batch is dropped
and counted (`num_dropped`). A transport error is logged and counted
(`num_send_errors`) and the thread goes on with the next batch; `close` lets
it finish what is queued and waits for it before closing the sockets.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any

from loramux.config import KVEventsConfig
from loramux.core.prefix_cache import KVEvent

logger = logging.getLogger("loramux.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
MEDIUM_DEVICE = "GPU"
MEDIUM_HOST = "CPU"


def encode_event(e: KVEvent, page_size: int) -> dict[str, Any]:
    """One cache event as vLLM's tagged-map form."""
    if e.kind == "stored":
        return {
            "type": "BlockStored",
            "block_hashes": [e.block_hash],
            "parent_block_hash": e.parent_block_hash,
            "token_ids": list(e.token_ids),
            "block_size": page_size,
            "lora_id": None,
            "medium": MEDIUM_HOST if e.on_host else MEDIUM_DEVICE,
            "lora_name": _lora_name(e.namespace),
        }
    if e.kind == "removed":
        medium = MEDIUM_HOST if e.on_host else MEDIUM_DEVICE
        return {"type": "BlockRemoved", "block_hashes": [e.block_hash], "medium": medium}
    raise ValueError(f"unknown KV event kind {e.kind!r}")


def _lora_name(identity: str) -> str | None:
    """`lora:<name>:<version>` (and a salted `...#salt:<digest>`) -> name; the base model -> None."""
    identity = identity.split("#salt:", 1)[0]
    if identity.startswith("lora:"):
        return identity[5:].rsplit(":", 1)[0]
    return None


class KVEventPublisher:
    """Publishes one batch per step on a ZeroMQ PUB socket, from a thread of its own."""

    def __init__(self, config: KVEventsConfig, page_size: int) -> None:
        import msgpack
        import zmq

        self.config = config
        self.page_size = page_size
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.bind(config.endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port for tcp://...:0
        self._replay = None
        self.replay_endpoint: str | None = None
        if config.replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.SNDHWM, 2 * (config.buffer_steps + 1))
            self._replay.bind(config.replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = config.topic.encode()
        self._queue: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=config.buffer_steps)
        self._seq = 0
        self.num_published = 0  # events
        self.num_dropped = 0  # events dropped because the queue was full
        self.num_send_errors = 0  # batches (or replay requests) the transport failed; the thread went on
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loramux-kv-events", daemon=True)
        self._thread.start()

    def publish(self, events: list[KVEvent]) -> None:
        """Queue one step's events as a batch; never blocks (a full queue drops and counts them)."""
        if not events:
            return
        batch = [encode_event(e, self.page_size) for e in events]
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.num_dropped += len(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most `timeout` seconds), stop the thread, close the sockets.
        The sockets are closed only once the thread that uses them has ended."""
        try:
            self._queue.put(None, timeout=1)  # behind whatever is still queued
        except queue.Full:
            logger.warning("KV events: %d batches still queued at shutdown", self._queue.qsize())
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():  # stuck behind a full queue: stop after the batch in hand
            self._closing.set()
            self._thread.join()
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                if self._replay is not None and self._replay.poll(0):
                    self._serve_replay()
                try:
                    batch = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if batch is None:
                    return
                self._send(batch)
            except Exception:  # a transport error: this batch is lost, the next ones are not
                self.num_send_errors += 1
                logger.exception("KV events: sending failed (%d so far); going on", self.num_send_errors)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        payload = self._pack([time.time(), batch, 0])
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))  # a batch the transport lost can still be replayed
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        self.num_published += len(batch)

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            logger.warning("KV events replay: malformed request of %d frames", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
