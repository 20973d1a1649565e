"""Property tests: random workloads through the real scheduler and the checking fake executor.

Random arrivals, skewed adapter popularity, shared prefixes, page pools small
enough to force preemption, adapter unloads (and reloads) while requests run,
aborts, stop strings (requests ended from outside after some output), a
prefill budget, host capacity equal to the device slots, a pinned adapter
under a byte budget. After every step: the adapter cap holds (S2.1), no seat, token or
page was left free while admissible work waited (work-conserving, S2.4), no
page is owned twice and every allocator passes `check_integrity()` (S4), the
fake executor found every request's KV in its own namespace (S5.2, S5.3). At the end: every request
finished within a bound (S2.4), produced the tokens a no-paging reference
produces, every page is back in the pool and every adapter count is zero.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramux.core.adapters import AdapterNotFoundError
from loramux.core.policies import POLICIES
from loramux.core.request import Request, RequestStatus
from tests.utils import FakeClock, fake_for, make_scheduler

PREFIXES = [[7] * 9, [3, 1, 4, 1, 5, 9, 2, 6], []]


@st.composite
def workloads(draw):
    n_adapters = draw(st.integers(1, 5))
    weights = [1.0 / (i + 1) ** draw(st.sampled_from([0.0, 1.0, 2.0])) for i in range(n_adapters)]
    reqs = []
    for i in range(draw(st.integers(1, 30))):
        prefix = PREFIXES[draw(st.integers(0, 2))]
        tail = draw(st.lists(st.integers(1, 60), min_size=1, max_size=14))
        pick = draw(st.floats(0, 1)) * sum(weights)
        adapter = f"ad{len(weights) - 1}"
        for k, wk in enumerate(weights):  # skewed popularity: weight 1/(k+1)^s
            pick -= wk
            if pick <= 0:
                adapter = f"ad{k}"
                break
        if draw(st.integers(0, 4)) == 0:
            adapter = None  # some base-model requests
        reqs.append(
            dict(
                rid=f"q{i}",
                prompt=prefix + tail,
                max_tokens=draw(st.integers(1, 10)),
                adapter=adapter,
                arrival=draw(st.integers(0, 25)),
                eos=draw(st.booleans()),
                salt=draw(st.sampled_from([None, None, "t1", "t2"])),  # vLLM's cache_salt
                full=draw(st.integers(0, 5)) == 0,  # prompt logprobs: every prompt token computed
                priority=draw(st.sampled_from([0, 0, -1, 2])),  # vLLM's (ordering under `priority`)
            )
        )
    page_size = draw(st.sampled_from([1, 2, 4]))
    longest = max(len(r["prompt"]) + r["max_tokens"] for r in reqs)
    min_pages = -(-longest // page_size)
    return dict(
        n_adapters=n_adapters,
        reqs=reqs,
        page_size=page_size,
        num_pages=draw(st.integers(min_pages, min_pages * 3)),
        max_loras=draw(st.integers(1, 3)),
        max_num_seqs=draw(st.integers(1, 6)),
        budget=draw(st.integers(4, 40)),
        policy=draw(st.sampled_from(sorted(POLICIES))),
        prefix=draw(st.booleans()),
        host_pages=draw(st.sampled_from([0, 0, 2, 8])),
        unloads=draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, n_adapters - 1)), max_size=3)),
        aborts=draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 29)), max_size=3)),
        # a stop string seen by the detokenizer ends a request from outside, as the engine does
        stop_strings=draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 29)), max_size=3)),
        max_prefill=draw(st.sampled_from([None, None, 3, 8])),
        host_equals_slots=draw(st.booleans()),
        pin_first=draw(st.booleans()),  # ad0 pinned, under a byte budget that fits one more adapter
    )


TIMEOUT = 8


EXAMPLES = int(os.environ.get("LORAMUX_HYPOTHESIS_EXAMPLES", "800"))  # raise it for a long soak


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_S2_S4_S5_random_workloads_keep_every_invariant(w):
    clock = FakeClock()
    pin = w["pin_first"] and w["max_loras"] > 1
    s = make_scheduler(
        max_cpu_loras=w["max_loras"] if w["host_equals_slots"] else None,
        max_lora_bytes=2000 if pin else None,
        num_pages=w["num_pages"],
        page_size=w["page_size"],
        max_loras=w["max_loras"],
        max_num_seqs=w["max_num_seqs"],
        max_num_batched_tokens=w["budget"],
        max_prefill_tokens=w["max_prefill"],
        policy=w["policy"],
        prefix=w["prefix"],
        host_pages=w["host_pages"],
        clock=clock,
        starvation_timeout_s=TIMEOUT,
    )
    for k in range(w["n_adapters"]):
        s.register_adapter(f"ad{k}", version="v1", rank=8, nbytes=1000, pinned=pin and k == 0)
    ex = fake_for(s, vocab_size=31, eos_every=7)
    pending = sorted(w["reqs"], key=lambda r: r["arrival"])
    unloads = {}
    for at, k in w["unloads"]:
        unloads.setdefault(at, []).append(f"ad{k}")
    aborts = {}
    for at, i in w["aborts"]:
        aborts.setdefault(at, []).append(f"q{i}")
    aborted: set[str] = set()
    stops = {}
    for at, i in w["stop_strings"]:
        stops.setdefault(at, []).append(f"q{i}")
    stopped: set[str] = set()
    added: list[Request] = []
    version = 1
    work = sum(len(r["prompt"]) + r["max_tokens"] for r in w["reqs"])
    for t in range(10 * work + 200):
        for name in unloads.get(t, []):
            if name in s.adapters:
                s.unregister_adapter(name)
        while pending and pending[0]["arrival"] <= t:
            spec = pending.pop(0)
            req = Request(
                spec["rid"],
                spec["prompt"],
                spec["max_tokens"],
                lora_name=spec["adapter"],
                arrival_time=clock.t,
                ignore_eos=not spec["eos"],
                eos_token_ids=frozenset({0}),
                cache_salt=spec["salt"],
                full_prefill=spec["full"],
                priority=spec["priority"],
            )
            try:
                s.add_request(req)
            except AdapterNotFoundError:  # unloaded: load a new version under the same name
                version += 1
                s.register_adapter(spec["adapter"], version=f"v{version}", rank=8, nbytes=1000)
                s.add_request(req)
            added.append(req)
        for rid in aborts.get(t, []):
            if s.abort_request(rid):
                aborted.add(rid)
        for rid in stops.get(t, []):
            req = s.requests.get(rid)
            if (
                req is not None
                and req.num_output_tokens
                and s.finish_request(rid, RequestStatus.FINISHED_STOPPED)
            ):
                stopped.add(rid)
        if not pending and not s.has_unfinished():
            break
        out = s.schedule()
        s.check_work_conserving(out)
        assert len(out.adapter_uids) <= w["max_loras"]
        if s.has_unfinished() and not out.seqs:
            # Progress: with work queued, a step only comes out empty if nothing can ever run.
            raise AssertionError(f"empty step with {len(s.requests)} unfinished requests")
        s.update_from_output(out, ex.execute(out))
        s.check_integrity()
        clock.advance()
    assert not pending and not s.has_unfinished(), "requests left unfinished"

    total_work = 0
    everything = sum(r.max_total_tokens for r in added)
    for req in sorted(added, key=lambda r: r.arrival_seq):
        total_work += req.max_total_tokens
        if w["policy"] == "priority":  # later arrivals of a better priority go first (as in vLLM)
            total_work = everything
        if req.request_id in aborted:
            assert req.status is RequestStatus.FINISHED_ABORTED
            continue
        if req.request_id in stopped:  # its tokens so far are a prefix of the reference
            assert req.status is RequestStatus.FINISHED_STOPPED
            want = ex.reference_tokens(req.adapter_uid, req.prompt_token_ids, req.max_tokens, set())
            assert req.output_token_ids == want[: req.num_output_tokens], req
            continue
        assert req.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        if req.full_prefill:  # never served from cached pages (its own pages are cached for others)
            assert req.num_cached_tokens == 0, req
        want = ex.reference_tokens(
            req.adapter_uid, req.prompt_token_ids, req.max_tokens, set() if req.ignore_eos else {0}
        )
        assert req.output_token_ids == want, req
        # Bound: the cap can add at most the timeout plus the work queued up to this request (under
        # `priority`, all the work: every request arrives within the first steps here).
        assert req.finished_time - req.arrival_time <= TIMEOUT + 4 * total_work + 10, req

    s.kv.cache.evict(s.kv.pool.num_pages)
    assert s.kv.pool.num_free == s.kv.pool.num_pages  # every page is back
    s.schedule()  # flush the last plan (releases of unloaded adapters)
    for name in s.adapters.names():
        info = s.adapters.get(name)
        assert info.num_requests == 0 and info.num_running == 0
    s.check_integrity()
