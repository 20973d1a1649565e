"""The control plane: scheduler, KV page pool, prefix cache and adapter residency.

Boundary: pure Python over ints and lists. Nothing here imports torch (a test
imports this package with torch blocked); executors, real or fake, consume
its `SchedulerOutput` and answer with a `RunnerOutput`.
"""

from loramux.core.adapters import AdapterInfo, AdapterManager, AdapterNotFoundError, AdapterPlan
from loramux.core.kv_manager import KVCacheManager
from loramux.core.outputs import RunnerOutput, SampleLogprobs, ScheduledSeq, SchedulerOutput
from loramux.core.page_pool import PagePool
from loramux.core.policies import POLICIES, make_policy
from loramux.core.prefix_cache import KVEvent, NullPrefixCache, RadixPrefixCache
from loramux.core.request import Request, RequestStatus
from loramux.core.scheduler import QueueFullError, Scheduler, StepUpdate

__all__ = [
    "POLICIES",
    "AdapterInfo",
    "AdapterManager",
    "AdapterNotFoundError",
    "AdapterPlan",
    "KVCacheManager",
    "KVEvent",
    "NullPrefixCache",
    "PagePool",
    "QueueFullError",
    "RadixPrefixCache",
    "Request",
    "RequestStatus",
    "RunnerOutput",
    "SampleLogprobs",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerOutput",
    "StepUpdate",
    "make_policy",
]
