"""Engine configuration: frozen dataclasses, one per concern, validated on construction.

Boundary: what the user asks for. Values measured at start-up (number of KV
pages that fit, eos id, the model's length limit) live in `RuntimeInfo`,
never written back here. Pure Python: the control plane imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

POLICY_NAMES = ("fcfs", "affinity", "completion", "fair", "slo", "priority")


def _positive(owner: str, name: str, value: int | float | None, fix: str = "") -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{owner}.{name}={value}; it must be positive{fix}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests in one step (S1.4, S3.1)."""
    max_num_batched_tokens: int = 2048
    """Most tokens (decodes plus prefill chunks) in one step."""
    max_prefill_tokens: int | None = None
    """Most prefill tokens in one step; None means max_num_batched_tokens."""
    policy: str = "fcfs"
    """Waiting-queue policy: fcfs, affinity, completion, fair, slo or priority (S2.5)."""
    starvation_timeout_s: float = 5.0
    """A request that waited this long is served before younger work (S2.4)."""
    ttft_slo_s: float = 6.0
    """The slo policy's time-to-first-token target, in seconds."""
    slo_wait_factor: float = 2.3
    """The slo policy's bound on a request that missed the target: it waits at most this many times
    the wait FCFS would give it now before it goes first (larger: more requests on target, a longer tail)."""
    kv_watermark: float | None = None
    """Fraction of the KV pages a new admission must leave free while requests run, so that the
    running ones can grow without being preempted (vLLM v0's watermark); None means the policy's own:
    0.03 for slo, 0 (vLLM v1's behaviour) for the others."""
    waiting_served_ratio: float = 0.0
    """While decodes run, admit new prefills only if at least ratio x running requests wait (S3.3)."""
    max_waiting_steps: int = 16
    """... unless decodes have run this many steps without an admission."""
    max_queue_len: int | None = None
    """Refuse new requests while this many wait (the server answers 503); None is unbounded."""

    def __post_init__(self) -> None:
        own = "SchedulerConfig"
        _positive(own, "max_num_seqs", self.max_num_seqs)
        _positive(own, "max_num_batched_tokens", self.max_num_batched_tokens)
        _positive(own, "max_prefill_tokens", self.max_prefill_tokens)
        _positive(own, "max_waiting_steps", self.max_waiting_steps)
        _positive(own, "max_queue_len", self.max_queue_len)
        _positive(own, "ttft_slo_s", self.ttft_slo_s)
        _positive(own, "slo_wait_factor", self.slo_wait_factor)
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"SchedulerConfig.policy={self.policy!r}; choose one of {POLICY_NAMES}")
        if self.starvation_timeout_s < 0:
            raise ValueError(f"SchedulerConfig.starvation_timeout_s={self.starvation_timeout_s}; use >= 0")
        if self.kv_watermark is not None and not 0 <= self.kv_watermark < 1:
            raise ValueError(
                f"SchedulerConfig.kv_watermark={self.kv_watermark}; use a fraction of the KV pages in [0, 1) "
                "(0 turns it off)"
            )
        if self.waiting_served_ratio < 0:
            raise ValueError(f"SchedulerConfig.waiting_served_ratio={self.waiting_served_ratio}; use >= 0")

    @property
    def prefill_budget(self) -> int:
        return self.max_prefill_tokens or self.max_num_batched_tokens


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    """Tokens per KV page (S4.1)."""
    num_pages: int | None = None
    """KV pages; None sizes the pool from kv_cache_memory, else memory_utilization, else need."""
    kv_cache_memory: int | None = None
    """Bytes for the KV pool (vLLM's kv_cache_memory_bytes) when num_pages is None."""
    memory_utilization: float | None = None
    """vLLM's --gpu-memory-utilization: the fraction of device memory (on CPU, of the memory
    available at start) for weights plus KV pool; the pool gets what the weights leave."""
    free_memory_fraction: float = 0.5
    """With none of the above, the pool holds what max_num_seqs sequences of max_model_len tokens
    can use, but at most this fraction of the memory free at start (on CPU its pages are
    committed as they are first written, so an idle pool costs little)."""
    idle_cache_pages: int | None = None
    """Where the pool's memory is committed as it is first used (CPU): idle prefix-cache pages
    beyond this many are reused before a never-used page is touched, so memory follows the running
    load. None: max_num_batched_tokens / page_size."""
    enable_prefix_caching: bool = True
    """Reuse KV pages across requests with a shared prefix, per adapter (S5)."""
    enable_kv_events: bool = False
    """Publish stored/removed page events with namespaced block hashes (S5.5)."""
    host_kv_pages: int = 0
    """Pages of host memory for prefix-cache pages evicted from the device (0: no host tier)."""

    def __post_init__(self) -> None:
        own = "CacheConfig"
        _positive(own, "page_size", self.page_size)
        _positive(own, "num_pages", self.num_pages)
        _positive(own, "kv_cache_memory", self.kv_cache_memory)
        if self.idle_cache_pages is not None and self.idle_cache_pages < 0:
            raise ValueError(f"CacheConfig.idle_cache_pages={self.idle_cache_pages}; use 0 or more")
        for name in ("memory_utilization", "free_memory_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"CacheConfig.{name}={value}; use a fraction in (0, 1]")
        if self.host_kv_pages < 0:
            raise ValueError(f"CacheConfig.host_kv_pages={self.host_kv_pages}; use 0 (off) or more")


@dataclass(frozen=True)
class LogConfig:
    step_log: str | None = None
    """Append every step's cost features and measured seconds to this file (JSONL, engine/
    step_log.py), from which `loramux simulate calibrate --from-log` fits a profile; None: off."""


@dataclass(frozen=True)
class KVEventsConfig:
    """Where KV-cache events go (loramux/engine/kv_events.py): vLLM's ZeroMQ wire format."""

    endpoint: str = "tcp://127.0.0.1:5557"
    """Where the PUB socket binds (loopback unless you say otherwise; port 0 picks a free one)."""
    replay_endpoint: str | None = None
    """Where a ROUTER socket answers replay requests; None: no replay."""
    topic: str = ""
    buffer_steps: int = 10_000
    """Batches (one per step) kept for replay."""
    max_queue_size: int = 100_000
    """Batches waiting for the sending thread; past that new ones are dropped and counted."""

    def __post_init__(self) -> None:
        _positive("KVEventsConfig", "buffer_steps", self.buffer_steps)
        _positive("KVEventsConfig", "max_queue_size", self.max_queue_size)
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(
                    f"KVEventsConfig.{name}={value!r}; use tcp://HOST:PORT, ipc://PATH or inproc://"
                )


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 4
    """Device adapter slots, and so the most distinct adapters in one step (S2.1)."""
    max_cpu_loras: int | None = None
    """Adapters kept in host memory (LRU); None means max(max_loras, 32)."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted; slot tensors are sized for it."""
    max_lora_bytes: int | None = None
    """Optional budget in bytes for device-resident adapters (S2.6)."""

    def __post_init__(self) -> None:
        own = "LoRAConfig"
        _positive(own, "max_loras", self.max_loras)
        _positive(own, "max_lora_rank", self.max_lora_rank)
        _positive(own, "max_lora_bytes", self.max_lora_bytes)
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"LoRAConfig.max_cpu_loras={self.max_cpu_loras} < max_loras={self.max_loras}; "
                f"host memory holds every device-resident adapter, so use at least {self.max_loras}"
            )

    @property
    def cpu_slots(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else max(self.max_loras, 32)


@dataclass(frozen=True)
class ModelConfig:
    model: str
    """Path of a HF model directory (config.json, safetensors, tokenizer)."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on CUDA)."""
    device: str = "auto"
    """cpu, cuda, or auto."""
    max_model_len: int | None = None
    """Longest prompt plus output; None takes the model's own limit."""
    seed: int = 0
    """Seed for sampling without a per-request seed."""
    enforce_eager: bool = False
    """No CUDA graphs: decode steps run eagerly on CUDA too (vLLM's --enforce-eager). The CPU
    always runs eagerly."""
    chat_template: str | None = None
    """A Jinja chat template (its text) used instead of the tokenizer's own (vLLM's
    --chat-template); None: the tokenizer's."""
    generation_config: str = "auto"
    """vLLM's --generation-config: "auto" takes the default temperature, top_p, top_k, min_p and
    repetition_penalty of a request that sets none from the model's generation_config.json;
    "vllm" uses SamplingParams' own defaults."""
    skip_tokenizer_init: bool = False
    """vLLM's --skip-tokenizer-init: load no tokenizer; prompts are token ids and answers are read
    as token ids (their text is empty)."""
    override_generation_config: tuple[tuple[str, float], ...] = ()
    """vLLM's --override-generation-config: default temperature, top_p, top_k, min_p or
    repetition_penalty set here (a mapping is taken too), over generation_config.json's with
    "auto", alone with "vllm"."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "override_generation_config", _sampling_overrides(self.override_generation_config)
        )
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}; use auto, float32, bfloat16 or float16")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"ModelConfig.device={self.device!r}; use auto, cpu or cuda")
        _positive("ModelConfig", "max_model_len", self.max_model_len)
        if self.chat_template is not None:
            _check_template(self.chat_template)
        if self.generation_config not in ("auto", "vllm"):
            raise ValueError(
                f"ModelConfig.generation_config={self.generation_config!r}; use auto (the model's "
                "generation_config.json) or vllm (no model defaults)"
            )


DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's other names for dtypes
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _sampling_overrides(value: Any) -> tuple[tuple[str, float], ...]:
    """--override-generation-config's {field: number} as sorted pairs; ValueError names a field
    loramux does not take, or a value that is no number."""
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = sorted((str(k), v) for k, v in pairs)
    except (TypeError, ValueError):
        raise ValueError(
            'override_generation_config takes a JSON object, e.g. {"temperature": 0.5}'
        ) from None
    for k, v in pairs:
        if k not in SAMPLING_DEFAULT_FIELDS:
            raise ValueError(
                f"override_generation_config: {k!r} is not taken; loramux takes defaults for "
                f"{', '.join(SAMPLING_DEFAULT_FIELDS)} (a request's max_tokens bounds its length)"
            )
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"override_generation_config: {k} must be a number, not {v!r}")
    return tuple((k, int(v) if k == "top_k" else float(v)) for k, v in pairs)


def _check_template(text: str) -> None:
    """A chat template must be a Jinja template that parses (checked at start, not per request)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("ModelConfig.chat_template is empty; give a Jinja template, or None")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        raise ValueError(
            f"ModelConfig.chat_template is not a Jinja template: {e} (line {e.lineno})"
        ) from None


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    kv_events: KVEventsConfig | None = None
    """Publish KV-cache events over ZeroMQ; None: do not publish."""
    logs: LogConfig = field(default_factory=LogConfig)

    @classmethod
    def create(cls, model: str, *, kv_events: KVEventsConfig | None = None, **settings: Any) -> EngineConfig:
        """The one way from flat settings to an EngineConfig, used by `loramux serve`, `LLM`, the
        simulator and the benchmarks. Each keyword is a field of exactly one of ModelConfig,
        SchedulerConfig, CacheConfig, LoRAConfig and LogConfig (`setting_names()`); an unknown one is a
        TypeError naming it, so a new setting reaches every front end or fails loudly."""
        parts: dict[type, dict[str, Any]] = {part: {} for part in _PARTS}
        for name, value in settings.items():
            part = _OWNER.get(name)
            if part is None:
                raise TypeError(
                    f"{name!r} is not an engine setting; the settings are: {', '.join(sorted(_OWNER))}"
                )
            parts[part][name] = value
        return cls(
            ModelConfig(model, **parts[ModelConfig]),
            SchedulerConfig(**parts[SchedulerConfig]),
            CacheConfig(**parts[CacheConfig]),
            LoRAConfig(**parts[LoRAConfig]),
            kv_events,
            LogConfig(**parts[LogConfig]),
        )

    @staticmethod
    def setting_names() -> list[str]:
        return list(_OWNER)


_PARTS = (ModelConfig, SchedulerConfig, CacheConfig, LoRAConfig, LogConfig)
_OWNER = {f.name: part for part in _PARTS for f in fields(part) if f.name != "model"}
assert len(_OWNER) == sum(len(fields(p)) for p in _PARTS) - 1, "a setting name is used by two configs"


@dataclass(frozen=True)
class RuntimeInfo:
    """Values measured when the engine starts, kept apart from what the user configured."""

    num_pages: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    device: str
    dtype: str
    sampling_defaults: tuple[tuple[str, float], ...] = ()
    """(SamplingParams field, value) a request that sets the field takes from the model's
    generation_config.json (ModelConfig.generation_config "auto")."""
