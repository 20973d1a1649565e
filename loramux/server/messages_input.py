"""Anthropic's Messages API, its input: the request bodies, and the chat request one amounts to.

Boundary: a `MessagesRequest` (or `CountTokensRequest`) in, the body of a chat completions request
out (`chat_body`, `chat_messages`), with 400s naming what loramux does not take; no engine, no
answer (messages.py makes those).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ConfigDict, Field

from loramux.server.protocol import APIError, _Request


class MessagesRequest(_Request):
    """Anthropic's body; vLLM's sampling extras (seed, min_p, ...) ride along to the chat request."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    service_tier: str | None = None


class CountTokensRequest(_Request):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


def _refuse(param: str, message: str) -> None:
    raise APIError(400, message, param=param)


def _text(content: Any, where: str) -> str:
    """Text content: a string, or text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        _refuse(where, f"{where} is a string or a list of content blocks")
    texts = []
    for block in content:
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            _refuse(
                where,
                f"{where} holds a {kind!r} block here; loramux takes text blocks (no images or documents)",
            )
        texts.append(block["text"])
    return "".join(texts)


def chat_messages(body: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    """The chat messages the Anthropic ones amount to: the system prompt first; a user turn's
    tool_result blocks as tool messages (before its text); an assistant turn's tool_use blocks as
    tool_calls and its thinking as reasoning."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system, "system")})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            _refuse(
                f"{where}.role",
                f"{where}.role is {role!r}; messages are 'user' or 'assistant' (system goes in system)",
            )
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            _refuse(f"{where}.content", f"{where}.content is a string or a list of content blocks")
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        thinking: list[str] = []
        for j, b in enumerate(blocks):
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "tool_result" and role == "user" and isinstance(b.get("tool_use_id"), str):
                result = _text(b.get("content", ""), f"{where}.content[{j}].content")
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": result})
            elif kind == "tool_use" and role == "assistant" and isinstance(b.get("name"), str):
                arguments = json.dumps(b.get("input") or {})
                calls.append(
                    {
                        "id": b.get("id"),
                        "type": "function",
                        "function": {"name": b["name"], "arguments": arguments},
                    }
                )
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                thinking.append(b.get("thinking") or "")
            else:
                _refuse(
                    f"{where}.content[{j}]",
                    f"{where}.content[{j}] is a {kind!r} block loramux does not take in a {role} turn; send "
                    "text, tool_use (assistant) or tool_result (user) blocks",
                )
        if text or calls or thinking or not blocks:
            msg: dict[str, Any] = {"role": role, "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning"] = "".join(thinking)
            out.append(msg)
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Anthropic's client tools as chat's function tools (None: no tools)."""
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("name"), str)
            or t.get("type") not in (None, "custom")
        ):
            _refuse(
                f"tools[{i}]",
                f"tools[{i}] is not a client tool ({{'name', 'description', 'input_schema'}}); server tools "
                "(web search, code execution, ...) are not served by loramux",
            )
        fn = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: dict[str, Any] | None) -> tuple[Any, bool]:
    """(chat's tool_choice, parallel_tool_calls) of Anthropic's tool_choice."""
    if choice is None:
        return None, True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    _refuse(
        "tool_choice", 'tool_choice is {"type": "auto" | "any" | "none"} or {"type": "tool", "name": ...}'
    )
    raise AssertionError  # unreachable


def chat_body(body: MessagesRequest) -> dict[str, Any]:
    """The chat completions body `body` amounts to."""
    thinking = (body.thinking or {}).get("type")
    if thinking not in (None, "enabled", "adaptive", "disabled"):
        _refuse("thinking", f"thinking type {thinking!r}: send 'enabled', 'adaptive' or 'disabled'")
    if body.max_tokens < 1:
        _refuse("max_tokens", f"max_tokens={body.max_tokens}; send 1 or more")
    extra = body.model_extra or {}
    for name in ("n", "best_of", "logprobs", "top_logprobs", "prompt_logprobs"):
        if extra.get(name) not in (None, False, 1, 0):
            _refuse(name, f"{name} has no place in a Message (one answer, no logprobs); leave it out")
    messages = chat_messages(body)
    prefill = messages[-1]["role"] == "assistant"  # the answer continues the last assistant turn
    choice, parallel = _tool_choice(body.tool_choice)
    chat: dict[str, Any] = {k: v for k, v in extra.items() if k not in ("container", "mcp_servers")}
    if thinking is not None:  # the switch Qwen3's template reads; its budget is not enforced
        kwargs = chat.get("chat_template_kwargs") or {}
        chat["chat_template_kwargs"] = {"enable_thinking": thinking != "disabled", **kwargs}
    chat.update(
        model=body.model,
        messages=messages,
        max_tokens=body.max_tokens,
        stream=body.stream,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        parallel_tool_calls=parallel,
    )
    for key, value in (
        ("stop", body.stop_sequences),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
        ("top_k", body.top_k),
        ("tools", chat_tools(body.tools)),
        ("tool_choice", choice if body.tools else None),
        ("user", (body.metadata or {}).get("user_id")),
    ):
        if value is not None:
            chat[key] = value
    return chat
