"""Per-request page tables over the page pool and the prefix cache (S4, S5.3).

Boundary: the only owner of the page pool and the prefix cache. The scheduler
asks it how much of a request's prompt is cached, whether pages for N more
tokens can be had, to allocate and to give a request's pages back, to open and
close an adapter's namespace, and for the step's host copies and the cache's
events; it never touches the pool or the cache itself. Every prefix-cache
insert and match goes through here and always uses the request's own
namespace (its adapter uid).

Page-table arithmetic for one request (page_size = 4 in the drawing):

    token_ids:  | p p p p | p p p p | p p o o | o .
    computed:   |<------- num_computed ----->|
    full pages: |<-- inserted -->|<- full ->|       offered to the tree in update
    page_ids:   [   7    ,   2    ,   9    ,  4  ]  4 holds the partial page
"""

from __future__ import annotations

from typing import NamedTuple

from loramux.core.page_pool import PagePool
from loramux.core.prefix_cache import (
    KVCopy,
    KVEvent,
    MatchResult,
    NullPrefixCache,
    PrefixCache,
    RadixPrefixCache,
)
from loramux.core.request import Request


class PrefixHit(NamedTuple):
    pages: list[int]  # cached device pages
    host: list[object]  # then cached pages in host memory, brought back on admission
    num_tokens: int


class KVStats(NamedTuple):
    pages_total: int
    pages_free: int
    pages_cached: int  # idle pages only the prefix cache holds (evictable)
    prefix_caching: bool
    prefix_query_tokens: int
    prefix_hit_tokens: int
    offloaded: int  # pages moved to host memory
    onloaded: int  # pages brought back from it


