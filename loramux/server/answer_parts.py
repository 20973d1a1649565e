"""An answer's parts as its text streams: reasoning (--reasoning-parser), then text and tool calls
(--tool-call-parser, for tool_choice "auto"), for the APIs that stream them as items or blocks
(the Responses API, Anthropic's Messages API).

Boundary: text deltas in, (reasoning, text, calls) of each out; the parsers do the finding.
"""

from __future__ import annotations

from typing import Any

from loramux.server.reasoning_parsers import reasoning_stream
from loramux.server.tool_parsers import ToolParser


class AnswerParts:
    """Each delta split as it comes: reasoning first; what follows `</think>` goes on to the
    tool-call parser, which holds back what may begin a call and gives out calls whole."""

    def __init__(self, thinking: str | None, parser: ToolParser | None) -> None:
        self.thinking = reasoning_stream(thinking) if thinking is not None else None
        self.tools = parser.stream() if parser is not None else None

    def step(self, delta: str, final: bool) -> tuple[str, str, list[dict[str, Any]]]:
        reasoning, text, calls = "", delta, []
        if self.thinking is not None:
            parts = [self.thinking.feed(text), *([self.thinking.finish()] if final else [])]
            reasoning, text = "".join(p.reasoning for p in parts), "".join(p.content for p in parts)
        if self.tools is not None:
            steps = [self.tools.feed(text), *([self.tools.finish()] if final else [])]
            text, calls = "".join(s.content for s in steps), [c for s in steps for c in s.calls]
        return reasoning, text, calls
