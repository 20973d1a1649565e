"""Prefix cache namespaced per adapter: reuse, isolation, unload, events, LRU (S5.1-S5.6)."""

import pytest

from loramux.core.page_pool import PagePool
from loramux.core.prefix_cache import RadixPrefixCache, chain_hash, namespace_seed
from loramux.core.request import RequestStatus
from tests.utils import fake_for, make_request, make_scheduler, run, step

PS = 4  # page size used throughout


def finish_one(s, ex, req):
    s.add_request(req)
    run(s, ex)
    assert req.status.is_finished
    return req


# --- S5.1 reuse ---------------------------------------------------------------------------


def test_S5_1_shared_prompt_prefix_reuses_pages():
    s = make_scheduler(num_pages=32, page_size=PS)
    ex = fake_for(s)
    a = finish_one(s, ex, make_request(list(range(1, 13)), max_tokens=1))  # 12 tokens = 3 pages
    b = make_request(list(range(1, 9)) + [50, 51, 52], max_tokens=2)  # shares the first 2 pages
    s.add_request(b)
    out = step(s, ex)
    assert b.num_cached_tokens == 8
    assert out.seqs[0].start_pos == 8 and out.seqs[0].token_ids == [50, 51, 52]
    assert a.num_cached_tokens == 0
    run(s, ex)
    assert b.output_token_ids == ex.reference_tokens(None, b.prompt_token_ids, 2, set())


def test_S5_1_a_full_hit_still_computes_the_last_token():
    s = make_scheduler(num_pages=32, page_size=PS)
    ex = fake_for(s)
    finish_one(s, ex, make_request(8, max_tokens=1))
    again = make_request(8, max_tokens=1)
    s.add_request(again)
    out = step(s, ex)
    assert again.num_cached_tokens == 4  # page 2 holds the last token, which must be recomputed
    assert out.seqs[0].token_ids == [5, 6, 7, 8]


# --- S5.2 isolation -----------------------------------------------------------------------


def test_S5_2_same_tokens_under_different_adapters_never_share_pages():
    s = make_scheduler(num_pages=64, page_size=PS, adapters=("a", "b"))
    ex = fake_for(s)
    prompt = list(range(1, 14))
    first = finish_one(s, ex, make_request(prompt, max_tokens=2, lora="a"))
    for lora in ("b", None):  # another adapter, and the base model
        other = finish_one(s, ex, make_request(prompt, max_tokens=2, lora=lora))
        assert other.num_cached_tokens == 0  # a miss reports zero, never negative
        assert other.output_token_ids == ex.reference_tokens(other.adapter_uid, prompt, 2, set())
    same = finish_one(s, ex, make_request(prompt, max_tokens=2, lora="a"))
    assert same.num_cached_tokens == 12
    assert same.output_token_ids == first.output_token_ids


def test_S5_2_base_first_then_adapter_misses_too():
    s = make_scheduler(num_pages=64, page_size=PS, adapters=("a",))
    ex = fake_for(s)
    prompt = list(range(1, 10))
    finish_one(s, ex, make_request(prompt, max_tokens=1))
    on_a = finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a"))
    assert on_a.num_cached_tokens == 0
    again_base = finish_one(s, ex, make_request(prompt, max_tokens=1))
    assert again_base.num_cached_tokens == 8  # exactly the two full pages; no namespace marker counted


def test_S5_2_reloaded_adapter_gets_a_new_namespace():
    s = make_scheduler(num_pages=64, page_size=PS, adapters=("a",))
    ex = fake_for(s)
    prompt = list(range(1, 14))
    finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a"))
    s.unregister_adapter("a")
    s.register_adapter("a", version="v2", rank=8, nbytes=1000)
    after = finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a"))
    assert after.num_cached_tokens == 0  # stale KV of the first load is never reused


# --- S5.3 every insert and match in the request's own namespace ---------------------------


