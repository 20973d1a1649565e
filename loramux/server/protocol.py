"""OpenAI-compatible request bodies and the errors the API answers with.

Boundary: JSON shapes only. Bodies are validated with pydantic; every refusal
becomes an `APIError` that the app renders in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loramux.sampling_params import SamplingParams, StructuredOutputsParams


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx and 5xx answer has it."""

    error: ErrorDetail


# Fields OpenAI or vLLM define that loramux does not implement: refused by name, never ignored.
UNSUPPORTED_FIELDS = (
    "tools",  # chat only (declared there)
    "tool_choice",
    "suffix",
    "use_beam_search",
    "length_penalty",
    "return_tokens_as_token_ids",
    "logits_processors",
    "prompt_embeds",
    "kv_transfer_params",  # disaggregated prefill
    "echo",  # chat's (vLLM: repeat the last message); completions' is declared there
    "chat_template",  # per request: vLLM refuses it too unless --trust-request-chat-template
    "documents",
)


class _Request(BaseModel):
    """Request bodies are validated strictly: `true` is not a token id, `"5"` is not a count."""

    model_config = ConfigDict(strict=True)


class _ChatTemplateFields(_Request):
    """How the chat template renders messages (vLLM's chat extras), for chat and /tokenize alike."""

    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def template_options(self, default_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """These fields as `render_chat`'s keyword arguments; `default_kwargs` (the server's
        --default-chat-template-kwargs) under the request's own chat_template_kwargs."""
        return {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "tools": self.tools,
            "chat_template_kwargs": {**(default_kwargs or {}), **(self.chat_template_kwargs or {})},
        }


class _Sampling(_Request):
    """Fields completions and chat share (OpenAI's, plus vLLM's common extras)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None  # none (or ""): the base model, as vLLM takes it
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and this many alternatives
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens (-1: the limit)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    best_of: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    user: str | None = None
    return_token_ids: bool = False
    priority: int = 0  # vLLM's: with the priority policy, smaller goes first
    cache_salt: str | None = None  # vLLM's: cached KV is shared only among requests with this salt
    max_queue_time: float | None = None  # loramux: seconds it may wait to start; then 503 queue_timeout
    # structured output, any one form (server/structured.py)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        structured: StructuredOutputsParams | None = None,
        defaults: dict[str, float] | None = None,
    ) -> SamplingParams:
        """The body's sampling fields; `structured` is what server/structured.py made of its
        structured-output fields; `defaults` fill temperature, top_p, top_k, min_p and
        repetition_penalty where the body sets none (the model's generation_config.json)."""
        d = defaults or {}
        extra = self.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            if extra.get(name) not in (None, False, [], {}):
                raise APIError(
                    400, f"{name} is not supported by loramux; leave it out (docs/vllm-compat.md)", param=name
                )
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400,
                "stream_options applies to streamed answers only; set stream to true or leave "
                "stream_options out",
                param="stream_options",
            )
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(
                400,
                f"best_of={self.best_of} is not supported; leave it unset (or equal to n)",
                param="best_of",
            )
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise APIError(
                400, 'logit_bias keys must be token ids, e.g. {"50256": -100}', param="logit_bias"
            ) from None
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise APIError(
                400,
                f"guided_decoding_backend {self.guided_decoding_backend!r}: loramux compiles grammars "
                f"with xgrammar; leave it out or send 'xgrammar'",
                param="guided_decoding_backend",
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=d.get("temperature", 1.0) if self.temperature is None else self.temperature,
                top_p=d.get("top_p", 1.0) if self.top_p is None else self.top_p,
                top_k=int(d.get("top_k", 0)) if self.top_k is None else self.top_k,
                min_p=d.get("min_p", 0.0) if self.min_p is None else self.min_p,
                seed=self.seed,
                min_tokens=self.min_tokens,
                stop=tuple(stop),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                include_stop_str_in_output=self.include_stop_str_in_output,
                ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens,
                logprobs=logprobs,
                prompt_logprobs=self.prompt_logprobs,
                truncate_prompt_tokens=self.truncate_prompt_tokens,
                n=self.n,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=(
                    d.get("repetition_penalty", 1.0)
                    if self.repetition_penalty is None
                    else self.repetition_penalty
                ),
                logit_bias=bias,
                allowed_token_ids=self.allowed_token_ids,
                bad_words=tuple(self.bad_words or ()),
                max_queue_time=self.max_queue_time,
                structured_outputs=structured,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from e

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    @property
    def continuous_usage(self) -> bool:
        """vLLM's `continuous_usage_stats` (with include_usage): each chunk carries its choice's
        usage so far."""
        return self.include_usage and bool(self.stream_options.get("continuous_usage_stats"))  # type: ignore[union-attr]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: false encodes a text prompt without BOS and the like

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty; send text or token ids", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(_Request):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: the call it answers
    reasoning: str | None = None  # an assistant's earlier reasoning (vLLM's --reasoning-parser)
    reasoning_content: str | None = None  # the same, under its older name

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it: its text, and the fields set among name,
        tool_calls and tool_call_id (vLLM passes them on the same way); reasoning as
        `reasoning_content`, the name Qwen3's and DeepSeek's templates read."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        reasoning = self.reasoning if self.reasoning is not None else self.reasoning_content
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        return out

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(
                    400,
                    f"content part of type {part.get('type')!r} is not supported; send text",
                    param="messages",
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling, _ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # false: tool_choice "required" makes exactly one call
    include_reasoning: bool = True  # false: with --reasoning-parser, the reasoning is left out


class TokenizeRequest(_ChatTemplateFields):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class LoadLoRARequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    pinned: bool = False
    load_inplace: bool = False
    """vLLM's: replace the adapter loaded under lora_name (new weights, no gap in serving)."""


class UnloadLoRARequest(_Request):
    lora_name: str = Field(min_length=1)
