"""The Responses API's request body (POST /v1/responses) and the chat request it amounts to.

Boundary: JSON shapes only. `ResponsesRequest` validates OpenAI's body; `chat_body` turns it
(instructions, input items, function tools, the text format, sampling fields and vLLM's extras)
into the body of a `ChatCompletionRequest`, which the chat route then runs. What loramux does not
do is refused by name with what to send instead (built-in tools, reasoning options, images, ...);
nothing is dropped without a word.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import ConfigDict

from loramux.server.protocol import APIError, _Request

# Chat completions fields the Responses API has no place for: refused, saying what to send.
_CHAT_ONLY = {
    "messages": "send input",
    "max_tokens": "send max_output_tokens",
    "max_completion_tokens": "send max_output_tokens",
    "response_format": "send text.format",
    "logprobs": 'send include ["message.output_text.logprobs"]',
    "n": "send one request per answer",
    "prompt_logprobs": "use /v1/completions or /v1/chat/completions for prompt logprobs",
    "return_token_ids": "use /v1/chat/completions for token ids",
}
# What `include` may ask for: logprobs, and reasoning's encrypted content, of which a model
# without a reasoning parser has none (so there is nothing to add).
_INCLUDES = ("message.output_text.logprobs", "reasoning.encrypted_content")
_PART_TYPES = ("input_text", "output_text", "text")


class ResponsesRequest(_Request):
    """OpenAI's Responses body; unknown fields go on to the chat request (vLLM's extras such
    as top_k, seed or stop ride along the same way)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: no effect (nothing to pad)
    store: bool = True
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a routing hint for cache hits: the prefix cache is shared
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    service_tier: str | None = None
    max_tool_calls: int | None = None

    def check(self) -> None:
        """APIError 400 naming each field loramux does not carry out."""
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            refuse(
                "reasoning",
                "reasoning options need a reasoning model and parser, which loramux does "
                "not have; leave reasoning out (chat_template_kwargs reach the chat template)",
            )
        if self.service_tier not in (None, "auto", "default"):
            refuse(
                "service_tier",
                f"service_tier {self.service_tier!r}: loramux serves every request "
                "alike; send 'auto' or 'default', or leave it out",
            )
        if self.max_tool_calls is not None:
            refuse(
                "max_tool_calls",
                "max_tool_calls is not supported; leave it out (parallel_tool_calls false allows one call)",
            )
        for item in self.include or []:
            if item not in _INCLUDES:
                refuse("include", f"include {item!r} is not supported; loramux can include {list(_INCLUDES)}")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            refuse("top_logprobs", f"top_logprobs={self.top_logprobs}; it must lie in [0, 20]")
        if self.top_logprobs and not self.logprobs:
            refuse(
                "top_logprobs",
                f"top_logprobs={self.top_logprobs} needs include "
                '["message.output_text.logprobs"]; add it or leave top_logprobs out',
            )
        for name in ("conversation", "prompt"):
            if (self.model_extra or {}).get(name) is not None:
                refuse(
                    name,
                    f"{name} objects are stored on OpenAI's side, which loramux does not have; "
                    "send the conversation as input (or use previous_response_id)",
                )
        for name, instead in _CHAT_ONLY.items():
            if name in (self.model_extra or {}):
                refuse(name, f"{name} is not a Responses API field; {instead}")

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])

    @property
    def output_format(self) -> dict[str, Any]:
        """text.format as the answer echoes it ({"type": "text"} unless the request sets one)."""
        return dict((self.text or {}).get("format") or {"type": "text"})


def refuse(param: str, message: str) -> None:
    raise APIError(400, message, param=param)


