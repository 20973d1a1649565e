"""The scheduler-to-executor hand-off is a snapshot made in one place (issue 27, point 3; S4, S5.3).

A step's `ScheduledSeq`s must mean the same after the scheduler moves on: the KV manager grows
page tables, swaps a page for the prefix cache's copy of the same tokens and frees tables on
finish, and none of that may reach into a hand-off already given out.
"""

import ast
from pathlib import Path

from tests.utils import fake_for, make_request, make_scheduler, step

ROOT = Path(__file__).resolve().parents[2]


def _frozen(out):
    return [
        (s.request_id, list(s.page_ids), list(s.context[: s.start_pos + len(s.token_ids)])) for s in out.seqs
    ]


def test_S4_a_step_hand_off_does_not_change_when_later_steps_grow_adopt_or_free_pages():
    s = make_scheduler(num_pages=64, page_size=4)
    ex = fake_for(s)
    # Same adapter, same 10-token prompt, one step: both compute the same two full pages, and the
    # KV manager swaps the second's for the ones the first put in the cache (adoption).
    a = make_request(10, max_tokens=9, rid="a")
    b = make_request(10, max_tokens=9, rid="b")
    s.add_request(a)
    s.add_request(b)
    outs, frozen = [], []
    while s.has_unfinished():
        out = step(s, ex)
        outs.append(out)
        frozen.append(_frozen(out))
    assert len(outs) > 4 and not a.page_ids and not b.page_ids  # freed at the end
    tables = [{q.request_id: q.page_ids for q in out.seqs} for out in outs]
    assert tables[0]["b"][:2] != tables[1]["b"][:2] == tables[1]["a"][:2], "no adoption happened"
    assert len(tables[-1]["a"]) > len(tables[0]["a"]), "no table grew"
    for out, seen in zip(outs, frozen, strict=True):
        assert _frozen(out) == seen, f"step {out.step}'s hand-off changed after it was given out"


def test_S4_scheduled_seq_is_built_only_by_the_hand_off_function():
    """`ScheduledSeq` appears in loramux/ only in its definition, type hints and `_hand_off`."""
    makers = []
    for path in (ROOT / "loramux").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and any(
                    isinstance(x, ast.Name) and x.id == "ScheduledSeq" for x in [node.func, *node.args]
                ):
                    makers.append(f"{path.relative_to(ROOT)}:{fn.name}")
    assert makers == ["loramux/core/scheduler.py:_hand_off"], makers