def test_S5_3_later_prefill_chunks_are_cached_in_own_namespace():
    s = make_scheduler(num_pages=64, page_size=PS, adapters=("a", "b"), max_num_batched_tokens=4)
    ex = fake_for(s)
    prompt = list(range(1, 18))  # 17 tokens: chunks of 4
    r = make_request(prompt, max_tokens=1, lora="a")
    s.add_request(r)
    outs = run(s, ex)
    assert [len(o.seqs[0].token_ids) for o in outs] == [4, 4, 4, 4, 1]
    assert finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a")).num_cached_tokens == 16
    assert finish_one(s, ex, make_request(prompt, max_tokens=1, lora="b")).num_cached_tokens == 0


def test_S5_3_decode_tokens_fill_pages_in_own_namespace():
    s = make_scheduler(num_pages=64, page_size=PS, adapters=("a", "b"))
    ex = fake_for(s)
    r = finish_one(s, ex, make_request(list(range(1, 5)), max_tokens=9, lora="a"))
    history = r.token_ids  # 4 prompt + 9 generated: the KV of the first 12 was computed
    cont_a = finish_one(s, ex, make_request(history + [7], max_tokens=1, lora="a"))
    assert cont_a.num_cached_tokens == 12  # pages filled during decode were cached
    cont_b = finish_one(s, ex, make_request(history + [7], max_tokens=1, lora="b"))
    assert cont_b.num_cached_tokens == 0


def test_S5_3_reinsertion_after_preemption_stays_in_own_namespace():
    # 6 pages: two requests of 4 + 8 tokens each need 3 pages apiece at the end -> preemption.
    s = make_scheduler(num_pages=6, page_size=PS, adapters=("a", "b"))
    ex = fake_for(s)
    ra = make_request(list(range(1, 9)), max_tokens=8, lora="a")
    rb = make_request(list(range(1, 9)), max_tokens=8, lora="b")
    s.add_request(ra)
    s.add_request(rb)
    run(s, ex)  # the fake executor checks every read is from the reader's namespace
    assert ra.num_preemptions + rb.num_preemptions >= 1
    for r in (ra, rb):
        assert r.output_token_ids == ex.reference_tokens(r.adapter_uid, r.prompt_token_ids, 8, set())


def test_S5_3_preempted_request_resumes_from_its_cached_pages():
    s = make_scheduler(num_pages=7, page_size=PS, adapters=("a",))
    ex = fake_for(s)
    old = make_request(list(range(1, 9)), max_tokens=12, lora="a")
    young = make_request(list(range(30, 38)), max_tokens=12, lora="a")
    s.add_request(old)
    s.add_request(young)
    seen_resume = []
    while s.has_unfinished():
        out = step(s, ex)
        for seq in out.seqs:
            if seq.request_id == young.request_id and young.num_preemptions and not seen_resume:
                seen_resume.append(seq.start_pos)
    assert young.num_preemptions >= 1
    assert seen_resume and seen_resume[0] >= PS  # it did not recompute from zero
    assert young.output_token_ids == ex.reference_tokens(young.adapter_uid, young.prompt_token_ids, 12, set())


# --- S5.4 unload frees the namespace ------------------------------------------------------


def test_S5_4_unload_frees_idle_pages_at_once():
    s = make_scheduler(num_pages=32, page_size=PS, adapters=("a",))
    ex = fake_for(s)
    finish_one(s, ex, make_request(list(range(1, 14)), max_tokens=1, lora="a"))
    cache = s.kv.cache
    assert cache.pages_in(s.adapters.get("a").uid) == 3
    free_before = s.kv.pool.num_free
    uid = s.unregister_adapter("a").uid
    assert s.kv.pool.num_free == free_before + 3
    assert uid not in cache.namespaces()
    s.check_integrity()


def test_S5_4_pages_in_use_are_freed_when_their_request_finishes():
    s = make_scheduler(num_pages=32, page_size=PS, adapters=("a",))
    ex = fake_for(s)
    finish_one(s, ex, make_request(list(range(1, 14)), max_tokens=1, lora="a"))  # 3 idle pages
    user = make_request(list(range(1, 9)) + [99], max_tokens=6, lora="a")  # reuses 2 of them
    s.add_request(user)
    step(s, ex)
    assert user.num_cached_tokens == 8
    uid = s.unregister_adapter("a").uid
    cache = s.kv.cache
    assert cache.pages_in(uid) == 2  # the idle third page went; the two in use stay
    assert uid in cache.namespaces()
    run(s, ex)
    assert user.status is RequestStatus.FINISHED_LENGTH  # it finished normally
    assert cache.pages_in(uid) == 0 and uid not in cache.namespaces()
    assert s.kv.pool.num_free == 32  # nothing dangling; integrity checked after every step


