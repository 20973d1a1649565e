"""Adapter registry and residency: sizes, tiers, LRU, pins, refcounts, plans (S1.2, S2.5, S2.6)."""

import pytest

from loramux.core.adapters import AdapterManager, AdapterNotFoundError, lora_nbytes
from tests.utils import make_request, make_scheduler


def mgr(max_loras=2, max_cpu_loras=3, max_lora_rank=64, max_device_bytes=None):
    return AdapterManager(max_loras, max_cpu_loras, max_lora_rank, max_device_bytes)


def test_S2_6_adapter_bytes_follow_rank_shapes_layers_and_dtype():
    # q and v of a 2-layer model with hidden 64 and kv width 32, rank 8:
    shapes = [(64, 64), (64, 32)] * 2
    assert lora_nbytes(8, shapes, "float32") == 8 * (128 + 96) * 2 * 4
    assert lora_nbytes(8, shapes, "bfloat16") == lora_nbytes(8, shapes, "float32") // 2
    assert lora_nbytes(16, shapes) == 2 * lora_nbytes(8, shapes)
    with pytest.raises(ValueError, match="int4"):
        lora_nbytes(8, shapes, "int4")


def test_S1_2_unknown_adapter_fails_at_once_naming_it_and_base_always_passes():
    s = make_scheduler(adapters=("sql",))
    with pytest.raises(AdapterNotFoundError, match=r"'nope'.*sql"):
        s.add_request(make_request(lora="nope"))
    assert not s.has_unfinished()
    s.add_request(make_request(lora=None))
    s.add_request(make_request(lora="sql"))
    assert s.num_waiting == 2


def test_S2_6_device_and_host_tiers_are_bounded_and_lru():
    m = mgr(max_loras=2, max_cpu_loras=3)
    a, b, c, d = (m.register(n, "v", 8, 100) for n in "abcd")
    assert m.acquire(a) == 0 and m.acquire(b) == 1
    plan = m.take_plan()
    assert plan.load_host == [a.uid, b.uid] and plan.load_device == [(a.uid, 0), (b.uid, 1)]
    assert m.acquire(c) == 0  # a is least recently used and idle
    plan = m.take_plan()
    assert plan.evict_device == [(a.uid, 0)] and plan.load_device == [(c.uid, 0)]
    assert plan.evict_host == [] and a.on_host  # a stays in host memory (3 host slots)
    m.acquire(b)  # touch b: now c is the LRU on the device
    assert m.acquire(d) == 0
    plan = m.take_plan()
    assert plan.evict_device == [(c.uid, 0)]
    assert plan.evict_host == [a.uid]  # host full (b, c, d): its LRU host-only entry goes
    assert m.acquire(a) == 1  # b (slot 1) is now the least recently used on the device
    plan = m.take_plan()
    assert plan.evict_device == [(b.uid, 1)] and plan.load_host == [a.uid]  # a comes back from disk
    assert len(m.resident_uids) == 2 and len(m.host_uids) == 3
    m.check_integrity()


def test_S2_5_adapters_in_use_are_never_evicted():
    m = mgr(max_loras=1)
    a, b = m.register("a", "v", 8, 100), m.register("b", "v", 8, 100)
    m.add_request(a)
    m.acquire(a)
    m.start_running(a)
    assert m.acquire(b) is None  # the only slot is busy: defer, do not evict
    assert m.take_plan().evict_device == []
    m.stop_running(a)
    assert m.acquire(b) == 0
    m.check_integrity()


def test_S6_3_a_load_in_place_replaces_the_name_at_once_and_the_old_load_serves_its_requests():
    """vLLM's load_inplace: the name moves to the new load at once; the old one keeps its slot and
    weights for the request it has and goes with that request."""
    m = mgr()
    a = m.register("a", "v1", 8, 100)
    m.add_request(a)
    m.acquire(a)
    m.start_running(a)
    m.take_plan()
    new = m.register("a", "v2", 4, 50, replace=True)
    assert m.get("a") is new and new.uid != a.uid and new.version == "v2"
    assert a.unloading and a.slot is not None and not new.unloading
    m.add_request(new)  # a later request gets the new load
    m.stop_running(a)
    m.finish_request(a)
    assert m.take_plan().release == [a.uid] and a.slot is None
    assert m.references() == {"a": 1}  # only the new load's request is left
    m.finish_request(new)
    m.check_integrity()


def test_a_load_in_place_that_fails_a_check_leaves_the_old_load_serving():
    m = mgr(max_lora_rank=16, max_device_bytes=1000)
    a = m.register("a", "v1", 8, 100)
    for rank, nbytes, match in [(32, 100, "--max-lora-rank 32"), (8, 5000, "more than the device budget")]:
        with pytest.raises(ValueError, match=match):
            m.register("a", "v2", rank, nbytes, replace=True)
        assert m.get("a") is a and not a.unloading
    with pytest.raises(ValueError, match=r"already loaded.*load_inplace"):
        m.register("a", "v2", 8, 100)  # without replace: refused, naming the fix
    assert m.register("b", "v", 8, 100, replace=True).name == "b"  # nothing to replace: a plain load
    m.check_integrity()


