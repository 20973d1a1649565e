"""What the answer parsers (tool_parsers.py, reasoning_parsers.py) share: text fed in pieces,
held back where it may be the start of a marker, and given out in steps.

Boundary: strings in, a parser's step value out; no request, no engine.
"""

from __future__ import annotations

from typing import Generic, TypeVar

Step = TypeVar("Step")


class PieceStream(Generic[Step]):
    """Feed an answer's text in any pieces, then finish; each call returns what can be given out
    so far (`_step` decides, with `held` the text not yet given out)."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str) -> Step:
        self.held += text
        return self._step(final=False)

    def finish(self) -> Step:
        return self._step(final=True)

    def step(self, text: str, final: bool) -> Step:
        """What `text` gives out, and with `final` what finishing does too, as one step."""
        out = self.feed(text)
        return out + self.finish() if final else out  # type: ignore[operator]

    def _step(self, final: bool) -> Step:
        raise NotImplementedError

    def take(self, final: bool, marker: str) -> str:
        """Give out the held text, less (unless final) an end that may be the start of `marker`."""
        keep = 0 if final else partial_suffix(self.held, marker)
        text, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return text


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (0: none)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