def chat_body(body: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completions body `body` amounts to, after `history` (the messages of the
    previous responses, oldest first): instructions as the first system message, then the
    history, then the new input."""
    body.check()
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + history
    messages += input_messages(body.input)
    chat: dict[str, Any] = {
        k: v for k, v in (body.model_extra or {}).items() if k not in ("conversation", "prompt")
    }
    chat.update(
        model=body.model,
        messages=messages,
        stream=body.stream,
        user=body.user or body.safety_identifier,
        parallel_tool_calls=body.parallel_tool_calls,
        logprobs=body.logprobs,
    )
    for key, value in (
        ("max_completion_tokens", body.max_output_tokens),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
        ("top_logprobs", body.top_logprobs if body.logprobs else None),
        ("response_format", _response_format(body.text)),
        ("truncate_prompt_tokens", -1 if body.truncation == "auto" else None),
    ):
        if value is not None:
            chat[key] = value
    if body.tools:
        chat["tools"] = [_chat_tool(t, i) for i, t in enumerate(body.tools)]
        chat["tool_choice"] = _chat_tool_choice(body.tool_choice)
    elif body.tool_choice not in (None, "none", "auto"):
        raise APIError(
            400, "tool_choice needs tools; send tools or leave tool_choice out", param="tool_choice"
        )
    return chat


def input_items(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as OpenAI lists it back (GET /v1/responses/{id}/input_items): items with ids,
    a string as one user message, text content as input_text parts (assistant: output_text)."""
    items: list[dict[str, Any]] = []
    for item in [{"role": "user", "content": given}] if isinstance(given, str) else given:
        kind = item.get("type", "message")
        if kind == "message":
            text = _text(item.get("content"), "input")
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            out = {"type": "message", "role": item.get("role"), "content": [{"type": part, "text": text}]}
            out.update(id=item.get("id") or f"msg_{uuid.uuid4().hex}", status="completed")
        else:
            prefix = "fc" if kind == "function_call" else "fco"
            out = {**item, "id": item.get("id") or f"{prefix}_{uuid.uuid4().hex}", "status": "completed"}
        items.append(out)
    return items


def input_messages(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: a string is one user message; messages keep their role and
    text; function calls (adjacent ones together) become an assistant message's tool_calls, and
    their outputs tool messages."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not given:
        raise APIError(400, "input is empty; send text or a list of input items", param="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(
                    400, f"{where}.role is {role!r}; send user, system, developer or assistant", param="input"
                )
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _string(item, "name", where),
                    "arguments": _string(item, "arguments", where),
                },
            }
            last = messages[-1] if messages else None
            if (
                last is not None
                and last["role"] == "assistant"
                and last.get("tool_calls")
                and i > 0
                and given[i - 1].get("type") == "function_call"
            ):
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append(
                {"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": text}
            )
        else:
            raise APIError(
                400,
                f"{where} is of type {kind!r}; loramux takes message, function_call and "
                "function_call_output items (send earlier turns as messages, or use previous_response_id)",
                param="input",
            )
    return messages


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be text or a list of text parts", param="input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _PART_TYPES or not isinstance(part.get("text"), str):
            raise APIError(
                400,
                f"{where}.content[{j}] is of type {kind!r}; loramux serves text models: send "
                '{"type": "input_text", "text": ...} parts',
                param="input",
            )
        parts.append(part["text"])
    return "".join(parts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key} must be a string", param="input")
    return value


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """text.format as chat's response_format (None: free text)."""
    unknown = sorted(set(text or {}) - {"format", "verbosity"})
    if unknown:
        raise APIError(400, f"text has unknown field(s) {unknown}; send text.format", param="text")
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise APIError(
                400,
                'text.format json_schema needs {"type": "json_schema", "name": ..., "schema": {...}}',
                param="text.format",
            )
        js = {"name": fmt.get("name", "answer"), "schema": fmt["schema"], "strict": fmt.get("strict")}
        return {"type": "json_schema", "json_schema": js}
    raise APIError(
        400,
        f"text.format type {fmt.get('type')!r} is not one of 'text', 'json_object', 'json_schema'",
        param="text.format",
    )


def _chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A Responses function tool (flat: name and parameters beside type) in chat's shape."""
    if tool.get("type") != "function":
        raise APIError(
            400,
            f"tools[{i}] is of type {tool.get('type')!r}: built-in tools run on OpenAI's side, which "
            'loramux does not have; send function tools, {"type": "function", "name": ..., '
            '"parameters": {...}}',
            param="tools",
        )
    if not isinstance(tool.get("name"), str):
        raise APIError(400, f"tools[{i}] needs a name", param="tools")
    fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any]:
    if choice is None or choice in ("none", "required", "auto"):
        return choice or "auto"  # "auto" needs the server's tool-call parser (checked with the chat)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(
        400,
        f'tool_choice {choice!r}: send "auto", "required" (a call to one of the tools), "none", or '
        '{"type": "function", "name": ...} (that function)',
        param="tool_choice",
    )