def test_a_pinned_adapter_is_replaced_by_a_pinned_load_at_the_pin_and_byte_limits_when_it_is_idle():
    """The old pin's slot and bytes count for the new load only while a request still holds them."""
    m = mgr(max_loras=2, max_device_bytes=450)  # one pin at most: one slot stays free for the others
    p = m.register("p", "v1", 8, 200, pinned=True)
    m.register("other", "v", 8, 200)
    m.add_request(p)
    with pytest.raises(ValueError, match="one must stay free"):  # the old pin stays for its request
        m.register("p", "v2", 8, 200, pinned=True, replace=True)
    assert m.get("p") is p and not p.unloading
    m.finish_request(p)
    new = m.register("p", "v2", 8, 200, pinned=True, replace=True)  # 200 + 200 + 200 bytes would not fit
    assert m.get("p") is new and m.num_pinned == 1
    m.check_integrity()


def test_S2_5_pinned_adapters_stay_resident():
    m = mgr(max_loras=2)
    p = m.register("p", "v", 8, 100, pinned=True)
    a, b = m.register("a", "v", 8, 100), m.register("b", "v", 8, 100)
    m.acquire(p)
    m.acquire(a)
    m.acquire(b)  # evicts a, never p
    assert p.slot is not None and a.slot is None and b.slot is not None
    with pytest.raises(ValueError, match="one must stay free"):
        m.register("q", "v", 8, 100, pinned=True)


def test_S2_6_byte_budget_evicts_as_many_as_needed_or_refuses():
    m = mgr(max_loras=3, max_cpu_loras=3, max_device_bytes=300)
    a, b, big = m.register("a", "v", 8, 100), m.register("b", "v", 8, 100), m.register("big", "v", 8, 250)
    m.acquire(a)
    m.acquire(b)
    m.add_request(a)
    m.start_running(a)
    assert m.acquire(big) is None  # would need a's bytes too, and a is busy
    assert b.slot is not None  # nothing was evicted for a refused load
    m.stop_running(a)
    assert m.acquire(big) is not None
    assert a.slot is None and b.slot is None
    with pytest.raises(ValueError, match="device budget"):
        m.register("huge", "v", 8, 301)
    m.check_integrity()


def test_rank_above_max_lora_rank_is_refused_with_the_fix():
    m = mgr(max_lora_rank=16)
    with pytest.raises(ValueError, match=r"rank 32.*--max-lora-rank 32"):
        m.register("a", "v", 32, 100)


def test_unregister_while_requests_remain_keeps_weights_until_the_last():
    m = mgr()
    a = m.register("a", "v", 8, 100)
    m.add_request(a)
    m.acquire(a)
    m.start_running(a)
    m.take_plan()
    m.unregister("a")
    assert "a" not in m and a.slot is not None
    with pytest.raises(AdapterNotFoundError):
        m.get("a")
    again = m.register("a", "v2", 8, 100)  # the name is free to load again at once
    assert again.uid != a.uid
    m.stop_running(a)
    m.finish_request(a)
    assert m.take_plan().release == [a.uid] and a.slot is None
    m.check_integrity()


def test_config_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="max_cpu_loras=1 < max_loras=2"):
        AdapterManager(2, 1, 16)
    with pytest.raises(ValueError, match="already loaded"):
        m = mgr()
        m.register("a", "v", 8, 1)
        m.register("a", "v", 8, 1)


def test_S2_6_waiting_requests_adapters_are_prefetched_into_host_memory():
    s = make_scheduler(num_pages=64, adapters=("a", "b"), max_loras=1, max_cpu_loras=4)
    from tests.utils import fake_for, step

    ex = fake_for(s)
    s.add_request(make_request(4, max_tokens=6, lora="a"))
    out = step(s, ex)
    a, b = s.adapters.get("a"), s.adapters.get("b")
    assert out.adapter_plan.load_device == [(a.uid, 0)]
    rb = make_request(4, max_tokens=2, lora="b")
    s.add_request(rb)
    out = step(s, ex)  # b cannot run yet (a holds the only slot), but its weights start loading
    assert rb.status.name == "WAITING" and out.adapter_plan.load_host == [b.uid] and b.on_host
    while rb.status.name == "WAITING":
        out = step(s, ex)
    assert out.adapter_plan.load_device == [(b.uid, 0)] and out.adapter_plan.load_host == []  # no disk wait


def test_a_host_load_planned_this_step_is_cancelled_not_evicted_after():
    m = mgr(max_loras=1, max_cpu_loras=2)
    a, b, c = (m.register(n, "v", 8, 100) for n in "abc")
    m.acquire(a)
    m.take_plan()
    m.prefetch(b)
    m.prefetch(c)  # host full (a on device, b): b's read has not happened yet, so it is dropped
    plan = m.take_plan()
    assert plan.load_host == [c.uid] and plan.evict_host == []
    assert not b.on_host and c.on_host
    m.check_integrity()