def test_S5_4_unloaded_adapter_name_is_refused_but_queued_work_finishes():
    s = make_scheduler(num_pages=32, page_size=PS, adapters=("a",), max_num_seqs=1)
    ex = fake_for(s)
    r1, r2 = make_request(8, lora="a"), make_request(8, lora="a")
    s.add_request(r1)
    s.add_request(r2)
    step(s, ex)
    s.unregister_adapter("a")
    run(s, ex)
    assert r1.status is r2.status is RequestStatus.FINISHED_LENGTH
    assert s.adapters.resident_uids == []  # the weights went after its last request


# --- S5.2 cache salts (vLLM's cache_salt) ---------------------------------------------------


def test_S5_2_a_cache_salt_shares_pages_only_with_the_same_adapter_and_salt():
    """Same tokens, same adapter: a request finds the pages of an earlier one only when their
    salts agree; no salt is a salt of its own. Outputs are the unsalted ones (nothing else
    changes), and every step passes the page-count integrity check."""
    s = make_scheduler(num_pages=64, page_size=PS, adapters=("a",))
    ex = fake_for(s)
    prompt = list(range(1, 14))  # 3 full pages, the last token recomputed
    first = finish_one(s, ex, make_request(prompt, max_tokens=2, lora="a", cache_salt="t1"))
    for salt, lora in ((None, "a"), ("t2", "a"), ("t1", None)):
        other = finish_one(s, ex, make_request(prompt, max_tokens=2, lora=lora, cache_salt=salt))
        assert other.num_cached_tokens == 0, (salt, lora)
    same = finish_one(s, ex, make_request(prompt, max_tokens=2, lora="a", cache_salt="t1"))
    assert same.num_cached_tokens == 12 and same.output_token_ids == first.output_token_ids
    assert same.output_token_ids == ex.reference_tokens(same.adapter_uid, prompt, 2, set())


def test_S5_4_salted_namespaces_go_with_their_adapter_and_when_they_empty():
    """Salts are per tenant, so there may be many: a salted namespace is dropped once its last
    page is evicted (nothing left behind per salt), and all of them when the adapter unloads."""
    s = make_scheduler(num_pages=64, page_size=PS, adapters=("a",))
    ex = fake_for(s)
    uid = s.adapters.get("a").uid
    for salt in ("t1", "t2"):
        finish_one(s, ex, make_request(list(range(1, 10)), max_tokens=1, lora="a", cache_salt=salt))
    cache = s.kv.cache
    assert {(uid, "t1"), (uid, "t2")} <= set(cache.namespaces())
    assert cache.pages_in((uid, "t1")) == 2
    cache.evict(cache.num_evictable)
    assert not any(isinstance(ns, tuple) for ns in cache.namespaces()) and uid in cache.namespaces()
    finish_one(s, ex, make_request(list(range(1, 10)), max_tokens=1, lora="a", cache_salt="t1"))
    assert cache.pages_in((uid, "t1")) == 2  # opened anew
    s.unregister_adapter("a")
    assert not [ns for ns in cache.namespaces() if ns == uid or (isinstance(ns, tuple) and ns[0] == uid)]
    s.check_integrity()


def test_S5_5_a_salted_namespace_chains_its_own_hashes_and_never_names_its_salt():
    s = make_scheduler(num_pages=32, page_size=PS, adapters=("a",), events=True)
    ex = fake_for(s)
    prompt = list(range(1, 10))
    finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a"))
    finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a", cache_salt="secret-tenant"))
    stored = [e for e in s.kv.cache.take_events() if e.kind == "stored"]
    plain = s.adapters.get("a").identity
    salted = [e for e in stored if e.namespace != plain]
    assert len(salted) == 2 and salted[0].namespace.startswith(plain + "#salt:")
    assert "secret-tenant" not in salted[0].namespace
    assert not {e.block_hash for e in salted} & {e.block_hash for e in stored if e.namespace == plain}
    assert salted[0].block_hash == chain_hash(namespace_seed(salted[0].namespace), (1, 2, 3, 4))


