"""Adapter registry and residency: which adapters exist, and where their weights sit (S2.5, S2.6).

Boundary: names, uids, sizes and slot numbers only. This module decides what
to load and evict; the executor does the copying, reading the plan that
`end_step` returns. Three tiers: disk (always), host memory (an LRU of at most
`max_cpu_loras`) and device slots (at most `max_loras`, optionally bounded in
bytes). A device-resident adapter is also host-resident.

An adapter with running requests is never evicted; a pinned one never leaves
once loaded. Unloading removes the name at once (new requests fail, the name
can be loaded again), but the entry lives until its last request finishes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def lora_nbytes(rank: int, shapes: list[tuple[int, int]], dtype: str = "float32") -> int:
    """Bytes of one adapter: A is [rank, in] and B is [out, rank] for each (in, out) target (S2.6).

    `shapes` lists one (in_features, out_features) pair per adapted module per layer.
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return rank * sum(i + o for i, o in shapes) * _DTYPE_BYTES[dtype]


class AdapterNotFoundError(LookupError):
    """A request or an unload named an adapter that is not registered (S1.2)."""

    def __init__(self, name: str, known: list[str], why: str = "is not loaded") -> None:
        shown = ", ".join(sorted(known)[:10]) or "none"
        super().__init__(
            f"adapter {name!r} {why}; loaded adapters: {shown}. "
            f"Load it first (POST /v1/load_lora_adapter or --lora-modules {name}=PATH)."
        )
        self.name = name


@dataclass(eq=False)
class AdapterInfo:
    """One registered load of an adapter. `uid` is new for every load."""

    name: str
    uid: int
    version: str
    rank: int
    nbytes: int
    path: str | None = None
    pinned: bool = False
    # --- live state, owned by AdapterManager ---
    num_requests: int = field(default=0, init=False)  # unfinished requests naming it
    num_running: int = field(default=0, init=False)  # of those, running now
    unloading: bool = field(default=False, init=False)
    on_host: bool = field(default=False, init=False)
    slot: int | None = field(default=None, init=False)

    @property
    def identity(self) -> str:
        """The prefix-cache namespace identity: name and content version."""
        return f"lora:{self.name}:{self.version}"

    def __repr__(self) -> str:
        return (
            f"AdapterInfo({self.name!r}, uid={self.uid}, rank={self.rank}, slot={self.slot}, "
            f"host={self.on_host}, running={self.num_running}/{self.num_requests})"
        )


class AdapterPlan(NamedTuple):
    """What the executor must do before this step's forward, in this order."""

    release: list[int]  # uid: unloaded and unused, drop every copy
    evict_device: list[tuple[int, int]]  # (uid, slot): slot contents may be overwritten
    evict_host: list[int]  # uid: drop the host copy
    load_host: list[int]  # uid: read from disk into host memory
    load_device: list[tuple[int, int]]  # (uid, slot): copy host weights into the slot

    @property
    def empty(self) -> bool:
        return not (
            self.evict_device or self.evict_host or self.load_host or self.load_device or self.release
        )


