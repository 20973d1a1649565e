"""Chat messages to prompt token ids, through the model's own chat template.

Boundary: a tokenizer and messages in, token ids out. The template is rendered
to text and encoded *without* the tokenizer's special tokens: templates such as
Llama's and Mistral's already write the BOS token, and encoding with special
tokens would add a second one (vLLM encodes chat prompts the same way).
"""

from __future__ import annotations

from typing import Any

DEFAULT_CHAT_TEMPLATE = (  # used when the tokenizer has none
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """The prompt ids for `messages` (ending with the assistant's turn unless told otherwise);
    ValueError if the template cannot render them."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as e:
        raise ValueError(f"cannot apply the chat template to these messages: {e}") from e
    return list(tokenizer.encode(text, add_special_tokens=False))
