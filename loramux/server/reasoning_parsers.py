"""Reasoning split from the answer: vLLM's `--reasoning-parser NAME`, for models that think in
`<think> ... </think>` before they answer (DeepSeek-R1 and its distills, Qwen3, QwQ).

Boundary: model text in (whole, or as deltas), (reasoning, content) out; no request, no engine.
- "deepseek_r1": everything before `</think>` is reasoning (the chat template may have written
  `<think>` into the prompt, so the answer need not open with it);
- "qwen3": an answer that opens with `<think>` reasons until `</think>`; one that does not is all
  content (Qwen3 with `enable_thinking: false`, whose template writes an empty think block into
  the prompt). Qwen3's 2507 thinking models, whose template opens the block, want deepseek_r1.
An answer cut before `</think>` is all reasoning. A leading `<think>` is dropped. Each answer is
known to be reasoning or content from its first characters, so both stream as they come; only
text that may be the start of `<think>` or `</think>` waits for the next piece. The whole answer
is its stream put together (both run `ReasoningStream`).
"""

from __future__ import annotations

from dataclasses import dataclass

from loramux.server.text_stream import PieceStream

OPEN, CLOSE = "<think>", "</think>"


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""

    def __add__(self, later: Split) -> Split:
        return Split(self.reasoning + later.reasoning, self.content + later.content)


class ReasoningStream(PieceStream[Split]):
    def __init__(self, opens_with_think: bool) -> None:
        super().__init__()
        self.opens_with_think = opens_with_think  # reasoning only after a leading <think>
        self.thinking: bool | None = None  # None: not known yet (blank, or maybe <think>)

    def _step(self, final: bool) -> Split:
        if self.thinking is None:
            start = self.held.lstrip()
            if not final and OPEN.startswith(start):
                return Split()  # blank so far, or maybe <think>
            opened = start.startswith(OPEN)
            self.held = start[len(OPEN) :] if opened else self.held
            self.thinking = opened or not self.opens_with_think
        if not self.thinking:
            text, self.held = self.held, ""
            return Split(content=text)
        at = self.held.find(CLOSE)
        if at >= 0:
            reasoning, rest = self.held[:at], self.held[at + len(CLOSE) :]
            self.held, self.thinking = "", False
            return Split(reasoning=reasoning, content=rest)
        return Split(reasoning=self.take(final, CLOSE))


PARSERS = {"deepseek_r1": False, "qwen3": True}  # name -> reasoning only after a leading <think>


def reasoning_stream(parser: str) -> ReasoningStream:
    return ReasoningStream(opens_with_think=PARSERS[parser])


def split(parser: str, text: str) -> Split:
    """A whole answer's reasoning and content: what its stream gives, put together."""
    return reasoning_stream(parser).step(text, final=True)
