"""LLM: offline batch generation over the engine, with vLLM's call shape.

Boundary: a thin front end. It registers the adapters named by `LoRARequest`s
on first use, queues every prompt, steps the engine until all are done, and
returns the outputs in prompt order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from loramux.config import EngineConfig, KVEventsConfig
from loramux.engine.chat import render_chat
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.outputs import RequestOutput
from loramux.lora_request import LoRARequest
from loramux.sampling_params import SamplingParams
from loramux.vllm_args import vllm_settings

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """Offline generation, vLLM's `LLM`: `LLM(model, **settings)`, where the settings are the
    engine's (`EngineConfig.setting_names()`: max_loras, max_num_seqs, page_size, num_pages,
    max_queue_len, dtype, device, ...) or vLLM's names for them (enable_lora=True,
    gpu_memory_utilization, block_size, tensor_parallel_size=1, ...: loramux/vllm_args.py), and
    `kv_events` a `KVEventsConfig`; an unknown one is a TypeError naming it."""

    def __init__(
        self,
        model: str,
        *,
        engine: LLMEngine | None = None,
        kv_events: KVEventsConfig | None = None,
        **settings: Any,
    ) -> None:
        if engine is None:
            settings = vllm_settings(settings, set(EngineConfig.setting_names()))  # vLLM's names
            engine = LLMEngine(EngineConfig.create(model, kv_events=kv_events, **settings))
        self.engine = engine
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the model's generation_config.json defaults (temperature,
        top_p, top_k, repetition_penalty), used when generate() is given none."""
        return SamplingParams(**dict(self.engine.runtime.sampling_defaults))  # type: ignore[arg-type]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or a dict, as vLLM's: {"prompt": ...} or
        {"prompt_token_ids": [...]}, with an optional "cache_salt"). `priority`, one per prompt,
        needs the `priority` policy (vLLM's priority scheduling: smaller goes first)."""
        plist, salts = _as_prompt_list(prompts)
        n = len(plist)
        params = _broadcast(
            sampling_params or self.get_default_sampling_params(), n, "sampling_params", SamplingParams
        )
        loras = _broadcast(lora_request, n, "lora_request", LoRARequest)
        priorities = [0] * n if priority is None else list(priority)
        if len(priorities) != n:
            raise ValueError(f"priority has {len(priorities)} values for {n} prompts; give one per prompt")
        for lora in {lr for lr in loras if lr is not None}:
            self.engine.ensure_lora(lora)
        for spec in {p.structured_outputs for p in params if p.structured_outputs is not None}:
            self.engine.grammar_future(spec).result()  # a grammar that cannot compile: ValueError now
        groups: list[list[str]] = []
        try:
            for prompt, p, lora, salt, prio in zip(plist, params, loras, salts, priorities, strict=True):
                self._counter += 1
                name = lora.lora_name if lora else None
                rid = f"llm-{self._counter}"
                groups.append(self.engine.add_request_n(rid, prompt, p, name, cache_salt=salt, priority=prio))
        except Exception:  # one prompt refused: none of this call's requests may stay queued
            for rid in (r for ids in groups for r in ids):
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        owner = {rid: i for i, ids in enumerate(groups) for rid in ids}
        left = [len(ids) for ids in groups]
        bar = tqdm(total=n, desc="generating", unit="req", disable=not use_tqdm or n < 2)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    left[owner[out.request_id]] -= 1
                    if not left[owner[out.request_id]]:
                        bar.update(1)
        bar.close()
        if self.engine.step_log is not None:
            self.engine.step_log.flush()
        return [_merge_samples([done[rid] for rid in ids]) for ids in groups]

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered with the model's chat
        template (encoded without special tokens: the template writes its own BOS), as vLLM's;
        `continue_final_message`, `tools` and `chat_template_kwargs` reach the template as there, and
        `chat_template` (its text) replaces the model's for this call."""
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("this model has no tokenizer, so chat is unavailable; use generate()")
        one = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if one else messages
        prompts = [
            render_chat(
                tok,
                list(c),  # type: ignore[arg-type]
                add_generation_prompt,
                continue_final_message,
                tools,
                chat_template_kwargs,
                chat_template,
            )
            for c in convs
        ]
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)


_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})  # of vLLM's prompt dicts


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> tuple[list[str | list[int]], list[str | None]]:
    """The prompts as text or token ids, and each one's cache_salt (a dict prompt's, else None)."""
    if isinstance(prompts, str | dict) or (
        isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
    ):
        prompts = [prompts]  # type: ignore[list-item]
    out: list[str | list[int]] = []
    salts: list[str | None] = []
    for p in prompts:  # type: ignore[union-attr]
        if isinstance(p, dict):
            other = sorted(set(p) - _PROMPT_KEYS)
            if other:
                raise ValueError(
                    f"a prompt dict holds {', '.join(map(repr, other))}, which loramux does not take "
                    f"(it serves text: no multi_modal_data); use 'prompt' or 'prompt_token_ids', and "
                    f"optionally 'cache_salt'"
                )
            if "prompt_token_ids" in p:
                out.append(list(p["prompt_token_ids"]))
            elif "prompt" in p:
                out.append(p["prompt"])
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(p, str | list):
            out.append(p)  # type: ignore[arg-type]
        else:
            raise TypeError(f"a prompt must be text, a list of token ids or a dict, not {type(p).__name__}")
        salts.append(p.get("cache_salt") if isinstance(p, dict) else None)
    return out, salts


def _broadcast(value: Any, n: int, what: str, kind: type) -> list[Any]:
    """One `kind` (or None, for lora_request) per prompt: one given for all, or one each. A
    value of another type is a TypeError naming it (e.g. vLLM's positional use_tqdm)."""
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for {n} prompts; give one, or one per prompt")
        values = list(value)
    else:
        values = [value] * n
    for v in values:
        if not isinstance(v, kind) and not (v is None and kind is LoRARequest):
            hint = "; pass use_tqdm by keyword" if isinstance(v, bool) else ""
            raise TypeError(f"{what} takes a {kind.__name__} or a list of them, not {type(v).__name__}{hint}")
    return values


def _merge_samples(outs: list[RequestOutput]) -> RequestOutput:
    """The n samples of one prompt as one output with n completions (index 0..n-1), as vLLM's."""
    if len(outs) == 1:
        return outs[0]
    first = outs[0]
    comps = [dataclasses.replace(o.outputs[0], index=i) for i, o in enumerate(outs)]
    return dataclasses.replace(first, request_id=first.request_id.rsplit("-", 1)[0], outputs=comps)
