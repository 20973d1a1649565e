"""Chat messages to prompt token ids, through the model's own chat template.

Boundary: a tokenizer and messages in, token ids out. The template is rendered
to text and encoded *without* the tokenizer's special tokens: templates such as
Llama's and Mistral's already write the BOS token, and encoding with special
tokens would add a second one (vLLM encodes chat prompts the same way).

What reaches the template is what vLLM gives it: the messages with their
`name`, `tool_calls` (arguments as objects, not JSON text) and `tool_call_id`,
the request's `tools`, `add_generation_prompt` or `continue_final_message`, and
the caller's `chat_template_kwargs` (e.g. Qwen3's `enable_thinking`).
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

DEFAULT_CHAT_TEMPLATE = (  # used when the tokenizer has none
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@functools.cache
def _reserved(cls: type) -> frozenset[str]:
    """apply_chat_template's named parameters (tools, tokenize, return_dict, ...) and the
    template's `messages`: chat_template_kwargs may not set them behind the request's back."""
    sig = inspect.signature(cls.apply_chat_template)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset({n for n, p in sig.parameters.items() if p.kind in named and n != "self"} | {"messages"})


def check_template_kwargs(tokenizer: Any, kwargs: dict[str, Any]) -> None:
    """ValueError if chat_template_kwargs set one of apply_chat_template's own arguments."""
    clash = sorted(_reserved(type(tokenizer)) & set(kwargs))
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(clash)}; use the request's own field")


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """The prompt ids for `messages`: ending with the assistant's turn (add_generation_prompt), or
    with the last message left open for the model to continue (continue_final_message). ValueError
    names what is wrong when the options clash or the template cannot render them. `chat_template`
    replaces the tokenizer's (vLLM's LLM.chat argument)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "add_generation_prompt and continue_final_message cannot both be true; set "
            "add_generation_prompt to false to continue the last message"
        )
    if continue_final_message and not messages:
        raise ValueError("continue_final_message needs a last message to continue")
    extra = dict(chat_template_kwargs or {})
    check_template_kwargs(tokenizer, extra)
    conversation = [_for_template(m, i) for i, m in enumerate(messages)]
    template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tools=tools or None,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **extra,
        )
    except Exception as e:
        raise ValueError(f"cannot apply the chat template to these messages: {e}") from e
    return list(tokenizer.encode(text, add_special_tokens=False))


def _for_template(message: dict[str, Any], i: int) -> dict[str, Any]:
    """A message as templates read it: a tool call's `arguments`, sent as JSON text by OpenAI's
    clients, parsed to an object (Llama's and Qwen's templates write it with `tojson`), as vLLM
    does."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    parsed = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(
                f"messages[{i}].tool_calls[{j}] needs a function with a name, as "
                '{"type": "function", "function": {"name": ..., "arguments": "{...}"}}'
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({e.msg}); "
                    "send the arguments as a JSON object in a string"
                ) from None
        parsed.append({**call, "function": {**fn, "arguments": args}})
    return {**message, "tool_calls": parsed}
