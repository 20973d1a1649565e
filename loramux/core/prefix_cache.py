"""Prefix cache: a radix tree of full KV pages, one namespace per adapter load (S5).

Boundary: the tree maps (namespace, page-sized token chunks) to page ids and
mediates every reference-count change on the pages it holds. It does not know
requests or adapters; callers pass a namespace id (the adapter uid, None for
the base model) and the identity string the KV-event hash chain starts from.

Salted namespaces: a request with a cache salt (vLLM's `cache_salt`) uses the
namespace `(ns, salt)`, opened on its first insert below the open namespace
`ns` and dropped again when it empties or `ns` closes. Requests share KV only
when adapter and salt both agree, so one tenant cannot detect another's
prompts by their cache hits.

Layout: each namespace has its own root, so a lookup can never cross from one
adapter (or adapter version) to another. Each node below a root is one full
page whose key is the tuple of that page's tokens:

    root(ns) ── (t0..t15) ── (t16..t31) ── ...
                          └─ (u16..u31)

The cache holds one reference on every device page in the tree; a page whose
count is 1 is idle (cache-only) and can be evicted. Running requests hold a
root-side path of the tree, so an idle node's whole subtree is idle, and
"device leaves" (nodes with no child on the device) go first, least recently
used first (S5.6).

Host tier (optional, `host_pool`): an evicted device leaf moves to a host page
instead of being dropped (the executor copies it out before the page is
reused), and a later match that walks into host nodes brings them back onto
device pages (copied in before the step's forward). Host nodes sit in the same
namespaced tree, so they too are only ever matched in their own namespace
(S5.3). Ancestors of a device node are device nodes; host nodes are evicted
from host memory leaves first, least recently used first.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from loramux.core.page_pool import PagePool

Namespace = int | None | tuple[int | None, str]  # adapter uid (None: the base model), or (uid, salt)


@dataclass(frozen=True, slots=True)
class KVEvent:
    """A change to the cache that an external KV-aware router can follow (S5.5)."""

    kind: str  # "stored" or "removed"
    block_hash: int
    parent_block_hash: int | None  # None for the first page of a namespace
    token_ids: tuple[int, ...]  # empty for "removed"
    namespace: str  # the namespace's identity, e.g. "base" or "lora:sql:<version>"
    on_host: bool = False  # the page's tier: the device pool, or host memory (the offload tier)


class MatchResult(NamedTuple):
    pages: list[int]  # cached device pages, now referenced by the caller
    host: list[object]  # then, host-resident pages to bring back (opaque; see `onload`)
    cursor: object  # where a later insert for the same request continues


class InsertResult(NamedTuple):
    cursor: object
    adopted: list[tuple[int, int]]  # (index in the page table, tree page that replaces it)


class KVCopy(NamedTuple):
    """One page copy the executor makes before a step's forward, in the order they were planned.

    Order matters: a page freed by one copy may be the target of a later one in the same step.
    """

    kind: str  # "offload": device page -> host page; "onload": host page -> device page
    src: int
    dst: int


def namespace_seed(identity: str) -> int:
    """The hash a namespace's chain starts from: distinct identities give distinct chains."""
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "little")


