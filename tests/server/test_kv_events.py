"""KV-cache events over ZeroMQ in vLLM's wire format, from a running `loramux serve` (issue 12,
point 6; S5.5). A plain pyzmq SUB socket and msgpack decode what vLLM-aware routers decode."""

from __future__ import annotations

import time

import msgpack
import openai
import pytest
import zmq

from tests.server.conftest import free_port, start_server

PROMPT = [11, 42, 99, 7, 300, 12, 5, 77, 21, 13, 8, 400]  # three full pages of 4
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@pytest.fixture(scope="module")
def served(tiny_models, adapter_dirs, tmp_path_factory):
    allowed, _ = adapter_dirs
    pub, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    args = [
        str(tiny_models["llama"].path),
        "--served-model-name",
        "base",
        "--gpu-memory-utilization",  # vLLM's flag, on CPU a fraction of the available memory (issue 16)
        "0.002",
        "--page-size",
        "4",
        "--device",
        "cpu",
        "--allowed-lora-dirs",
        str(allowed),
        "--lora-modules",
        f"a={allowed / 'r1_qv'}",
        f"b={allowed / 'r8_all'}",
        "--enable-kv-events",
        "--kv-events-endpoint",
        pub,
        "--kv-events-replay-endpoint",
        replay,
        "--kv-events-topic",
        "kv",
    ]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield server, pub, replay
    server.stop()


def _batches(sock, want, timeout=30.0):
    """(seq, events) batches from a SUB socket until `want(all events so far)` or the timeout."""
    got, events, deadline = [], [], time.time() + timeout
    while time.time() < deadline and not want(events):
        if sock.poll(200):
            topic, seq, payload = sock.recv_multipart()
            assert topic == b"kv"
            ts, batch, rank = msgpack.unpackb(payload)
            assert isinstance(ts, float) and rank == 0
            got.append((int.from_bytes(seq, "big"), batch))
            events += batch
    return got, events


def _stored(events, lora):
    return [e for e in events if e["type"] == "BlockStored" and e["lora_name"] == lora]


def test_stored_and_removed_events_with_per_namespace_hashes(served):
    server, pub, replay = served
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    time.sleep(0.5)  # let the subscription reach the publisher before anything is sent
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    for model in ("base", "a", "b"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
    salted = {"cache_salt": "tenant-9"}  # b again, in a namespace of its own
    client.completions.create(model="b", prompt=PROMPT, max_tokens=2, temperature=0, extra_body=salted)
    seen, events = _batches(
        sub, lambda ev: all(len(_stored(ev, n)) >= 3 for n in (None, "a")) and len(_stored(ev, "b")) >= 6
    )
    b_salted = _stored(events, "b")[3:6]  # named by its adapter, chained from a seed of its own
    assert [e["token_ids"] for e in b_salted] == [PROMPT[0:4], PROMPT[4:8], PROMPT[8:12]]
    assert not {e["block_hashes"][0] for e in b_salted} & {
        e["block_hashes"][0] for e in _stored(events, "b")[:3]
    }
    first_pages = {}
    for lora in (None, "a", "b"):
        chain = _stored(events, lora)[:3]
        assert [e["token_ids"] for e in chain] == [PROMPT[0:4], PROMPT[4:8], PROMPT[8:12]]
        assert all(
            e["block_size"] == 4 and e["medium"] == "GPU" and len(e["block_hashes"]) == 1 for e in chain
        )
        assert chain[0]["parent_block_hash"] is None
        assert [e["parent_block_hash"] for e in chain[1:]] == [e["block_hashes"][0] for e in chain[:2]]
        first_pages[lora] = [e["block_hashes"][0] for e in chain]
    # S5.5: the same tokens under different adapters never share a hash
    hashes = [h for hs in first_pages.values() for h in hs]
    assert len(set(hashes)) == len(hashes)
    assert [s for s, _ in seen] == list(range(seen[0][0], seen[0][0] + len(seen)))  # no gap

    # unloading `a` drops its namespace's idle pages: removals of exactly its stored hashes
    a_hashes = {e["block_hashes"][0] for e in _stored(events, "a")}
    r = client.post("/unload_lora_adapter", body={"lora_name": "a"}, cast_to=object)
    assert r is not None
    _, later = _batches(
        sub, lambda ev: {h for e in ev if e["type"] == "BlockRemoved" for h in e["block_hashes"]} >= a_hashes
    )
    removed = {h for e in later if e["type"] == "BlockRemoved" for h in e["block_hashes"]}
    assert removed == a_hashes and all(e["medium"] == "GPU" for e in later if e["type"] == "BlockRemoved")

    # replay from the first sequence number gives the same batches again, then the end marker
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(replay)
    dealer.send_multipart((b"", (0).to_bytes(8, "big")))
    replayed = []
    deadline = time.time() + 30
    while time.time() < deadline:
        assert dealer.poll(5000), "no replay answer"
        _, topic, seq, payload = dealer.recv_multipart()
        assert topic in (b"kv", b"")
        if seq == END_SEQ:
            break
        replayed.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload)[1]))
    assert replayed[: len(seen)] == seen and len(replayed) >= len(seen) + 1
    sub.close(linger=0)
    dealer.close(linger=0)
    m = server.metrics()
    assert m['loramux_kv_events_total{outcome="dropped"}'] == 0  # a subscriber that keeps up loses nothing
    assert m['loramux_kv_events_total{outcome="published"}'] >= len(events) + len(later)


