"""Incremental detokenization and stop strings.

Boundary: token ids in, text out, one request at a time. Decoding uses a
sliding window (the prefix/read offsets of TGI and vLLM) so each new token
costs the same whatever the output length, and a token that ends inside a
multi-byte character waits for the next one. For streaming, `take_delta`
holds back the last len(longest stop string) - 1 characters until they can
no longer start a stop string (as vLLM does), so streamed deltas always join
to the final text, stop string or not.
"""

from __future__ import annotations

from typing import Any

_WINDOW = 6  # tokens of context decoded before the new ones


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        skip_special_tokens: bool,
        stop: tuple[str, ...],
        include_stop: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.include_stop = include_stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._sent = 0  # characters of `text` already handed out by take_delta

    def take_delta(self, final: bool) -> str:
        """The text not yet streamed, less what could still be the start of a stop string;
        everything once `final`."""
        end = len(self.text) if final else max(self._sent, len(self.text) - max(self._max_stop - 1, 0))
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    def add(self, token: int) -> tuple[str, str | None]:
        """Append `token`; return (new text, the stop string hit or None)."""
        if self.tokenizer is None:
            return "", None
        self.ids.append(token)
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = dec(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return "", None
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        before = len(self.text)
        self.text += new
        if self.stop:
            hit = self._find_stop(before)
            if hit is not None:
                stop_str, cut = hit
                self.text = self.text[:cut]
                return self.text[before:], stop_str
        return new, None

    def flush(self) -> str:
        """At the end: emit whatever is held back (a partial character decodes as U+FFFD), so the
        final text equals a one-shot decode of all the tokens."""
        if self.tokenizer is None or self.read_offset == len(self.ids):
            return ""
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = dec(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        new = full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += new
        return new

    def _find_stop(self, before: int) -> tuple[str, int] | None:
        """The earliest stop string that ends in the new text, and where the text is cut."""
        start = max(0, before - self._max_stop + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        return s, i + len(s) if self.include_stop else i
