"""What the answer parsers cost a streamed chat answer: the tool-call parser (tool_choice "auto")
and the reasoning parser against plain text, per chunk.

    python benchmarks/bench_answer_parsers.py [--rounds 5] [--piece 1]

Not a test. One answer, as the engine streams it (one RequestOutput per `--piece` characters, a
byte-level tokenizer's token each): 1000 characters of reasoning in <think> ... </think>, 500 of
text, then a Hermes tool call whose arguments hold A characters (A = 100, 2000, 20000; a long
call is the worst case: the parser looks for </tool_call> in all it holds, at every chunk).
Rendered three ways, alternating in each round: the plain text chunk (`_chat_delta`), with
--tool-call-parser hermes (`_auto_tool_delta`), and with --reasoning-parser deepseek_r1 over it.
Prints microseconds per chunk (median of the rounds) as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from loramux.engine.outputs import CompletionOutput, RequestOutput
from loramux.server.generate import _auto_tool_delta, _chat_delta, _with_reasoning
from loramux.server.tool_parsers import ToolParser

Render = Callable[[int, RequestOutput], Any]


def answer(args_chars: int) -> str:
    call = {"name": "write_file", "arguments": {"text": "x" * args_chars}}
    return "<think>" + "r" * 1000 + "</think>" + "t" * 500 + f"<tool_call>{json.dumps(call)}</tool_call>"


def outputs(text: str, piece: int) -> list[RequestOutput]:
    outs, n = [], (len(text) + piece - 1) // piece
    for k in range(n):
        last = k == n - 1
        comp = CompletionOutput(
            0,
            text[: (k + 1) * piece],
            [],
            "stop" if last else None,
            delta_text=text[k * piece : (k + 1) * piece],
        )
        outs.append(RequestOutput("r", None, [], [comp], finished=last))
    return outs


def per_chunk_us(make: Callable[[], Render], outs: list[RequestOutput]) -> float:
    render = make()
    t0 = time.perf_counter()
    for out in outs:
        render(0, out)
    return (time.perf_counter() - t0) / len(outs) * 1e6


WAYS: dict[str, Callable[[], Render]] = {
    "plain text": lambda: _chat_delta,
    "tool parser (hermes)": lambda: _auto_tool_delta(ToolParser("hermes")),
    "reasoning + tool parser": lambda: _with_reasoning(_auto_tool_delta(ToolParser("hermes")), "deepseek_r1"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--piece", type=int, default=1, help="characters per chunk")
    a = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"\n| call arguments (chars) | chunks | {' | '.join(WAYS)} (us per chunk, median of {a.rounds}) |")
    print("|---|---|" + "---|" * len(WAYS))
    for size in (100, 2000, 20000):
        outs = outputs(answer(size), a.piece)
        times: dict[str, list[float]] = {w: [] for w in WAYS}
        for _ in range(a.rounds):  # interleaved: each way once per round
            for way, make in WAYS.items():
                times[way].append(per_chunk_us(make, outs))
        cells = " | ".join(f"{statistics.median(times[w]):.1f}" for w in WAYS)
        print(f"| {size} | {len(outs)} | {cells} |")


if __name__ == "__main__":
    main()