def test_a_full_queue_drops_and_counts_instead_of_blocking_the_engine():
    from loramux.config import KVEventsConfig
    from loramux.core.prefix_cache import KVEvent
    from loramux.engine.kv_events import KVEventPublisher

    pub = KVEventPublisher(KVEventsConfig(endpoint="tcp://127.0.0.1:0", max_queue_size=1), page_size=4)
    pub.close()  # the sending thread is gone: nothing drains the queue any more
    batch = [KVEvent("stored", 1, None, (1, 2, 3, 4), "base"), KVEvent("removed", 1, None, (), "base")]
    t0 = time.perf_counter()
    for _ in range(3):
        pub.publish(batch)  # the first fills the queue of one batch; the others are dropped
    assert time.perf_counter() - t0 < 1.0  # never blocks
    assert pub.num_dropped == 2 * len(batch)


def test_kv_event_flags_and_vllm_json_form_reach_the_engine_config():
    import argparse
    import json

    from loramux.config import KVEventsConfig
    from loramux.server.serve_args import add_serve_args, engine_config

    def parse(*extra):
        p = argparse.ArgumentParser()
        add_serve_args(p)
        return engine_config(p.parse_args(["m", *extra]), "m").kv_events

    assert parse() is None
    assert parse("--enable-kv-events", "--kv-events-topic", "t") == KVEventsConfig(topic="t")
    vllm = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://127.0.0.1:6000", "hwm": 9}
    assert parse("--kv-events-config", json.dumps(vllm)) == KVEventsConfig(endpoint="tcp://127.0.0.1:6000")
    assert parse("--kv-events-config", json.dumps({**vllm, "publisher": "null"})) is None
    with pytest.raises(SystemExit, match="unknown keys"):
        parse("--kv-events-config", json.dumps({**vllm, "tpoic": "x"}))
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        parse("--enable-kv-events", "--kv-events-endpoint", "127.0.0.1:5557")


