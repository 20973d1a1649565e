"""Prefix cache: a radix tree of full KV pages, one namespace per adapter load (S5).

Boundary: the tree maps (namespace, page-sized token chunks) to page ids and
mediates every reference-count change on the pages it holds. It does not know
requests or adapters; callers pass a namespace id (the adapter uid, None for
the base model) and the identity string the KV-event hash chain starts from.

Layout: each namespace has its own root, so a lookup can never cross from one
adapter (or adapter version) to another. Each node below a root is one full
page whose key is the tuple of that page's tokens:

    root(ns) ── (t0..t15) ── (t16..t31) ── ...
                          └─ (u16..u31)

The cache holds one reference on every page in the tree; a page whose count is
1 is idle (cache-only) and can be evicted. Running requests hold a root-side
path of the tree, so an idle node's whole subtree is idle and leaves are
evicted first, least recently used first (S5.6).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from loramux.core.page_pool import PagePool

Namespace = int | None  # adapter uid; None is the base model


@dataclass(frozen=True, slots=True)
class KVEvent:
    """A change to the cache that an external KV-aware router can follow (S5.5)."""

    kind: str  # "stored" or "removed"
    block_hash: int
    parent_block_hash: int | None  # None for the first page of a namespace
    token_ids: tuple[int, ...]  # empty for "removed"
    namespace: str  # the namespace's identity, e.g. "base" or "lora:sql:<version>"


class MatchResult(NamedTuple):
    pages: list[int]  # cached pages, now referenced by the caller
    cursor: object  # where a later insert for the same request continues


class InsertResult(NamedTuple):
    cursor: object
    adopted: list[tuple[int, int]]  # (index in the page table, tree page that replaces it)


def namespace_seed(identity: str) -> int:
    """The hash a namespace's chain starts from: distinct identities give distinct chains."""
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "little")


def chain_hash(parent: int, tokens: tuple[int, ...]) -> int:
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    return int.from_bytes(h.digest(), "little")