def salted_identity(identity: str, salt: str) -> str:
    """A salted namespace's identity: its namespace's, and a digest of the salt (never the salt)."""
    return f"{identity}#salt:{hashlib.blake2b(salt.encode(), digest_size=8).hexdigest()}"


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

    def unmatch(self, ns: Namespace, hit: MatchResult) -> None:
        """Give back a match that was not used (the request was not admitted)."""
        self.release(ns, hit.pages)

    def onload(self, host: list[object], pages: list[int]) -> None:
        """Bring matched host nodes back onto the caller's fresh device `pages`."""
        assert not host, "this cache has no host tier"

    @abstractmethod
    def insert(
        self, ns: Namespace, cursor: object, token_ids: list[int], page_ids: list[int], start: int, end: int
    ) -> InsertResult:
        """Offer the caller's full pages `page_ids[start:end]` (holding `token_ids`) to the tree."""

    @abstractmethod
    def release(self, ns: Namespace, page_ids: list[int]) -> None:
        """The caller drops its references on `page_ids`."""

    @abstractmethod
    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` idle device pages, least recently used first; return how many."""

    @property
    @abstractmethod
    def num_evictable(self) -> int: ...

    def take_events(self) -> list[KVEvent]:
        return []

    def take_copies(self) -> list[KVCopy]:
        return []

    def held_pages(self) -> list[int]:
        """Device pages the cache holds a reference on (for integrity checks)."""
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
        return MatchResult([], [], None)

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
    __slots__ = ("block_hash", "children", "host", "key", "ns", "page", "parent")

    def __init__(
        self, ns: _Space, key: tuple[int, ...] | None, page: int | None, parent: _Node | None, block_hash: int
    ) -> None:
        self.ns = ns
        self.key = key
        self.page = page  # device page; None while the node lives in host memory (and for a root)
        self.host: int | None = None  # host page while the node lives in host memory
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.block_hash = block_hash

    @property
    def on_device(self) -> bool:
        return self.page is not None

    def __repr__(self) -> str:
        where = f"page={self.page}" if self.page is not None else f"host={self.host}"
        return f"_Node({where}, children={len(self.children)})"


class _Space:
    __slots__ = ("closing", "identity", "key", "root")

    def __init__(self, key: Namespace, identity: str) -> None:
        self.key = key
        self.identity = identity
        self.closing = False
        self.root = _Node(self, None, None, None, namespace_seed(identity))


class _EventLog:
    """The cache's changes, in order, for KV-aware routers (S5.5): each device or host page a
    node gains or loses, with the node's chained hash."""

    def __init__(self) -> None:
        self._log: list[KVEvent] = []

    def chain(self, parent_hash: int, key: tuple[int, ...]) -> int:
        return chain_hash(parent_hash, key)

    def stored(self, node: _Node, on_host: bool) -> None:
        parent = node.parent
        assert parent is not None and node.key is not None
        parent_hash = parent.block_hash if parent.parent is not None else None
        self._log.append(KVEvent("stored", node.block_hash, parent_hash, node.key, node.ns.identity, on_host))

    def removed(self, node: _Node, on_host: bool) -> None:
        self._log.append(KVEvent("removed", node.block_hash, None, (), node.ns.identity, on_host))

    def take(self) -> list[KVEvent]:
        log, self._log = self._log, []
        return log


class _NoEvents(_EventLog):
    """Nobody listens: no hash is computed and nothing is recorded."""

    def chain(self, parent_hash: int, key: tuple[int, ...]) -> int:
        return 0

    def stored(self, node: _Node, on_host: bool) -> None:
        pass

    def removed(self, node: _Node, on_host: bool) -> None:
        pass


class RadixPrefixCache(PrefixCache):
    """The adapter-namespaced radix tree described in the module docstring."""

    def __init__(
        self, pool: PagePool, enable_events: bool = False, host_pool: PagePool | None = None
    ) -> None:
        super().__init__(pool)
        self.page_size = pool.page_size
        self.host_pool = host_pool
        self._spaces: dict[Namespace, _Space] = {}
        self._by_page: dict[int, _Node] = {}
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # idle device leaves, oldest first
        self._host_lru: OrderedDict[_Node, None] = OrderedDict()  # host nodes with no children, oldest first
        self._reserved: set[_Node] = set()  # host nodes matched by a request being admitted: not evictable
        self._num_idle = 0  # device pages in the tree whose only reference is the cache's
        self._events = _EventLog() if enable_events else _NoEvents()
        self._copies: list[KVCopy] = []
        # Counters for metrics.
        self.num_offloaded = 0
        self.num_onloaded = 0

    # --- namespaces ---
    def open_namespace(self, ns: Namespace, identity: str) -> None:
        space = self._spaces.get(ns)
        assert space is None or space.identity == identity, (
            f"namespace {ns} reopened as {identity!r} (was {space.identity!r})"
        )
        if space is None:
            self._spaces[ns] = _Space(ns, identity)

    def close_namespace(self, ns: Namespace) -> None:
        for key in [k for k in self._spaces if isinstance(k, tuple) and k[0] == ns]:
            self.close_namespace(key)  # its salted namespaces go with it
        space = self._spaces.get(ns)
        if space is None:
            return
        space.closing = True
        for node in list(_post_order(space.root)):  # children before parents
            if node is space.root or node.children:
                continue
            if not node.on_device:
                self._remove_host(node)
            elif self.pool.refcount(node.page) == 1:
                self._remove(node)
        self._drop_if_empty(space)

    def namespaces(self) -> list[Namespace]:
        return list(self._spaces)

    def pages_in(self, ns: Namespace) -> int:
        return sum(1 for n in self._by_page.values() if n.ns.key == ns)

    def host_pages_in(self, ns: Namespace) -> int:
        space = self._spaces.get(ns)
        return 0 if space is None else sum(1 for n in _post_order(space.root) if n.host is not None)

    # --- lookups ---
    def match(self, ns: Namespace, token_ids: list[int], max_pages: int) -> MatchResult:
        space = self._spaces.get(ns)
        if space is None or space.closing:
            return MatchResult([], [], None)
        node, pages, host, ps = space.root, [], [], self.page_size
        for i in range(max_pages):
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                break
            if child.on_device:
                assert not host, f"device {child} below a host node"
                pages.append(child.page)
            else:
                host.append(child)
                self._host_lru.pop(child, None)
                self._reserved.add(child)  # until onload or unmatch
            node = child
        if pages:
            self._lock(pages)
            self._lru.pop(self._by_page[pages[-1]], None)
        # no cursor at a root: a salted namespace may be dropped and opened anew before the insert
        return MatchResult(pages, host, None if node is space.root else node)

    def unmatch(self, ns: Namespace, hit: MatchResult) -> None:
        self.release(ns, hit.pages)
        for node in reversed(hit.host):  # type: ignore[assignment]
            self._reserved.discard(node)  # type: ignore[arg-type]
            if not node.children and node.host is not None:  # type: ignore[attr-defined]
                self._host_lru[node] = None  # type: ignore[index]

    def onload(self, host: list[object], pages: list[int]) -> None:
        assert len(host) == len(pages), (len(host), len(pages))
        for node, page in zip(host, pages, strict=True):
            assert isinstance(node, _Node) and node.host is not None, node
            self._copies.append(KVCopy("onload", node.host, page))
            self._promote(node, page)
            self.num_onloaded += 1

    def _promote(self, node: _Node, page: int) -> None:
        """A host node becomes a device node on `page` (which its user already references)."""
        assert self.host_pool is not None
        self.host_pool.decref([node.host])
        self._host_lru.pop(node, None)
        self._reserved.discard(node)
        self._moved(node, to_host=False)
        node.host, node.page = None, page
        self._by_page[page] = node
        self.pool.incref([page])  # the cache's own reference

    def insert(self, ns, cursor, token_ids, page_ids, start, end) -> InsertResult:  # type: ignore[override]
        if start >= end:
            return InsertResult(cursor, [])
        space = self._spaces.get(ns)
        if space is None and isinstance(ns, tuple):
            space = self._open_salted(ns)
        if space is None or space.closing:
            return InsertResult(cursor, [])
        node = cursor if cursor is not None else space.root
        assert node.ns is space, "insert cursor belongs to another namespace"
        self._lru.pop(node, None)  # about to gain a device child, or stays busy
        adopted, ps = [], self.page_size
        for i in range(start, end):
            key = tuple(token_ids[i * ps : (i + 1) * ps])
            child = node.children.get(key)
            if child is None:
                child = self._add(space, node, key, page_ids[i])
            elif not child.on_device:  # the same page sat in host memory: the caller's copy replaces it
                self._promote(child, page_ids[i])
            elif child.page != page_ids[i]:
                # Same tokens computed twice: keep the tree's copy, the caller adopts it.
                self._lock([child.page])
                self._lru.pop(child, None)
                adopted.append((i, child.page))
            node = child
        return InsertResult(node, adopted)

    def _add(self, space: _Space, parent: _Node, key: tuple[int, ...], page: int) -> _Node:
        node = _Node(space, key, page, parent, self._events.chain(parent.block_hash, key))
        parent.children[key] = node
        self._host_lru.pop(parent, None)
        self._by_page[page] = node
        self.pool.incref([page])  # the cache's own reference
        self._events.stored(node, on_host=False)
        return node

    def _moved(self, node: _Node, to_host: bool) -> None:
        """A page changes tier: removed from the one it leaves, stored in the one it enters, as
        vLLM's offloading reports it (a router must not count it where it no longer is)."""
        self._events.removed(node, on_host=not to_host)
        self._events.stored(node, on_host=to_host)

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
            elif self._is_device_leaf(node):
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
            parent = self._offload(node) if self.host_pool is not None else self._remove(node)
            freed += 1
            if parent.parent is not None and self._is_idle_device_leaf(parent):
                self._lru[parent] = None
                self._lru.move_to_end(parent, last=False)  # it was used no later than its child
        return freed

    def _is_device_leaf(self, node: _Node) -> bool:
        return not any(c.on_device for c in node.children.values())

    def _is_idle_device_leaf(self, node: _Node) -> bool:
        return node.on_device and self.pool.refcount(node.page) == 1 and self._is_device_leaf(node)

    def _offload(self, node: _Node) -> _Node:
        """Move an idle device leaf to a host page (dropping it if host memory cannot take it)."""
        host = self._host_page()
        if host is None:
            self._drop_subtree(node)
            return node.parent  # type: ignore[return-value]
        self._copies.append(KVCopy("offload", node.page, host))
        self._moved(node, to_host=True)
        del self._by_page[node.page]
        self._num_idle -= 1
        self.pool.decref([node.page])
        node.page, node.host = None, host
        if not node.children:
            self._host_lru[node] = None
        self.num_offloaded += 1
        return node.parent  # type: ignore[return-value]

    def _host_page(self) -> int | None:
        assert self.host_pool is not None
        got = self.host_pool.allocate(1)
        while got is None and self._host_lru:
            victim, _ = self._host_lru.popitem(last=False)
            self._remove_host(victim)
            got = self.host_pool.allocate(1)
        return None if got is None else got[0]

    def _remove(self, node: _Node) -> _Node:
        """Drop an idle device leaf with no children and free its page; return its parent."""
        assert not node.children and self.pool.refcount(node.page) == 1, f"evicting busy {node}"
        parent = self._unlink(node)
        del self._by_page[node.page]
        self._lru.pop(node, None)
        self._num_idle -= 1
        self.pool.decref([node.page])
        return parent

    def _remove_host(self, node: _Node) -> _Node:
        """Drop a host node with no children and free its host page; return its parent."""
        assert not node.children and node.host is not None, node
        assert self.host_pool is not None
        parent = self._unlink(node)
        self._host_lru.pop(node, None)
        self.host_pool.decref([node.host])
        if (
            not parent.on_device
            and parent.parent is not None
            and not parent.children
            and parent not in self._reserved
        ):
            self._host_lru[parent] = None
            self._host_lru.move_to_end(parent, last=False)  # no younger than its child
        return parent

    def _drop_subtree(self, node: _Node) -> None:
        """Drop an idle device node and every host node below it."""
        for n in list(_post_order(node)):
            if n is not node:
                self._remove_host(n)
        self._remove(node)

    def _unlink(self, node: _Node) -> _Node:
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]  # type: ignore[arg-type]
        self._events.removed(node, on_host=not node.on_device)
        if parent.parent is None:
            self._drop_if_empty(node.ns)
        return parent

    def _remove_chain(self, node: _Node) -> None:
        """Remove an idle leaf and then each ancestor that becomes an idle leaf."""
        while node.parent is not None and not node.children and self._is_idle_device_leaf(node):
            node = self._remove(node)

    def _open_salted(self, ns: tuple[int | None, str]) -> _Space | None:
        base = self._spaces.get(ns[0])
        if base is None or base.closing:
            return None
        space = self._spaces[ns] = _Space(ns, salted_identity(base.identity, ns[1]))
        return space

    def _drop_if_empty(self, space: _Space) -> None:
        """Forget a closing namespace once empty; a salted one too, so salts leave nothing behind."""
        dropping = space.closing or isinstance(space.key, tuple)
        if dropping and not space.root.children and self._spaces.get(space.key) is space:
            del self._spaces[space.key]

    # --- events, copies and checks ---
    def take_events(self) -> list[KVEvent]:
        return self._events.take()

    def take_copies(self) -> list[KVCopy]:
        copies, self._copies = self._copies, []
        return copies

    def held_pages(self) -> list[int]:
        return list(self._by_page)

    def check_integrity(self) -> None:
        pool, seen, idle = self.pool, 0, 0
        host_refs: dict[int, int] = {}
        assert not self._reserved, f"{len(self._reserved)} host nodes still reserved between steps"
        for space in self._spaces.values():
            for node in _post_order(space.root):
                if node is space.root:
                    continue
                assert node.parent is not None and node.parent.children[node.key] is node  # type: ignore[index]
                if not node.on_device:
                    assert node.host is not None, f"{node} is neither on the device nor on the host"
                    host_refs[node.host] = host_refs.get(node.host, 0) + 1
                    assert (node in self._host_lru) == (not node.children), f"host LRU mismatch at {node}"
                    continue
                seen += 1
                mapped = self._by_page.get(node.page)  # type: ignore[arg-type]
                assert node.host is None and mapped is node, f"{node} missing from the map"
                assert node.parent.parent is None or node.parent.on_device, f"device {node} under a host node"
                ref = pool.refcount(node.page)
                assert ref >= 1, f"tree page {node.page} has count {ref}"
                if ref == 1:
                    idle += 1
                    for child in node.children.values():
                        assert not child.on_device or pool.refcount(child.page) == 1, "busy node under idle"
                    leaf = self._is_device_leaf(node)
                    assert (node in self._lru) == leaf or space.closing, f"idle {node}: LRU mismatch"
                else:
                    assert node not in self._lru, f"busy {node} in the LRU"
        assert seen == len(self._by_page), f"{seen} device nodes reachable, {len(self._by_page)} mapped"
        assert idle == self._num_idle, f"idle count {self._num_idle}, actual {idle}"
        if self.host_pool is not None:
            self.host_pool.check_integrity(host_refs)
        else:
            assert not host_refs, "host nodes without a host tier"


def _post_order(root: _Node) -> Iterator[_Node]:
    """Every node under (and including) `root`, children before their parent."""
    stack: list[tuple[_Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            yield node
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in node.children.values())
