"""Memory that follows the load: where the pool is committed as it is first used (CPU), idle
prefix-cache pages beyond `keep_idle_pages` are reused before a never-used page is touched
(issue 15, point 3; S4.1, S5.6)."""

from __future__ import annotations

from tests.utils import fake_for, make_request, make_scheduler, run

PS = 4


def serve_unique_prompts(keep_idle: int | None, n: int = 30):
    s = make_scheduler(num_pages=200, page_size=PS)
    s.kv.keep_idle_pages = keep_idle
    ex = fake_for(s)
    for i in range(n):  # one at a time, each prompt its own: 3 full pages + 1 output token
        s.add_request(make_request([1000 * (i + 1) + t for t in range(12)], max_tokens=1))
        run(s, ex)
    return s, ex


def test_idle_cached_pages_beyond_the_floor_are_reused_before_new_memory():
    s, _ = serve_unique_prompts(keep_idle=6)
    assert s.kv.pool.num_touched <= 6 + 4  # the floor plus one request's pages
    assert s.kv.cache.num_evictable >= 6 - 3  # the cache still holds recent prefixes
    s.kv.check_integrity([])


def test_without_the_floor_every_free_page_is_used_before_a_cached_one_is_evicted():
    s, _ = serve_unique_prompts(keep_idle=None)
    assert s.kv.pool.num_touched >= 30 * 3  # every prompt's pages stay cached (GPU: memory is paid)


def test_the_most_recent_prefixes_still_hit_with_the_floor():
    s, ex = serve_unique_prompts(keep_idle=6)
    again = make_request([1000 * 30 + t for t in range(12)] + [7], max_tokens=1)  # the last prompt
    s.add_request(again)
    run(s, ex)
    assert again.num_cached_tokens == 12


def test_touched_pages_count_the_high_water_of_the_pool():
    from loramux.core.page_pool import PagePool

    pool = PagePool(10, 4)
    a = pool.allocate(3)
    pool.decref(a)
    assert pool.num_touched == 3 and pool.num_recycled_free == 3
    b = pool.allocate(5)  # three recycled, then two fresh
    assert sorted(b) == [0, 1, 2, 3, 4] and pool.num_touched == 5 and pool.num_recycled_free == 0
