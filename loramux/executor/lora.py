"""Batched multi-adapter LoRA: PEFT adapters on disk, host copies, device slots, and the compute.

Boundary: this module reads and checks PEFT adapter directories, keeps host
copies, copies them into device slots when told to, and adds each token's own
adapter delta during the forward. It decides nothing: the control plane's
`AdapterPlan` says what to read, copy and drop.

Layout of one wrapped linear (in -> out) with S slots and max rank R:

    A  [S, R, in]    rows [:r] of slot s hold the adapter's A (rank r)
    Bt [S, R, out]   rows [:r] hold B^T already multiplied by the scaling
    ranks[s] = r     (0: the adapter in slot s does not touch this module)

A step's tokens arrive grouped by slot (the runner sorts them), and only the
r real rows of a slot are used: no compute on padding ranks, and rows of
base-model tokens get nothing. Two paths:

    prefill chunks (long segments), one matmul pair per segment:
        y[s:e] += (x[s:e] @ A[slot, :r].T) @ Bt[slot, :r]
    decode rows (short segments), grouped by rank, two batched matmuls per rank:
        y[rows] += bmm(bmm(x[rows], A[slots, :r].T), Bt[slots, :r])

The decode path reads the slot buffers in place whenever it can, since copying
every row's A and B^T out of them (tens of megabytes a step) costs more than the
matmuls. A rank's rows are split so that no group holds a slot twice (an
adapter's second decode row goes to a second group). Rows and slots both
consecutive: plain views. Slots spread over a window at most twice their
number: the rows' inputs are scattered into that window (zeros elsewhere) and
the bmm runs over a view of the window's slots. Otherwise (sparse slots) the
rows' A and B^T are gathered, and the copy is kept while the layout holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from loramux.executor.vocab_adapters import (
    AdapterEmbedding,
    AdapterHead,
    VocabSpec,
    VocabWeights,
    parse_vocab_parts,
    read_vocab_parts,
)

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A\.weight|B\.weight|magnitude_vector)$"
)
# Every field of PEFT's LoraConfig (0.21, 0.22) and what loramux does with it (docs/vllm-compat.md has the
# table). Served: applied exactly as PEFT applies it, or without effect once trained (dropout, the
# initialisation of weights that are then saved, metadata). Refused when set, with the reason and
# the fix. A field in neither set, with a value, is refused too: it may change outputs.
SERVED_FIELDS = {
    "r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "bias", "use_dora",
    "modules_to_save", "trainable_token_indices", "alora_invocation_tokens",
    "init_lora_weights", "eva_config", "runtime_config", "ensure_weight_tying", "qalora_group_size",
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "megatron_core",
}  # fmt: skip
REFUSED_FIELDS = {
    "layer_replication": "layer_replication builds a deeper model than the base; loramux serves the "
    "base model's layers only: train without layer_replication",
    "lora_bias": "a bias on LoRA's B (lora_bias) is not supported; train with lora_bias=false",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 Conv1D) do not fit Llama-family models",
    "use_qalora": "QA-LoRA (use_qalora) pools its input in groups, which loramux does not do; train a "
    "plain LoRA adapter",
    "target_parameters": "LoRA on parameters (target_parameters, e.g. MoE experts) is not supported; "
    "target the linear layers instead",
    "megatron_config": "Megatron-parallel adapters (megatron_config) are not supported; save a plain "
    "LoRA adapter",
    "loftq_config": "LoftQ adapters expect LoftQ's quantized base weights, not the base model's",
    "corda_config": "CorDA adapters expect CorDA's residual base weights, not the base model's",
    "lora_ga_config": "LoRA-GA adapters expect LoRA-GA's modified base weights, not the base model's",
    "astra_config": "Astra adapters expect Astra's residual base weights, not the base model's",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported; train a plain LoRA adapter",
    "arrow_config": "Arrow routing (arrow_config) mixes adapters per token, which loramux does not do",
    "kasa_config": "KaSA (kasa_config) is not supported; train a plain LoRA adapter",
    "velora_config": "VeLoRA (velora_config) is not supported; train a plain LoRA adapter",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported; train a plain LoRA adapter",
}
# Initialisations that change the base weights: the adapter is trained against a residual model.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "astra")

Module = tuple[int, str]  # (layer index, projection name)


@dataclass(frozen=True)
class AdapterSpec:
    """What a PEFT adapter directory holds, checked against the model."""

    path: str
    version: str  # content digest of config + weights
    rank: int  # the largest rank of any module
    nbytes: int  # bytes once loaded at the model's dtype
    modules: dict[Module, tuple[int, float]] = field(repr=False)  # -> (rank, scaling)
    dora: bool = False  # DoRA: each module also has a magnitude vector
    vocab: VocabSpec | None = None  # embedding LoRA, trained tokens, a trained lm_head
    invocation: tuple[int, ...] = ()  # activated LoRA: it applies from the last occurrence of these on


@dataclass
class HostAdapter:
    """An adapter's weights in host memory: A, scaled B^T and (DoRA) the magnitude per module."""

    spec: AdapterSpec
    weights: dict[Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    vocab: VocabWeights | None = None


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern rule: a key matches a module name's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def inspect_adapter(
    path: str | Path,
    num_layers: int,
    shapes: dict[str, tuple[int, int]],
    max_rank: int,
    elem_size: int,
    vocab: tuple[int, int, bool] = (0, 0, False),  # (vocab size, hidden size, tied lm_head)
) -> AdapterSpec:
    """Check a PEFT LoRA directory against the model; every refusal names the fix."""
    p = Path(path)
    cfg_file, weights_file = p / "adapter_config.json", p / "adapter_model.safetensors"
    if not p.is_dir():
        raise ValueError(f"adapter path {str(p)!r} is not a directory")
    if not cfg_file.is_file():
        raise ValueError(
            f"{str(p)!r} has no adapter_config.json; point at a PEFT LoRA directory "
            f"(adapter_config.json + adapter_model.safetensors)"
        )
    if not weights_file.is_file():
        if (p / "adapter_model.bin").is_file():
            raise ValueError(
                f"{str(p)!r} holds adapter_model.bin; loramux reads safetensors only. Convert with "
                f"PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise ValueError(f"{str(p)!r} has no adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    _check_config(cfg, p)
    tensors = _read_shapes(weights_file)
    linear = {k: s for k, s in tensors.items() if _KEY.match(k)}
    trained_bias = next((k for k in tensors if k.endswith(".bias") and k not in linear), None)
    if trained_bias is not None and cfg.get("bias", "none") != "none":
        raise ValueError(
            f"{str(p)!r}: bias={cfg['bias']!r} trained the base model's biases ({trained_bias}), which "
            f"loramux does not serve per adapter; train with bias='none'"
        )
    rest = {k: s for k, s in tensors.items() if k not in linear}
    parts = parse_vocab_parts(rest, cfg, p, *vocab, max_rank=max_rank, scaling=partial(_scaling, cfg))
    modules = _collect_modules(linear, cfg, p, num_layers, shapes, max_rank) if linear or not parts else {}
    rank = max([r for r, _ in modules.values()] + [parts.embed[0] if parts and parts.embed else 0])
    dora = bool(cfg.get("use_dora"))
    nbytes = sum((r + dora) * sum(shapes[m]) for (_, m), (r, _) in modules.items())
    nbytes = (nbytes + (parts.nbytes(vocab[0], vocab[1]) if parts else 0)) * elem_size
    digest = _digest(cfg_file.read_bytes(), weights_file.read_bytes())
    invocation = tuple(int(t) for t in cfg.get("alora_invocation_tokens") or ())
    if invocation and (dora or parts is not None):
        raise ValueError(
            f"{str(p)!r}: activated LoRA (alora_invocation_tokens) with DoRA or vocabulary parts is not "
            f"supported; an aLoRA adapter may hold plain LoRA on the projections only"
        )
    return AdapterSpec(str(p), digest, rank, nbytes, modules, dora, parts, invocation)


def _digest(config: bytes, weights: bytes) -> str:
    """The adapter's content version: it names its prefix-cache namespace (S5.1)."""
    d = hashlib.blake2b(config, digest_size=12)
    d.update(weights)
    return d.hexdigest()


class AdapterChangedError(RuntimeError):
    """An adapter's files changed or vanished after it was registered."""


def _check_config(cfg: dict[str, Any], p: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{str(p)!r} is a {cfg.get('peft_type')} adapter; only LoRA adapters are supported")
    for key, value in cfg.items():
        if value in (None, False, [], {}, ""):
            continue
        if key in REFUSED_FIELDS:
            raise ValueError(f"{str(p)!r}: {key}={value!r}: {REFUSED_FIELDS[key]}")
        if key not in SERVED_FIELDS:
            raise ValueError(
                f"{str(p)!r}: {key}={value!r} is a LoraConfig field loramux does not know, and it may change "
                f"what the adapter computes, so the adapter is refused; save it without {key}"
            )
    if cfg.get("lora_alpha", 8) is None:
        raise ValueError(f"{str(p)!r}: lora_alpha is null; set it to the alpha the adapter was trained with")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise ValueError(
            f"{str(p)!r}: init_lora_weights={init!r} trains the adapter against modified base weights, "
            f"so on the base model it computes something else; convert it to a plain LoRA with PEFT "
            f"(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and set "
            f"init_lora_weights to true"
        )
    targets = cfg.get("target_modules") or []
    if isinstance(targets, list):  # a regex string is checked through the weight names instead
        targets = {t.rsplit(".", 1)[-1] for t in targets}  # PEFT may save full module paths
        if "lm_head" in targets:
            raise ValueError(
                f"{str(p)!r} puts LoRA on lm_head, which is not supported; train lm_head in full "
                f"(modules_to_save=['lm_head']) or leave it out of target_modules"
            )
        unknown = sorted(targets - set(TARGET_MODULES) - {"embed_tokens"})
        if unknown:
            raise ValueError(
                f"{str(p)!r} targets {unknown}, which the model does not have; "
                f"LoRA can target {', '.join(TARGET_MODULES)}"
            )


def _read_shapes(weights_file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {weights_file}: {e}; the file is corrupt or not safetensors") from e


def _collect_modules(
    tensors: dict[str, tuple[int, ...]],
    cfg: dict[str, Any],
    p: Path,
    num_layers: int,
    shapes: dict[str, tuple[int, int]],
    max_rank: int,
) -> dict[Module, tuple[int, float]]:
    found: dict[Module, dict[str, tuple[int, ...]]] = {}
    for key, shape in tensors.items():
        m = _KEY.match(key)
        assert m is not None  # the others are the vocabulary parts'
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)[0].upper()  # A, B or M
        if layer >= num_layers:
            raise ValueError(f"{str(p)!r} adapts layer {layer} but the model has {num_layers} layers")
        found.setdefault((layer, module), {})[ab] = shape
    if not found:
        raise ValueError(f"{str(p)!r} holds no LoRA weights")
    modules: dict[Module, tuple[int, float]] = {}
    dora = bool(cfg.get("use_dora"))
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != ({"A", "B", "M"} if dora else {"A", "B"}):
            what = "lora_A, lora_B or (use_dora) lora_magnitude_vector" if dora else "lora_A or lora_B"
            raise ValueError(
                f"{str(p)!r}: layer {layer} {module}: {what} missing, or a magnitude without use_dora"
            )
        fan_in, fan_out = shapes[module]
        if dora and ab["M"] != (fan_out,):
            raise ValueError(
                f"{str(p)!r}: layer {layer} {module} has a DoRA magnitude of shape {list(ab['M'])}; "
                f"the model needs [{fan_out}]"
            )
        r = ab["A"][0]
        if ab["A"] != (r, fan_in) or ab["B"] != (fan_out, r):
            raise ValueError(
                f"{str(p)!r}: layer {layer} {module} has A {list(ab['A'])} and B {list(ab['B'])}, but "
                f"the model needs A [r, {fan_in}] and B [{fan_out}, r]; was it trained for another model?"
            )
        if r > max_rank:
            raise ValueError(
                f"{str(p)!r} has rank {r} (layer {layer} {module}), above "
                f"max_lora_rank={max_rank}; restart with --max-lora-rank {r} or more"
            )
        modules[(layer, module)] = (r, _scaling(cfg, _module_name(layer, module), r))
    return modules


def _scaling(cfg: dict[str, Any], module_name: str, r: int) -> float:
    """PEFT's scaling of a module: its alpha (alpha_pattern, else lora_alpha, default 8) over r, or
    over sqrt(r) with rsLoRA."""
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module_name, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _module_name(layer: int, module: str) -> str:
    section = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{section}.{module}"


def read_adapter(spec: AdapterSpec, dtype: torch.dtype) -> HostAdapter:
    """Disk -> host memory: A and scaled B^T per module, at the model's dtype. The files must be
    the ones registered: their digest names the adapter's KV namespace, so weights that changed
    on disk would run under another version's cached KV. AdapterChangedError otherwise."""
    from safetensors.torch import load

    p = Path(spec.path)
    try:
        config, blob = (
            (p / "adapter_config.json").read_bytes(),
            (p / "adapter_model.safetensors").read_bytes(),
        )
    except OSError as e:
        raise AdapterChangedError(
            f"adapter files at {spec.path!r} can no longer be read ({e}); they were moved or deleted "
            f"after the adapter was loaded"
        ) from e
    if _digest(config, blob) != spec.version:
        raise AdapterChangedError(
            f"adapter files at {spec.path!r} changed after the adapter was loaded (content digest "
            f"{spec.version} expected); load the new files under a new name or unload and load again"
        )
    raw = load(blob)
    weights = {}
    for (layer, module), (_, scale) in spec.modules.items():
        stem = f"base_model.model.{_module_name(layer, module)}"
        a = raw[f"{stem}.lora_A.weight"].float()  # [r, in]
        bt = (raw[f"{stem}.lora_B.weight"].float() * scale).t()  # [r, out]
        mag = raw[f"{stem}.lora_magnitude_vector"].float() if spec.dora else None  # [out], kept in fp32
        weights[(layer, module)] = (a.to(dtype).contiguous(), bt.to(dtype).contiguous(), mag)
    vocab = read_vocab_parts(raw, spec.vocab, dtype) if spec.vocab is not None else None
    return HostAdapter(spec, weights, vocab)


SHORT_SEGMENT = 4  # segments up to this many rows (decodes) take the batched path
WINDOW_SLACK = 2  # a window of slots may span up to this many times the rows it serves


class _RankGroup(NamedTuple):
    """Short-segment rows whose adapter has rank `rank` in some module."""

    rank: int
    rows: torch.Tensor  # [N] rows of the batch
    # One of three ways to reach the rows' weights:
    span: tuple[int, int, int] | None  # (first row, first slot, N) when both are consecutive: views
    window: tuple[int, int] | None  # (first slot, end slot) holding every row's distinct slot: a view
    local: torch.Tensor | None  # [N] with a window: each row's slot minus the window's first slot
    slots: torch.Tensor | None  # [N] otherwise: the slot of each row, to gather from
    key: tuple[int, ...]  # (rank, *slots): steps with the same key gather the same weights


class LoRAState:
    """The current step's adapter layout, shared by every wrapped linear.

    Long segments (prefill chunks) get one matmul pair each. Rows of short
    segments (decodes) are grouped by their adapter's rank in the module and
    done together with two batched matmuls per rank, over views of the slot
    buffers (consecutive slots, or a window of slots) or a gather of each
    row's A and B^T rows.
    """

    def __init__(self, triton: bool = False) -> None:
        self.triton = triton  # the Triton shrink/expand kernels (CUDA path)
        self.blocks: torch.Tensor | None = None  # their block list for this step
        self.active = False
        self.long: list[tuple[int, int, int]] = []
        self._short_rows: list[int] = []
        self._short_slots: list[int] = []
        self._slot_set: tuple[int, ...] = ()
        self._groups: dict[tuple[int, ...], list[_RankGroup]] = {}
        self._device: torch.device | None = None
        self.segments: list[tuple[int, int, int]] = []
        self.slots_in_step: frozenset[int] = frozenset()
        self.head_slots: list[int | None] = []  # the slot of each row whose logits are computed
        self._row_slots: torch.Tensor | None = None

    def row_slots(self, num_rows: int, none: int) -> torch.Tensor:
        """[num_rows]: each row's slot, `none` for base-model rows (made once per step, on use)."""
        if self._row_slots is None or self._row_slots.shape[0] != num_rows:
            idx = [none] * num_rows
            for slot, s, e in self.segments:
                idx[s:e] = [slot] * (e - s)
            self._row_slots = torch.tensor(idx, device=self._device)
        return self._row_slots

    @contextmanager
    def batch(
        self, segments: list[tuple[int, int, int]], device: torch.device, blocks: torch.Tensor | None = None
    ) -> Iterator[None]:
        """The step's layout while the forward runs. blocks: the Triton path's block list, when the
        runner sent it to the device with the step's other inputs (else made here)."""
        assert not self.active, "LoRA batch contexts cannot nest"
        self.active = True
        self.long = [seg for seg in segments if seg[2] - seg[1] > SHORT_SEGMENT]
        rows, slots = [], []
        for slot, s, e in segments:
            if e - s <= SHORT_SEGMENT:
                rows.extend(range(s, e))
                slots.extend([slot] * (e - s))
        self._short_rows, self._short_slots = rows, slots
        self._slot_set = tuple(sorted(set(slots)))
        self._groups = {}
        self._device = device
        self.segments, self._row_slots = segments, None
        self.slots_in_step = frozenset(s for s, _, _ in segments)
        if self.triton:
            from loramux.executor.kernels.lora import lora_blocks

            self.blocks = blocks if blocks is not None else lora_blocks(segments, device)
            self.long, self._short_rows, self._short_slots = [], [], []
        try:
            yield
        finally:
            self.active = False
            self.long, self._short_rows, self._short_slots, self._groups = [], [], [], {}
            self.segments, self._row_slots, self.blocks = [], None, None

    def short_groups(self, ranks: list[int]) -> list[_RankGroup]:
        """The rank groups for a module whose slots have `ranks` (cached per distinct signature)."""
        if not self._short_rows:
            return []
        key = tuple(ranks[s] for s in self._slot_set)
        groups = self._groups.get(key)
        if groups is None:
            groups = self._groups[key] = self._make_groups(ranks)
        return groups

    def _make_groups(self, ranks: list[int]) -> list[_RankGroup]:
        # Group by rank, and within a rank by how many rows of the same slot came before, so that
        # no group holds a slot twice: a few adapters with two decodes each do not push the many
        # with one off the windowed path.
        by_key: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        seen: dict[int, int] = {}
        for row, slot in zip(self._short_rows, self._short_slots, strict=True):
            r = ranks[slot]
            if r:
                k = seen[slot] = seen.get(slot, -1) + 1
                rows, slots = by_key.setdefault((r, k), ([], []))
                rows.append(row)
                slots.append(slot)
        groups = []
        for (r, _), (rows, slots) in by_key.items():
            n, lo, hi = len(rows), min(slots), max(slots) + 1
            consecutive = rows == list(range(rows[0], rows[0] + n)) and slots == list(range(lo, hi))
            # A window with at most as many idle slots as used ones: a bmm over it reads under
            # twice the weights a gather would, and copies none.
            windowed = not consecutive and hi - lo <= WINDOW_SLACK * n
            dev = self._device
            groups.append(
                _RankGroup(
                    r,
                    torch.tensor(rows, device=dev),
                    (rows[0], slots[0], n) if consecutive else None,
                    (lo, hi) if windowed else None,
                    torch.tensor([s - lo for s in slots], device=dev) if windowed else None,
                    None if consecutive or windowed else torch.tensor(slots, device=dev),
                    (r, *slots),
                )
            )
        return groups


class LoRALinear(nn.Module):
    """A linear layer plus per-slot low-rank deltas; slot buffers are made on first use and
    deepened when an adapter of a higher rank arrives.

    A fused linear (qkv_proj, gate_up_proj) has several parts: part i owns output columns
    [cols[i], cols[i + 1]) and has its own A, ranks and columns of Bt (an adapter's q, k and v
    are separate PEFT modules, possibly of different ranks, or absent):

        A  [parts, S, R, in]    Bt [S, R, out] (part i's B^T in its own columns)
    """

    def __init__(
        self,
        base: nn.Linear,
        state: LoRAState,
        num_slots: int,
        max_rank: int,
        parts: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.num_slots, self.max_rank = num_slots, max_rank
        self.in_features, self.out_features = base.in_features, base.out_features
        widths = parts or [self.out_features]
        assert sum(widths) == self.out_features, (widths, self.out_features)
        self.cols = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.ranks = [[0] * num_slots for _ in widths]  # [part][slot]
        self.rank_tensor: torch.Tensor | None = None  # [parts, S] on the device, for the Triton kernels
        self.A: torch.Tensor | None = None
        self.Bt: torch.Tensor | None = None
        # Gathered A/B^T rows of recent decode layouts: a running batch keeps its layout for many
        # steps, so the gather (megabytes per module) is done once, not every step.
        self._gathered: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        # DoRA: per slot, the magnitude over the row norm of W + s.BA (computed at load) scales the
        # output: y = g * (W x + s.BAx) + b = g * y_lora + (1 - g) * b. Row num_slots is the identity
        # (base rows and plain LoRA slots); made on the first DoRA load.
        self.dora_slots: set[int] = set()
        self.dora_scale: torch.Tensor | None = None  # [S + 1, out]
        self.dora_shift: torch.Tensor | None = None  # [S + 1, out], (1 - g) * b, when W has a bias
        self._w_sq: torch.Tensor | None = None  # |W_i|^2 per output row, for the DoRA norms

    def load(
        self,
        slot: int,
        a: torch.Tensor,
        bt: torch.Tensor,
        magnitude: torch.Tensor | None = None,
        part: int = 0,
    ) -> None:
        self._gathered.clear()  # slot contents change: no gathered copy stays valid
        r = a.shape[0]
        if self.A is None or self.A.shape[2] < r:
            self._grow(r)
        assert self.A is not None and self.Bt is not None
        c0, c1 = self.cols[part], self.cols[part + 1]
        self.A[part, slot, :r].copy_(a, non_blocking=True)
        self.Bt[slot, :r, c0:c1].copy_(bt, non_blocking=True)
        self.ranks[part][slot] = r
        self._set_rank(part, slot, r)
        if magnitude is not None:
            self._load_dora(slot, part, self.A[part, slot, :r], self.Bt[slot, :r, c0:c1], magnitude)

    @torch.no_grad()
    def _load_dora(
        self, slot: int, part: int, a: torch.Tensor, bt: torch.Tensor, magnitude: torch.Tensor
    ) -> None:
        c0, c1 = self.cols[part], self.cols[part + 1]
        w, b = self.base.weight, self.base.bias
        if self.dora_scale is None:
            self.dora_scale = torch.ones(
                self.num_slots + 1, self.out_features, dtype=w.dtype, device=w.device
            )
            if b is not None:
                self.dora_shift = torch.zeros_like(self.dora_scale)
        # PEFT's DoRA: the L2 norm over the input dimension of W + scaling * B A, per output row,
        # without making the out x in matrix: |W_i|^2 + 2 (W A^T)_i . sB_i + sB_i (A A^T) sB_i^T.
        if self._w_sq is None:
            self._w_sq = w.float().square().sum(1)
        w = w[c0:c1]
        a32, sb = a.float(), bt.float().t()  # [r, in], [out, r]
        cross = ((w.float() @ a32.t()) * sb).sum(1)
        ba_sq = ((sb @ (a32 @ a32.t())) * sb).sum(1)
        norm = (self._w_sq[c0:c1] + 2 * cross + ba_sq).clamp_min(0).sqrt()
        g = magnitude.to(w.device).float() / norm
        self.dora_scale[slot, c0:c1].copy_(g)
        if self.dora_shift is not None and b is not None:
            self.dora_shift[slot, c0:c1].copy_((1 - g) * b[c0:c1].float())
        self.dora_slots.add(slot)

    def _grow(self, rank: int) -> None:
        """Slot buffers as deep as the largest rank loaded into this module so far (at most
        max_rank): memory follows the adapters in use, not the largest one allowed."""
        w = self.base.weight
        depth = min(max(rank, 1), self.max_rank)
        A = torch.zeros(
            len(self.ranks), self.num_slots, depth, self.in_features, dtype=w.dtype, device=w.device
        )
        Bt = torch.zeros(self.num_slots, depth, self.out_features, dtype=w.dtype, device=w.device)
        if self.A is not None and self.Bt is not None:
            old = self.A.shape[2]
            A[:, :, :old].copy_(self.A)
            Bt[:, :old].copy_(self.Bt)
        self.A, self.Bt = A, Bt

    def _set_rank(self, part: int, slot: int, r: int) -> None:
        if self.state.triton:
            self._rank_tensor()[part, slot] = r

    def _rank_tensor(self) -> torch.Tensor:
        if self.rank_tensor is None:
            w = self.base.weight
            self.rank_tensor = torch.zeros(
                len(self.ranks), self.num_slots, dtype=torch.int32, device=w.device
            )
        return self.rank_tensor

    def allocate_full(self) -> None:
        """Slot buffers at max_rank and the rank tensor, made now: a CUDA graph captured after this
        reads them in place, and no later load reallocates them (no rank exceeds max_rank)."""
        if self.A is None or self.A.shape[2] < self.max_rank:
            self._grow(self.max_rank)
        self._rank_tensor()

    def clear(self, slot: int) -> None:
        """Every part of the slot off (loading an adapter clears the slot first)."""
        for part, ranks in enumerate(self.ranks):
            if ranks[slot]:
                ranks[slot] = 0
                self._set_rank(part, slot, 0)
        if slot in self.dora_slots:
            self.dora_slots.discard(slot)
            assert self.dora_scale is not None
            self.dora_scale[slot].fill_(1.0)
            if self.dora_shift is not None:
                self.dora_shift[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        st = self.state
        if not st.active or self.A is None:
            return y
        assert self.Bt is not None
        if st.blocks is not None:  # Triton: every segment and part, decode or prefill, in one launch pair
            from loramux.executor.kernels.lora import lora_shrink_expand

            assert self.rank_tensor is not None
            lora_shrink_expand(x, self.A, self.Bt, self.rank_tensor, st.blocks, y, self.cols)
        else:
            for part, ranks in enumerate(self.ranks):
                c0, c1 = self.cols[part], self.cols[part + 1]
                whole = c0 == 0 and c1 == self.out_features
                self._add(x, y if whole else y[:, c0:c1], part, ranks)
        if self.dora_slots and not self.dora_slots.isdisjoint(st.slots_in_step):
            idx = st.row_slots(y.shape[0], self.num_slots)  # DoRA rows: one scale (and shift)
            y.mul_(self.dora_scale.index_select(0, idx))  # type: ignore[union-attr]
            if self.dora_shift is not None:
                y.add_(self.dora_shift.index_select(0, idx))
        return y

    def _add(self, x: torch.Tensor, y: torch.Tensor, part: int, ranks: list[int]) -> None:
        """The torch path: y (this part's columns) += each row's delta."""
        st = self.state
        assert self.A is not None and self.Bt is not None
        c0, c1 = self.cols[part], self.cols[part + 1]
        A, Bt = self.A[part], self.Bt[:, :, c0:c1]  # [S, R, in], [S, R, out_part]
        for slot, s, e in st.long:  # prefill chunks: one matmul pair per segment
            r = ranks[slot]
            if r:
                y[s:e].addmm_(x[s:e] @ A[slot, :r].t(), Bt[slot, :r])
        for g in st.short_groups(ranks):  # decodes: two batched matmuls per rank
            r = g.rank
            if g.span is not None:
                row, slot, n = g.span
                a, bt = A[slot : slot + n, :r], Bt[slot : slot + n, :r]  # views: [n, r, in], [n, r, out]
                t = torch.bmm(x[row : row + n].unsqueeze(1), a.transpose(1, 2))  # [n, 1, r]
                y[row : row + n] += torch.bmm(t, bt).squeeze(1)  # [n, out]
            elif g.window is not None:
                lo, hi = g.window
                assert g.local is not None
                xs = x.new_zeros(hi - lo, x.shape[1])  # idle slots see zero input, their output is unused
                xs.index_copy_(0, g.local, x.index_select(0, g.rows))
                t = torch.bmm(xs.unsqueeze(1), A[lo:hi, :r].transpose(1, 2))  # [W, 1, r]
                out = torch.bmm(t, Bt[lo:hi, :r]).squeeze(1)  # [W, out]
                y.index_add_(0, g.rows, out.index_select(0, g.local))
            else:
                a, bt = self._gather(g, part, A, Bt)  # [N, r, in], [N, r, out]
                t = torch.bmm(x.index_select(0, g.rows).unsqueeze(1), a.transpose(1, 2))  # [N, 1, r]
                y.index_add_(0, g.rows, torch.bmm(t, bt).squeeze(1))

    def _gather(
        self, g: _RankGroup, part: int, A: torch.Tensor, Bt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (part, *g.key)
        got = self._gathered.get(key)
        if got is None:
            if len(self._gathered) >= 4 * len(self.ranks):  # a handful of layouts (one per rank, usually)
                self._gathered.clear()
            r = g.rank
            assert g.slots is not None
            got = self._gathered[key] = (
                A[:, :r].index_select(0, g.slots),
                Bt[:, :r].index_select(0, g.slots),
            )
        return got


class LoRASlots:
    """The wrapped linears of a model, and copying host adapters into their slots."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, triton: bool = False) -> None:
        from loramux.executor.models.llama import FUSED

        self.state = LoRAState(triton)
        self.embedding = AdapterEmbedding(model.model.embed_tokens, self.state)  # type: ignore[union-attr]
        self.head = AdapterHead(model.lm_head, self.state)  # type: ignore[arg-type]
        model.model.embed_tokens, model.lm_head = self.embedding, self.head  # type: ignore[union-attr]
        self.layers: dict[tuple[int, str], LoRALinear] = {}  # (layer, linear's name)
        # Slots with an embedding adapter or DoRA: their paths pick rows on the host, so a step that
        # uses one runs eagerly, not in a CUDA graph.
        self.host_side_slots: set[int] = set()
        self.parts: dict[Module, tuple[LoRALinear, int]] = {}  # (layer, PEFT module) -> (linear, part)
        for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr]
            for parent in (layer.self_attn, layer.mlp):
                for name, base in list(parent.named_children()):
                    if not isinstance(base, nn.Linear):
                        continue
                    modules = FUSED.get(name, (name,))
                    widths = None
                    if len(modules) > 1:
                        widths = parent.qkv_sizes if name == "qkv_proj" else [base.out_features // 2] * 2
                    wrapped = LoRALinear(base, self.state, num_slots, max_rank, widths)
                    setattr(parent, name, wrapped)
                    self.layers[(i, name)] = wrapped
                    for part, module in enumerate(modules):
                        self.parts[(i, module)] = (wrapped, part)

    def load(self, adapter: HostAdapter, slot: int) -> None:
        self.embedding.load(slot, adapter.vocab)
        self.head.load(slot, adapter.vocab)
        for layer in self.layers.values():
            layer.clear(slot)
        for key, (layer, part) in self.parts.items():
            w = adapter.weights.get(key)
            if w is not None:
                layer.load(slot, *w, part=part)
        host_side = slot in self.embedding.parts or any(slot in x.dora_slots for x in self.layers.values())
        (self.host_side_slots.add if host_side else self.host_side_slots.discard)(slot)

    def clear(self, slot: int) -> None:
        self.embedding.load(slot, None)
        self.head.load(slot, None)
        for layer in self.layers.values():
            layer.clear(slot)
        self.host_side_slots.discard(slot)

    def allocate_full(self) -> None:
        """Every wrapped linear's slot buffers at max_rank, for CUDA graphs (see LoRALinear's)."""
        for layer in self.layers.values():
            layer.allocate_full()