def test_a_cache_salt_must_be_a_non_empty_string():
    with pytest.raises(ValueError, match="cache_salt=''; give a non-empty string"):
        make_request(8, cache_salt="")


# --- S5.5 KV events -------------------------------------------------------------------------


def test_S5_5_events_chain_from_the_namespace():
    s = make_scheduler(num_pages=32, page_size=PS, adapters=("a", "b"), events=True)
    ex = fake_for(s)
    prompt = list(range(1, 10))
    finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a"))
    finish_one(s, ex, make_request(prompt, max_tokens=1, lora="b"))
    events = s.kv.cache.take_events()
    stored = [e for e in events if e.kind == "stored"]
    by_ns: dict[str, list] = {}
    for e in stored:
        by_ns.setdefault(e.namespace, []).append(e)
    ns_a, ns_b = (s.adapters.get(n).identity for n in "ab")
    assert [e.token_ids for e in by_ns[ns_a]] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    first, second = by_ns[ns_a]
    assert first.parent_block_hash is None
    assert first.block_hash == chain_hash(namespace_seed(ns_a), (1, 2, 3, 4))
    assert second.parent_block_hash == first.block_hash
    assert second.block_hash == chain_hash(first.block_hash, (5, 6, 7, 8))
    hashes_a = {e.block_hash for e in by_ns[ns_a]}
    hashes_b = {e.block_hash for e in by_ns[ns_b]}
    assert len(hashes_b) == 2 and not hashes_a & hashes_b  # same tokens, different adapters


def test_S5_5_evicting_a_namespace_publishes_a_removal_per_block():
    s = make_scheduler(num_pages=32, page_size=PS, adapters=("a",), events=True)
    ex = fake_for(s)
    finish_one(s, ex, make_request(list(range(1, 14)), max_tokens=1, lora="a"))
    stored = {e.block_hash for e in s.kv.cache.take_events() if e.kind == "stored"}
    s.unregister_adapter("a")
    removed = [e for e in s.kv.cache.take_events() if e.kind == "removed"]
    assert len(stored) == 3 and {e.block_hash for e in removed} == stored and len(removed) == 3


# --- S5.6 LRU eviction of idle pages --------------------------------------------------------


def test_S5_6_lru_pages_are_evicted_first_and_pages_in_use_never():
    pool = PagePool(num_pages=6, page_size=2)
    cache = RadixPrefixCache(pool)
    cache.open_namespace(None, "base")

    def fill(tokens):  # a "request" computes 2 pages, inserts them, then releases them
        pages = pool.allocate(2)
        cache.insert(None, None, tokens, pages, 0, 2)
        return pages

    old = fill([1, 2, 3, 4])
    new = fill([5, 6, 7, 8])
    cache.release(None, old)
    cache.release(None, new)
    busy = fill([9, 10, 11, 12])  # still held by its "request"
    assert cache.num_evictable == 4 and pool.num_free == 0
    assert cache.evict(2) == 2
    assert all(pool.refcount(p) == 0 for p in old)  # the least recently used went first
    assert all(pool.refcount(p) == 1 for p in new)
    assert cache.evict(10) == 2  # only the idle ones; busy pages stay
    assert all(pool.refcount(p) == 2 for p in busy)
    cache.check_integrity()


def test_S5_6_a_hit_refreshes_recency():
    pool = PagePool(num_pages=4, page_size=2)
    cache = RadixPrefixCache(pool)
    cache.open_namespace(None, "base")
    a, b = pool.allocate(1), pool.allocate(1)
    cache.insert(None, None, [1, 2], a, 0, 1)
    cache.insert(None, None, [3, 4], b, 0, 1)
    cache.release(None, a)
    cache.release(None, b)
    hit = cache.match(None, [1, 2, 9], max_pages=1)  # touch a
    assert hit.pages == a
    cache.release(None, hit.pages)
    cache.evict(1)
    assert pool.refcount(b[0]) == 0 and pool.refcount(a[0]) == 1