class KVCacheManager:
    def __init__(self, pool: PagePool, prefix_cache: PrefixCache, keep_idle_pages: int | None = None) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.cache = prefix_cache
        # With memory committed as it is first used (CPU): idle cached pages beyond this many are
        # reused before a never-used page is touched, so memory follows the running load. None:
        # every free page is used before any cached one is evicted (memory is paid for anyway).
        self.keep_idle_pages = keep_idle_pages
        self._cursors: dict[str, object] = {}
        # Counters for metrics (S5.1): tokens asked for and tokens found at admission.
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    @classmethod
    def create(
        cls,
        num_pages: int,
        page_size: int,
        enable_prefix_caching: bool,
        enable_kv_events: bool = False,
        host_pages: int = 0,
        keep_idle_pages: int | None = None,
    ) -> KVCacheManager:
        """A pool of `num_pages` device pages; with prefix caching, `host_pages` more in host memory."""
        pool = PagePool(num_pages, page_size)
        cache: PrefixCache = NullPrefixCache(pool)
        if enable_prefix_caching:
            host = PagePool(host_pages, page_size) if host_pages > 0 else None
            cache = RadixPrefixCache(pool, enable_events=enable_kv_events, host_pool=host)
        return cls(pool, cache, keep_idle_pages)

    # --- admission ---
    def match(self, req: Request) -> PrefixHit:
        """Cached full pages of `req`'s known tokens, leaving at least one token to compute."""
        assert not req.page_ids, f"{req!r} already holds pages"
        max_pages = 0 if req.full_prefill else (req.num_tokens - 1) // self.page_size
        if req.lora_start:  # activated LoRA: only the pages before its start are the base model's
            max_pages = min(max_pages, req.lora_start // self.page_size)
        hit = self.cache.match(req.cache_uid, req.token_ids, max_pages)
        self._cursors[req.request_id] = hit.cursor
        return PrefixHit(hit.pages, hit.host, (len(hit.pages) + len(hit.host)) * self.page_size)

    def undo_match(self, req: Request, hit: PrefixHit) -> None:
        """Give back a match whose request was not admitted after all."""
        self.cache.unmatch(req.cache_uid, MatchResult(hit.pages, hit.host, None))
        self._cursors.pop(req.request_id, None)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.pool.num_free + self.cache.num_evictable

    @property
    def num_allocatable(self) -> int:
        """Pages an allocation could get now: free ones and idle cached ones (evicted on demand)."""
        return self.pool.num_free + self.cache.num_evictable

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return self.pool.pages_for(num_tokens)

    def count_prefix_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        """A request's first admission: how much of its prompt the cache held (S5.1 metrics)."""
        self.num_prefix_query_tokens += prompt_tokens
        self.num_prefix_hit_tokens += hit_tokens

    # --- namespaces, copies, events (the prefix cache's, through here) ---
    def open_namespace(self, ns: int | None, identity: str) -> None:
        self.cache.open_namespace(ns, identity)

    def close_namespace(self, ns: int | None) -> None:
        self.cache.close_namespace(ns)

    def take_copies(self) -> list[KVCopy]:
        return self.cache.take_copies()

    def take_events(self) -> list[KVEvent]:
        return self.cache.take_events()

    def allocate(self, req: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Give `req` pages for `num_new_tokens` more tokens; False (nothing changed) if impossible.

        With `hit`, the request is being admitted: its cached pages start its table
        and its computed count jumps past them.
        """
        base = len(hit.pages) if hit else len(req.page_ids)
        computed = hit.num_tokens if hit else req.num_computed_tokens
        need = self.pool.pages_for(computed + num_new_tokens) - base
        if need > 0:
            short = need - self.pool.num_free
            if short > 0:
                if short > self.cache.num_evictable:
                    return False
                self.cache.evict(short)
            elif self.keep_idle_pages is not None:
                self._reuse_idle(need)
            new = self.pool.allocate(need)
            assert new is not None, f"pool promised {need} pages"
        else:
            new = []
        if hit is not None:
            if hit.host:  # cached pages in host memory come back onto the first new device pages
                self.cache.onload(hit.host, new[: len(hit.host)])
            req.page_ids = (*hit.pages, *new)
            req.num_computed_tokens = hit.num_tokens
            req.num_inserted_pages = len(hit.pages) + len(hit.host)
        elif new:
            req.page_ids += tuple(new)
        return True

    def _reuse_idle(self, need: int) -> None:
        """Evict idle cached pages beyond `keep_idle_pages` rather than touch never-used ones."""
        fresh = need - self.pool.num_recycled_free
        spare = self.cache.num_evictable - self.keep_idle_pages  # type: ignore[operator]
        if fresh > 0 and spare > 0:
            self.cache.evict(min(fresh, spare))

    # --- after a step ---
    def cache_computed(self, req: Request) -> None:
        """Offer `req`'s newly full, computed pages to the prefix cache, in its namespace."""
        full = req.num_computed_tokens // self.page_size
        if req.lora_start:  # activated LoRA: pages from its start on are its own, never shared
            full = min(full, req.lora_start // self.page_size)
        if full <= req.num_inserted_pages:
            return
        rid = req.request_id
        res = self.cache.insert(
            req.cache_uid,
            self._cursors.get(rid),
            req.token_ids,
            req.page_ids,
            req.num_inserted_pages,
            full,
        )
        self._cursors[rid] = res.cursor
        if res.adopted:
            pages = list(req.page_ids)
            for index, page in res.adopted:
                self.pool.decref([pages[index]])
                pages[index] = page
            req.page_ids = tuple(pages)
        req.num_inserted_pages = full

    def free(self, req: Request) -> None:
        """Release all of `req`'s pages (finish, abort or preemption)."""
        self.cache.release(req.cache_uid, req.page_ids)
        req.page_ids = ()
        req.num_inserted_pages = 0
        self._cursors.pop(req.request_id, None)

    def stats(self) -> KVStats:
        cache = self.cache
        return KVStats(
            self.pool.num_pages,
            self.pool.num_free,
            cache.num_evictable,
            isinstance(cache, RadixPrefixCache),
            self.num_prefix_query_tokens,
            self.num_prefix_hit_tokens,
            getattr(cache, "num_offloaded", 0),
            getattr(cache, "num_onloaded", 0),
        )

    # --- checks ---
    def check_integrity(self, live: list[Request]) -> None:
        """Every page count equals its holders: live requests' tables plus the tree."""
        expected: dict[int, int] = {}
        for req in live:
            assert len(set(req.page_ids)) == len(req.page_ids), f"{req!r} holds a page twice"
            for p in req.page_ids:
                expected[p] = expected.get(p, 0) + 1
        tree = set(self.cache.held_pages())
        for p in tree:
            expected[p] = expected.get(p, 0) + 1
        self.pool.check_integrity(expected)
        for req in live:  # pages a request may still write to belong to it alone
            for p in req.page_ids[req.num_inserted_pages :]:
                assert p not in tree and expected[p] == 1, f"{req!r} writes to shared page {p}"
        self.cache.check_integrity()
