"""The KV page pool: fixed-size pages handed out by id, with reference counts (S4).

Boundary: this module knows page ids and counts only. It does not know which
request or prefix-cache node holds a page; holders call `incref`/`decref`.
A page is free exactly when its count is zero, and a free page sits in the
free list exactly once, so no page can be handed out twice. The free list is a
stack: the page freed last is handed out first, so a pool larger than the load
keeps touching the same pages (on CPU the pool's memory is committed page by
page as it is first written, so the process's memory follows use).
"""

from __future__ import annotations


class PagePool:
    """`num_pages` pages of `page_size` tokens each."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages}; the KV pool needs at least one page")
        if page_size < 1:
            raise ValueError(f"page_size={page_size}; it must be at least 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() gives page 0 first
        self._ref = [0] * num_pages
        self._touched = 0  # pages ever handed out: ids below this (fresh ones come out in order)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_touched(self) -> int:
        """Pages handed out at least once (on CPU: the pool's memory committed so far)."""
        return self._touched

    @property
    def num_recycled_free(self) -> int:
        """Free pages that were used before (they sit above the never-used ones in the stack)."""
        return len(self._free) - (self.num_pages - self._touched)

    def refcount(self, page: int) -> int:
        return self._ref[page]

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` free pages (count 1 each), or None if fewer than `n` are free."""
        if n > len(self._free):
            return None
        free, ref = self._free, self._ref
        pages = [free.pop() for _ in range(n)]
        for p in pages:
            ref[p] = 1
        if pages and pages[-1] >= self._touched:  # fresh pages come last, in increasing order
            self._touched = pages[-1] + 1
        return pages

    def incref(self, pages: list[int]) -> None:
        ref = self._ref
        for p in pages:
            assert ref[p] > 0, f"incref of free page {p}"
            ref[p] += 1

    def decref(self, pages: list[int]) -> None:
        """Drop one reference from each page; pages that reach zero go back to the pool."""
        ref, free = self._ref, self._free
        for p in pages:
            assert ref[p] > 0, f"decref of free page {p} (double free)"
            ref[p] -= 1
            if ref[p] == 0:
                free.append(p)

    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """Free list and counts agree; with `expected_refs`, every count equals its holders."""
        free = self._free
        assert len(set(free)) == len(free), "a page sits twice in the free list"
        for p in free:
            assert self._ref[p] == 0, f"page {p} is in the free list with count {self._ref[p]}"
        in_use = sum(1 for r in self._ref if r > 0)
        assert in_use + len(free) == self.num_pages, (
            f"{in_use} pages in use + {len(free)} free != {self.num_pages}"
        )
        if expected_refs is not None:
            for p in range(self.num_pages):
                want = expected_refs.get(p, 0)
                assert self._ref[p] == want, f"page {p}: count {self._ref[p]}, holders {want}"