class PrefixCache(ABC):
    """What the KV manager needs from a prefix cache. `NullPrefixCache` caches nothing."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool

    @abstractmethod
    def open_namespace(self, ns: Namespace, identity: str) -> None: ...

    @abstractmethod
    def close_namespace(self, ns: Namespace) -> None:
        """Free the namespace's idle pages now and the rest when their users release them."""

    @abstractmethod
    def match(self, ns: Namespace, token_ids: list[int], max_pages: int) -> MatchResult:
        """Longest cached run of full pages (at most `max_pages`) in `ns`; referenced for the caller."""

    @abstractmethod
    def insert(
        self,
        ns: Namespace,
        cursor: object,
        token_ids: list[int],
        page_ids: list[int],
        start: int,
        end: int,
    ) -> InsertResult:
        """Offer the caller's full pages `page_ids[start:end]` (holding `token_ids`) to the tree."""

    @abstractmethod
    def release(self, ns: Namespace, page_ids: list[int]) -> None:
        """The caller drops its references on `page_ids`."""

    @abstractmethod
    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` idle pages, least recently used first; return how many."""

    @property
    @abstractmethod
    def num_evictable(self) -> int: ...

    def take_events(self) -> list[KVEvent]:
        return []

    def held_pages(self) -> list[int]:
        """Pages the cache holds a reference on (for integrity checks)."""
        return []

    def check_integrity(self) -> None:
        return None


class NullPrefixCache(PrefixCache):
    """Prefix caching off: nothing is matched or kept."""

    def open_namespace(self, ns: Namespace, identity: str) -> None:
        return None

    def close_namespace(self, ns: Namespace) -> None:
        return None

    def match(self, ns: Namespace, token_ids: list[int], max_pages: int) -> MatchResult:
        return MatchResult([], None)

    def insert(self, ns, cursor, token_ids, page_ids, start, end) -> InsertResult:  # type: ignore[override]
        return InsertResult(None, [])

    def release(self, ns: Namespace, page_ids: list[int]) -> None:
        self.pool.decref(page_ids)

    def evict(self, num_pages: int) -> int:
        return 0

    @property
    def num_evictable(self) -> int:
        return 0


class _Node:
    __slots__ = ("block_hash", "children", "key", "ns", "page", "parent")

    def __init__(
        self, ns: _Space, key: tuple[int, ...] | None, page: int, parent: _Node | None, block_hash: int
    ) -> None:
        self.ns = ns
        self.key = key
        self.page = page
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.block_hash = block_hash

    def __repr__(self) -> str:
        return f"_Node(page={self.page}, children={len(self.children)})"


class _Space:
    __slots__ = ("closing", "identity", "key", "root")

    def __init__(self, key: Namespace, identity: str) -> None:
        self.key = key
        self.identity = identity
        self.closing = False
        self.root = _Node(self, None, -1, None, namespace_seed(identity))


class RadixPrefixCache(PrefixCache):
    """The adapter-namespaced radix tree described in the module docstring."""

    def __init__(self, pool: PagePool, enable_events: bool = False) -> None:
        super().__init__(pool)
        self.page_size = pool.page_size
        self.enable_events = enable_events
        self._spaces: dict[Namespace, _Space] = {}
        self._by_page: dict[int, _Node] = {}
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # idle leaves, oldest first
        self._num_idle = 0  # tree pages whose only reference is the cache's
        self._events: list[KVEvent] = []

    # --- namespaces ---
    def open_namespace(self, ns: Namespace, identity: str) -> None:
        space = self._spaces.get(ns)
        assert space is None or space.identity == identity, (
            f"namespace {ns} reopened as {identity!r} (was {space.identity!r})"
        )
        if space is None:
            self._spaces[ns] = _Space(ns, identity)

    def close_namespace(self, ns: Namespace) -> None:
        space = self._spaces.get(ns)
        if space is None:
            return
        space.closing = True
        idle = [n for n in self._lru if n.ns is space]
        for node in idle:
            self._remove_chain(node)
        self._drop_if_empty(space)

    def namespaces(self) -> list[Namespace]:
        return list(self._spaces)

    def pages_in(self, ns: Namespace) -> int:
        return sum(1 for n in self._by_page.values() if n.ns.key == ns)

    # --- lookups ---
    def match(self, ns: Namespace, token_ids: list[int], max_pages: int) -> MatchResult:
        space = self._spaces.get(ns)
        if space is None or space.closing:
            return MatchResult([], None)
        node, pages, ps = space.root, [], self.page_size
        for i in range(max_pages):
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                break
            node = child
            pages.append(node.page)
        if pages:
            self._lock(pages)
            self._lru.pop(node, None)
        return MatchResult(pages, node)

    def insert(self, ns, cursor, token_ids, page_ids, start, end) -> InsertResult:  # type: ignore[override]
        space = self._spaces.get(ns)
        if space is None or space.closing or start >= end:
            return InsertResult(cursor, [])
        node = cursor if cursor is not None else space.root
        assert node.ns is space, "insert cursor belongs to another namespace"
        self._lru.pop(node, None)  # about to gain a child or stay busy
        adopted, ps = [], self.page_size
        for i in range(start, end):
            key = tuple(token_ids[i * ps : (i + 1) * ps])
            child = node.children.get(key)
            if child is None:
                child = self._add(space, node, key, page_ids[i])
            elif child.page != page_ids[i]:
                # Same tokens computed twice: keep the tree's copy, the caller adopts it.
                self._lock([child.page])
                self._lru.pop(child, None)
                adopted.append((i, child.page))
            node = child
        return InsertResult(node, adopted)

    def _add(self, space: _Space, parent: _Node, key: tuple[int, ...], page: int) -> _Node:
        block_hash = chain_hash(parent.block_hash, key) if self.enable_events else 0
        node = _Node(space, key, page, parent, block_hash)
        parent.children[key] = node
        self._by_page[page] = node
        self.pool.incref([page])  # the cache's own reference
        if self.enable_events:
            parent_hash = parent.block_hash if parent.parent is not None else None
            self._events.append(KVEvent("stored", block_hash, parent_hash, key, space.identity))
        return node

    # --- reference counting ---
    def _lock(self, pages: list[int]) -> None:
        pool = self.pool
        for p in pages:
            if pool.refcount(p) == 1:
                self._num_idle -= 1
        pool.incref(pages)

    def release(self, ns: Namespace, page_ids: list[int]) -> None:
        pool, by_page = self.pool, self._by_page
        pool.decref(page_ids)
        closing: list[_Node] = []
        for p in reversed(page_ids):  # leaf side first, so leaves are older in the LRU
            node = by_page.get(p)
            if node is None or pool.refcount(p) != 1:
                continue
            self._num_idle += 1
            if node.ns.closing:
                closing.append(node)
            elif not node.children:
                self._lru[node] = None
                self._lru.move_to_end(node)
        for node in closing:
            if by_page.get(node.page) is node:
                self._remove_chain(node)
        for node in closing:
            if node.ns.key in self._spaces:
                self._drop_if_empty(node.ns)

    # --- eviction ---
    @property
    def num_evictable(self) -> int:
        return self._num_idle

    def evict(self, num_pages: int) -> int:
        freed = 0
        while freed < num_pages and self._lru:
            node, _ = self._lru.popitem(last=False)
            parent = self._remove(node)
            freed += 1
            if self._is_idle_leaf(parent):
                self._lru[parent] = None
                self._lru.move_to_end(parent, last=False)  # it was used no later than its child
        return freed

    def _is_idle_leaf(self, node: _Node) -> bool:
        return node.parent is not None and not node.children and self.pool.refcount(node.page) == 1

    def _remove(self, node: _Node) -> _Node:
        """Remove an idle leaf and free its page; return its parent."""
        assert not node.children and self.pool.refcount(node.page) == 1, f"evicting busy {node}"
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]  # type: ignore[arg-type]
        del self._by_page[node.page]
        self._lru.pop(node, None)
        self._num_idle -= 1
        self.pool.decref([node.page])
        if self.enable_events:
            self._events.append(KVEvent("removed", node.block_hash, None, (), node.ns.identity))
        return parent

    def _remove_chain(self, node: _Node) -> None:
        """Remove an idle leaf and then each ancestor that becomes an idle leaf."""
        while self._is_idle_leaf(node):
            node = self._remove(node)

    def _drop_if_empty(self, space: _Space) -> None:
        if space.closing and not space.root.children and self._spaces.get(space.key) is space:
            del self._spaces[space.key]

    # --- events and checks ---
    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def held_pages(self) -> list[int]:
        return list(self._by_page)

    def check_integrity(self) -> None:
        pool, seen = self.pool, 0
        idle = 0
        for space in self._spaces.values():
            stack = list(space.root.children.values())
            while stack:
                node = stack.pop()
                seen += 1
                assert self._by_page.get(node.page) is node, f"{node} missing from the page map"
                assert node.parent is not None and node.parent.children[node.key] is node  # type: ignore[index]
                ref = pool.refcount(node.page)
                assert ref >= 1, f"tree page {node.page} has count {ref}"
                if ref == 1:
                    idle += 1
                    for child in node.children.values():
                        assert pool.refcount(child.page) == 1, "busy node under an idle node"
                    assert (node in self._lru) == (not node.children) or space.closing, (
                        f"idle {node}: in LRU={node in self._lru}, leaf={not node.children}"
                    )
                else:
                    assert node not in self._lru, f"busy {node} in the LRU"
                stack.extend(node.children.values())
        assert seen == len(self._by_page), f"{seen} nodes reachable, {len(self._by_page)} mapped"
        assert idle == self._num_idle, f"idle count {self._num_idle}, actual {idle}"
