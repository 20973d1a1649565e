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
            split = self.thinking.step(text, final)
            reasoning, text = split.reasoning, split.content
        if self.tools is not None:
            parsed = self.tools.step(text, final)
            text, calls = parsed.content, parsed.calls
        return reasoning, text, calls