class AdapterManager:
    def __init__(
        self, max_loras: int, max_cpu_loras: int, max_lora_rank: int, max_device_bytes: int | None = None
    ) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras={max_loras}; it must be at least 1")
        if max_cpu_loras < max_loras:
            raise ValueError(
                f"max_cpu_loras={max_cpu_loras} < max_loras={max_loras}: every device-resident "
                f"adapter also sits in host memory; raise max_cpu_loras to at least {max_loras}"
            )
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.max_device_bytes = max_device_bytes
        self._uids = itertools.count(1)
        self._by_name: dict[str, AdapterInfo] = {}
        self._by_uid: dict[int, AdapterInfo] = {}
        self._free_slots = list(range(max_loras - 1, -1, -1))  # pop() gives slot 0 first
        self._slots: list[AdapterInfo | None] = [None] * max_loras
        self._device_bytes = 0
        self._device_idle: OrderedDict[int, None] = OrderedDict()  # evictable from device, LRU first
        self._host_only: OrderedDict[int, None] = OrderedDict()  # on host, not on device, LRU first
        self._num_host = 0
        self._new_plan()
        # Counters for metrics.
        self.num_device_loads = 0
        self.num_host_loads = 0
        self.num_device_evictions = 0
        self.num_host_evictions = 0

    # --- registry ---
    def register(
        self,
        name: str,
        version: str,
        rank: int,
        nbytes: int,
        path: str | None = None,
        pinned: bool = False,
        replace: bool = False,
    ) -> AdapterInfo:
        """A new load of `name`. With `replace`, a load already under that name is unregistered
        once the new one passes every check (its requests finish on it, S6.3); if a check fails,
        it stays as it was."""
        old = self._by_name.get(name)
        if old is not None and not replace:
            raise ValueError(
                f"adapter {name!r} is already loaded; unload it first, or load it in place "
                f"(load_inplace: true) to replace it"
            )
        if old is None:
            info = self._register(name, version, rank, nbytes, path, pinned)
            self._by_name[name] = info
            return info
        old.unloading = True  # for the checks: its pin and bytes go with the replacement
        try:
            info = self._register(name, version, rank, nbytes, path, pinned, old)
        finally:
            old.unloading = False
        self.unregister(name)  # the old load: its requests finish on its weights
        self._by_name[name] = info
        return info

    def _register(
        self,
        name: str,
        version: str,
        rank: int,
        nbytes: int,
        path: str | None,
        pinned: bool,
        replaced: AdapterInfo | None = None,
    ) -> AdapterInfo:
        if not name:
            raise ValueError("an adapter needs a non-empty name")
        bad = [c for c in ("/", "\\") if c in name] + (
            ["a control character"] if not name.isprintable() else []
        )
        if bad or name.startswith(".") or name != name.strip():
            raise ValueError(
                f"adapter name {name!r} is not allowed ({', '.join(bad) or 'leading dot or space'}): "
                f"names are model ids, not paths; use letters, digits, '-', '_', '.' and ':'"
            )
        if not 1 <= rank <= self.max_lora_rank:
            raise ValueError(
                f"adapter {name!r} has rank {rank}, above max_lora_rank={self.max_lora_rank}; "
                f"restart with --max-lora-rank {rank} or more"
            )
        if self.max_device_bytes is not None and nbytes > self.max_device_bytes:
            raise ValueError(
                f"adapter {name!r} needs {nbytes} bytes, more than the device budget "
                f"max_lora_bytes={self.max_device_bytes}"
            )
        freed = replaced is not None and replaced.pinned and replaced.num_requests == 0  # released at once
        pins = self.num_pinned - int(freed)
        if pinned and pins >= self.max_loras - 1 and self.max_loras > 1:
            raise ValueError(
                f"cannot pin {name!r}: {pins} of {self.max_loras} slots are pinned "
                f"and one must stay free for other adapters; raise max_loras"
            )
        if pinned and self.max_loras == 1:
            raise ValueError(f"cannot pin {name!r} with max_loras=1: no slot would be left for others")
        self._check_fits_beside_pins(name, nbytes, pinned)
        info = AdapterInfo(name, next(self._uids), version, rank, nbytes, path, pinned)
        self._by_uid[info.uid] = info  # the caller puts it under its name
        return info

    def _check_fits_beside_pins(self, name: str, nbytes: int, pinned: bool) -> None:
        """Refuse an adapter that could never be loaded: pinned adapters never leave, so with a
        byte budget every adapter must fit beside all of them (S2.6)."""
        budget = self.max_device_bytes
        if budget is None:
            return
        pins = [a for a in self._by_uid.values() if a.pinned and not a.unloading]
        pinned_bytes = sum(a.nbytes for a in pins)
        if nbytes + pinned_bytes > budget:
            what = "the pinned adapters" if not pinned else "the adapters pinned before it"
            raise ValueError(
                f"adapter {name!r} needs {nbytes} bytes but {what} hold {pinned_bytes} of the "
                f"device budget max_lora_bytes={budget}: it could never be loaded; raise the budget "
                f"or unload a pinned adapter"
            )
        if pinned:
            others = [a for a in self._by_uid.values() if not a.pinned and not a.unloading]
            big = max(others, key=lambda a: a.nbytes, default=None)
            if big is not None and pinned_bytes + nbytes + big.nbytes > budget:
                raise ValueError(
                    f"cannot pin {name!r}: with it pinned, {pinned_bytes + nbytes} of the "
                    f"max_lora_bytes={budget} bytes never free, and adapter {big.name!r} "
                    f"({big.nbytes} bytes) could never be loaded; raise the budget or do not pin it"
                )

    def unregister(self, name: str) -> AdapterInfo:
        """Remove `name` now; its weights go once its last request finishes (S6.3)."""
        info = self.get(name)
        del self._by_name[name]
        info.unloading = True
        if info.num_requests == 0:
            self._release(info)
        return info

    def lookup(self, name: str) -> AdapterInfo | None:
        """The load now under `name`, if any."""
        return self._by_name.get(name)

    def get(self, name: str) -> AdapterInfo:
        info = self._by_name.get(name)
        if info is None:
            raise AdapterNotFoundError(name, list(self._by_name))
        return info

    def by_uid(self, uid: int) -> AdapterInfo:
        return self._by_uid[uid]

    def references(self) -> dict[str, int]:
        """Unfinished requests per adapter still known here (unloading ones included): all zero
        once every request has ended, or a reference leaked."""
        return {a.name: a.num_requests for a in self._by_uid.values()}

    def names(self) -> list[str]:
        return list(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def num_pinned(self) -> int:
        return sum(1 for a in self._by_uid.values() if a.pinned)

    # --- request accounting ---
    def add_request(self, info: AdapterInfo) -> None:
        assert not info.unloading, f"new request for unloading {info!r}"
        info.num_requests += 1

    def finish_request(self, info: AdapterInfo) -> None:
        assert info.num_requests > 0, f"{info!r} finished more requests than it had"
        info.num_requests -= 1
        if info.num_requests == 0 and info.unloading:
            self._release(info)

    def start_running(self, info: AdapterInfo) -> None:
        assert info.slot is not None, f"{info!r} runs without a device slot"
        info.num_running += 1
        self._device_idle.pop(info.uid, None)

    def stop_running(self, info: AdapterInfo) -> None:
        assert info.num_running > 0, f"{info!r} stopped more requests than ran"
        info.num_running -= 1
        if info.num_running == 0 and info.slot is not None and not info.pinned:
            self._device_idle[info.uid] = None

    # --- residency ---
    @property
    def resident_uids(self) -> list[int]:
        return [a.uid for a in self._slots if a is not None]

    @property
    def host_uids(self) -> list[int]:
        return [a.uid for a in self._by_uid.values() if a.on_host]

    def can_take_slot(self) -> bool:
        """Whether some non-resident adapter could get a slot this step (a cheap bound)."""
        return bool(self._free_slots or self._device_idle)

    def can_acquire(self, info: AdapterInfo) -> bool:
        """Whether `acquire(info)` would succeed now (it changes nothing)."""
        return info.slot is not None or self._device_victims(info.nbytes) is not None

    def acquire(self, info: AdapterInfo) -> int | None:
        """A device slot for `info` this step, planning loads and evictions; None if none frees up."""
        if info.slot is not None:
            if info.uid in self._device_idle:
                self._device_idle.move_to_end(info.uid)
            return info.slot
        victims = self._device_victims(info.nbytes)
        if victims is None:
            return None
        for uid in victims:
            self._evict_device(self._by_uid[uid])
        if not info.on_host:
            self._load_host(info)
        self._host_only.pop(info.uid, None)
        slot = self._free_slots.pop()
        self._slots[slot] = info
        info.slot = slot
        self._device_bytes += info.nbytes
        if not info.pinned:
            self._device_idle[info.uid] = None
        self._plan.load_device.append((info.uid, slot))
        self.num_device_loads += 1
        return slot

    def _device_victims(self, nbytes: int) -> list[int] | None:
        """LRU idle adapters to evict so that a slot and `nbytes` are free; None if impossible."""
        need_slot = not self._free_slots
        budget = self.max_device_bytes
        over = 0 if budget is None else self._device_bytes + nbytes - budget
        if not need_slot and over <= 0:
            return []
        victims = []
        for uid in self._device_idle:
            victims.append(uid)
            over -= self._by_uid[uid].nbytes
            if over <= 0:
                return victims
        return None

    def _evict_device(self, info: AdapterInfo) -> None:
        assert info.num_running == 0 and not info.pinned and info.slot is not None, info
        self._plan.evict_device.append((info.uid, info.slot))
        self._slots[info.slot] = None
        self._free_slots.append(info.slot)
        info.slot = None
        self._device_bytes -= info.nbytes
        self._device_idle.pop(info.uid, None)
        self._host_only[info.uid] = None
        self.num_device_evictions += 1

    def drain_plan(self, info: AdapterInfo, busy: list[int]) -> list[int]:
        """Which resident adapters must take no new work so that `info` gets the next slot that
        frees: the fewest from `busy` (uids in the order they are expected to free) that, once
        idle and evicted along with the adapters idle now, leave a slot and enough bytes."""
        slots = len(self._free_slots) + len(self._device_idle)
        room = (
            float("inf")
            if self.max_device_bytes is None
            else self.max_device_bytes
            - self._device_bytes
            + sum(self._by_uid[u].nbytes for u in self._device_idle)
        )
        chosen: list[int] = []
        for uid in busy:
            if slots >= 1 and room >= info.nbytes:
                break
            a = self._by_uid[uid]
            if a.pinned or a.slot is None or uid in self._device_idle:
                continue
            chosen.append(uid)
            slots += 1
            room += a.nbytes
        return chosen

    @property
    def host_room(self) -> int:
        """Adapters host memory can take without evicting one."""
        return self.max_cpu_loras - self._num_host

    def prefetch(self, info: AdapterInfo) -> bool:
        """Start reading `info` from disk into host memory before a request needs it (S2.6): the
        executor reads in the background, so a later device load does not wait on the disk.
        False if host memory holds only device-resident adapters (nothing can make room)."""
        if info.on_host:
            return True
        if self._num_host >= self.max_cpu_loras and not self._host_only:
            return False
        self._load_host(info)
        return True

    def _load_host(self, info: AdapterInfo) -> None:
        self._make_host_room()
        info.on_host = True
        self._num_host += 1
        self._host_only[info.uid] = None
        self._plan.load_host.append(info.uid)
        self.num_host_loads += 1

    def _make_host_room(self) -> None:
        # A device load evicts first, and prefetch checks first: a host-only copy is always there.
        while self._num_host >= self.max_cpu_loras:
            uid, _ = self._host_only.popitem(last=False)
            self._by_uid[uid].on_host = False
            self._num_host -= 1
            if uid in self._plan.load_host:  # read planned this step: cancel it rather than evict after
                self._plan.load_host.remove(uid)
                self.num_host_loads -= 1
            else:
                self._plan.evict_host.append(uid)
                self.num_host_evictions += 1

    def _release(self, info: AdapterInfo) -> None:
        """Drop an unloaded adapter with no requests left from every tier."""
        if info.slot is not None:
            self._slots[info.slot] = None
            self._free_slots.append(info.slot)
            self._device_bytes -= info.nbytes
            info.slot = None
        if info.on_host:
            info.on_host = False
            self._num_host -= 1
        self._device_idle.pop(info.uid, None)
        self._host_only.pop(info.uid, None)
        del self._by_uid[info.uid]
        self._plan.release.append(info.uid)

    # --- per step ---
    def _new_plan(self) -> None:
        self._plan = AdapterPlan([], [], [], [], [])

    def take_plan(self) -> AdapterPlan:
        plan = self._plan
        self._new_plan()
        return plan

    def check_integrity(self) -> None:
        on_device = [a for a in self._slots if a is not None]
        assert len(on_device) + len(self._free_slots) == self.max_loras
        assert sorted(self._free_slots + [a.slot for a in on_device]) == list(range(self.max_loras))  # type: ignore[misc]
        assert sum(a.nbytes for a in on_device) == self._device_bytes
        if self.max_device_bytes is not None:
            assert self._device_bytes <= self.max_device_bytes
        for a in self._by_uid.values():
            assert a.num_running <= a.num_requests, a
            if a.num_running:
                assert a.slot is not None and self._slots[a.slot] is a, f"{a!r} runs off-device"
            if a.slot is not None:
                assert a.on_host, f"{a!r} on device but not on host"
                idle = a.num_running == 0 and not a.pinned
                assert (a.uid in self._device_idle) == idle, f"{a!r} idle-list mismatch"
            assert (a.uid in self._host_only) == (a.on_host and a.slot is None), a
        assert self._num_host == sum(1 for a in self._by_uid.values() if a.on_host)
        assert self._num_host <= self.max_cpu_loras