# --- issue 24, point 7 ----------------------------------------------------------------------------
def test_S5_5_a_page_moved_to_host_memory_is_removed_from_gpu_and_stored_on_cpu_and_back():
    """vLLM's offloading reports a tier change as BlockRemoved on the old medium and BlockStored on
    the new one; a router that saw only the first store would count the page on the device."""
    from loramux.engine.kv_events import encode_event
    from tests.core.test_prefix_cache import finish_one, push_to_host
    from tests.utils import fake_for, make_request, make_scheduler, step

    s = make_scheduler(num_pages=8, page_size=4, adapters=("a",), host_pages=16, events=True)
    ex = fake_for(s)
    prompt = list(range(1, 14))  # three full pages
    finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a"))
    stored = [e for e in s.kv.cache.take_events() if e.kind == "stored" and "lora:a" in e.namespace]
    assert len(stored) == 3 and not any(e.on_host for e in stored)
    push_to_host(s, ex)
    moved = [encode_event(e, 4) for e in s.kv.cache.take_events() if "lora:a" in e.namespace]
    for e in stored:  # each of a's pages: removed from the GPU, stored on the CPU, same hash and chain
        h = e.block_hash
        assert {"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU"} in moved
        on_cpu = [m for m in moved if m["type"] == "BlockStored" and m["block_hashes"] == [h]]
        assert len(on_cpu) == 1 and on_cpu[0]["medium"] == "CPU", on_cpu
        assert on_cpu[0]["parent_block_hash"] == e.parent_block_hash and on_cpu[0]["token_ids"] == list(
            e.token_ids
        )
    s.add_request(make_request(prompt, max_tokens=2, lora="a"))
    step(s, ex)  # the hit brings them back to the device
    back = [encode_event(e, 4) for e in s.kv.cache.take_events() if "lora:a" in e.namespace]
    for e in stored:
        h = e.block_hash
        assert {"type": "BlockRemoved", "block_hashes": [h], "medium": "CPU"} in back
        assert any(
            m["type"] == "BlockStored" and m["block_hashes"] == [h] and m["medium"] == "GPU" for m in back
        )


class _FlakySocket:
    """A PUB socket whose sends fail (or crawl) on demand; everything else is the real socket's."""

    def __init__(self, real, fail_on: set[int], delay: float = 0.0) -> None:
        self.real, self.fail_on, self.delay, self.sends = real, fail_on, delay, 0

    def send_multipart(self, frames):
        self.sends += 1
        time.sleep(self.delay)
        if self.sends in self.fail_on:
            raise zmq.ZMQError(zmq.EAGAIN, "injected transport error")
        return self.real.send_multipart(frames)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_S5_5_the_sender_survives_a_transport_error_and_counts_it():
    from loramux.config import KVEventsConfig
    from loramux.core.prefix_cache import KVEvent
    from loramux.engine.kv_events import KVEventPublisher

    pub = KVEventPublisher(KVEventsConfig(endpoint="tcp://127.0.0.1:0"), page_size=4)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    time.sleep(0.3)  # let the subscription reach the publisher
    pub._pub = _FlakySocket(pub._pub, fail_on={2})
    try:
        for i in range(4):
            pub.publish([KVEvent("stored", i, None, (i, i, i, i), "base")])
        seqs = []
        deadline = time.time() + 10
        while len(seqs) < 3 and time.time() < deadline:
            if sub.poll(200):
                seqs.append(int.from_bytes(sub.recv_multipart()[1], "big"))
        assert seqs == [0, 2, 3]  # batch 1 was lost to the transport; the ones after it were not
        while pub.num_published < 3 and time.time() < deadline:
            time.sleep(0.01)  # counted right after the send returns
        assert pub.num_send_errors == 1 and pub.num_published == 3
        assert pub._thread.is_alive()
    finally:
        sub.close(linger=0)
        pub.close()


def test_S5_5_close_waits_for_the_sender_before_closing_its_sockets():
    from loramux.config import KVEventsConfig
    from loramux.core.prefix_cache import KVEvent
    from loramux.engine.kv_events import KVEventPublisher

    pub = KVEventPublisher(KVEventsConfig(endpoint="tcp://127.0.0.1:0"), page_size=4)
    flaky = pub._pub = _FlakySocket(pub._pub, fail_on=set(), delay=0.3)
    for i in range(10):  # 3 s of sending queued
        pub.publish([KVEvent("stored", i, None, (i, i, i, i), "base")])
    time.sleep(0.1)
    pub.close(timeout=0.5)
    assert not pub._thread.is_alive()  # it stopped before the sockets were closed under it
    assert pub.num_send_errors == 0 and flaky.sends < 10