# --- S5.3 the host-memory tier ------------------------------------------------------------------


def push_to_host(s, ex):
    """Run base-model work big enough to need the whole device pool, evicting every idle page."""
    finish_one(s, ex, make_request(list(range(100, 125)), max_tokens=7))  # 32 tokens = 8 pages


def test_S5_3_pages_brought_back_from_host_memory_stay_in_own_namespace():
    s = make_scheduler(num_pages=8, page_size=PS, adapters=("a", "b"), host_pages=16)
    ex = fake_for(s)
    prompt = list(range(1, 14))  # three full pages
    finish_one(s, ex, make_request(prompt, max_tokens=1, lora="a"))
    uid_a = s.adapters.get("a").uid
    cache = s.kv.cache
    assert cache.pages_in(uid_a) == 3
    push_to_host(s, ex)
    assert cache.pages_in(uid_a) == 0 and cache.host_pages_in(uid_a) == 3  # offloaded, not dropped
    on_b = finish_one(s, ex, make_request(prompt, max_tokens=2, lora="b"))
    assert on_b.num_cached_tokens == 0  # host pages are namespaced too
    back = make_request(prompt, max_tokens=3, lora="a")
    s.add_request(back)
    out = step(s, ex)
    assert back.num_cached_tokens == 12
    assert sum(c.kind == "onload" for c in out.kv_copies) == 3  # copied back before the forward
    run(s, ex)  # the fake executor checked every page read holds a's own context
    assert back.output_token_ids == ex.reference_tokens(uid_a, prompt, 3, set())
    assert cache.num_onloaded == 3


def test_S5_3_host_memory_evicts_its_least_recently_used_pages():
    s = make_scheduler(num_pages=8, page_size=PS, adapters=("a",), host_pages=3, events=True)
    ex = fake_for(s)
    first = list(range(1, 14))
    finish_one(s, ex, make_request(first, max_tokens=1, lora="a"))
    push_to_host(s, ex)  # a's 3 pages now fill host memory
    a = s.adapters.get("a")
    assert s.kv.cache.host_pages_in(a.uid) == 3
    s.kv.cache.take_events()
    finish_one(s, ex, make_request(list(range(200, 213)), max_tokens=1))  # newer pages need host room
    removed = [e for e in s.kv.cache.take_events() if e.kind == "removed" and e.namespace == a.identity]
    assert len(removed) == 3 and s.kv.cache.host_pages_in(a.uid) == 0  # the oldest went for good
    again = finish_one(s, ex, make_request(first, max_tokens=1, lora="a"))
    assert again.num_cached_tokens == 0


def test_S5_3_host_pages_matched_for_admission_are_not_evicted_meanwhile():
    """Regression: a matched host node exposed as a leaf during the same admission was reused."""
    s = make_scheduler(num_pages=8, page_size=PS, adapters=("a",), host_pages=3)
    ex = fake_for(s)
    finish_one(s, ex, make_request(list(range(1, 14)), max_tokens=1, lora="a"))
    push_to_host(s, ex)
    finish_one(s, ex, make_request(list(range(200, 213)), max_tokens=1))
    again = finish_one(s, ex, make_request(list(range(100, 125)), max_tokens=7))  # matches host pages
    assert again.num_cached_tokens > 0
    assert again.output_token_ids == ex.reference_tokens(None, again.prompt_token_ids, 7, set())


def test_S5_4_unloading_an_adapter_drops_its_host_pages_too():
    s = make_scheduler(num_pages=8, page_size=PS, adapters=("a",), host_pages=8)
    ex = fake_for(s)
    finish_one(s, ex, make_request(list(range(1, 14)), max_tokens=1, lora="a"))
    push_to_host(s, ex)
    uid = s.unregister_adapter("a").uid
    assert s.kv.cache.host_pages_in(uid) == 0 and uid not in s.kv.cache.namespaces()
    assert s.kv.cache.host_pool.num_free == 8 - s.kv.cache.host_pages_in(None)
    s.check_integrity()
