"""How a token looks in OpenAI's logprobs: its decoded text and its raw bytes.

Boundary: a tokenizer and token ids in, strings and byte lists out. `text` is
the token decoded on its own (" world", never the byte-level "Ġworld"), so
`tokens`, `top_logprobs` and the chat API agree. `raw_bytes` undoes the
byte-level alphabet of GPT-2-style tokenizers, so a token that holds half of a
multi-byte character still reports its real bytes; other tokenizers report
the UTF-8 of the decoded text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


class TokenText:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer

    def text(self, token_id: int) -> str:
        if self.tok is None:  # no tokenizer: vLLM's placeholder
            return f"token_id:{token_id}"
        return self.tok.decode([token_id])

    def raw_bytes(self, token_id: int) -> list[int]:
        if self.tok is None:
            return list(self.text(token_id).encode("utf-8"))
        piece = self.tok.convert_ids_to_tokens(token_id)
        dec = _byte_decoder()
        if isinstance(piece, str) and piece and all(c in dec for c in piece):
            return [dec[c] for c in piece]
        return list(self.text(token_id).encode("utf-8"))

    def offsets(self, texts: list[str], start: int = 0) -> list[int]:
        """Character offset of each token's text when the texts are laid end to end."""
        out, at = [], start
        for t in texts:
            out.append(at)
            at += len(t)
        return out
