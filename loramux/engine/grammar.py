"""Structured output: grammars compiled off the step loop, one matcher per constrained sample.

Boundary: `StructuredOutputsParams` in (from the request's `SamplingParams`); a packed bitmask of
the tokens each constrained row may sample out (`TokenMasks`, applied by the sampler in one op).
The grammar library is xgrammar (vLLM's default backend): on this machine its mask for a step
costs 4-6 us per row at vocabularies of 259, 32k and 128k tokens against 27-97 us for
llguidance (benchmarks/bench_structured.py, docs/benchmarks.md). Nothing else imports it.

`GrammarCache` compiles on its own worker thread and keeps the compiled grammars by spec, so the
engine's step never waits for a compile: a request whose grammar is not ready yet simply waits
outside the scheduler (`LLMEngine` holds it) while the other requests step on. `Constraint` is
one sample's matcher; it is advanced with every token the request keeps and, should its count
ever differ from the request's output (a path that rewrote the output), rebuilt by replaying it.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
from collections import OrderedDict
from typing import Any, NamedTuple

from loramux.sampling_params import StructuredOutputsParams

CACHE_SIZE = 512  # compiled grammars kept, least recently used dropped first
# Whitespace characters allowed in a row between JSON tokens (indentation to depth 8 by 2): a model
# that loops on whitespace, as small ones do, still has to close the JSON within max_tokens.
MAX_WHITESPACE = 16
# JSON Schema keywords xgrammar parses but does not enforce: refused, so no answer breaks a schema
# the client believes was applied.
UNENFORCED = (
    "if",
    "then",
    "else",
    "not",
    "dependentSchemas",
    "dependentRequired",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedProperties",
    "unevaluatedItems",
    "propertyNames",
    "patternProperties",
    "multipleOf",
)
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class Grammar(NamedTuple):
    """A compiled grammar, and for JSON the tokens it may ever use (None: all it allows)."""

    compiled: Any
    keep: Any  # packed int32 [ceil(V / 32)], ANDed into each row's mask


class GrammarError(ValueError):
    """The grammar cannot be compiled or would not be enforced; the message names why."""


def unenforced_keywords(schema: Any, path: str = "#") -> list[str]:
    """Where `schema` uses a keyword in UNENFORCED, as JSON pointers (property names are not
    keywords: {"properties": {"if": ...}} is fine)."""
    if not isinstance(schema, dict):
        return []
    found = [f"{path}/{k}" for k in UNENFORCED if k in schema]
    for k in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(k), dict):
            for name, sub in schema[k].items():
                found += unenforced_keywords(sub, f"{path}/{k}/{name}")
    for k in _SUBSCHEMAS:
        found += unenforced_keywords(schema.get(k), f"{path}/{k}")
    for k in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(k), list):
            for i, sub in enumerate(schema[k]):
                found += unenforced_keywords(sub, f"{path}/{k}/{i}")
    return found


class GrammarCache:
    """Compiles grammars for one tokenizer on a worker thread, and keeps them by spec.

    Thread-safe: the server's handlers compile ahead (to answer a bad schema with a 400 before
    the request is queued) while the engine thread asks for the same spec's future.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self._tokenizer, self.vocab_size, self._stop = tokenizer, vocab_size, list(stop_token_ids)
        self._compiler: Any = None  # made on the worker thread at first use (0.7 s at a 128k vocab)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loramux-grammar")
        self._lock = threading.Lock()
        self._futures: OrderedDict[tuple[str, str], concurrent.futures.Future[Grammar]] = OrderedDict()
        self._json_keep: Any = None
        self.num_compiled = 0

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future[Grammar]:
        """The compiled grammar's future: done at once for a spec compiled before."""
        key = spec.key
        with self._lock:
            fut = self._futures.get(key)
            if fut is not None:
                self._futures.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._futures[key] = fut
            while len(self._futures) > CACHE_SIZE:
                self._futures.popitem(last=False)
            return fut

    def compile(self, spec: StructuredOutputsParams) -> Grammar:
        """Block until `spec` is compiled; GrammarError naming the problem if it cannot be."""
        return self.submit(spec).result()

    def _compile(self, spec: StructuredOutputsParams) -> Grammar:
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop
            )
            self._json_keep = _without_control_bytes(info.decoded_vocab, self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        c = self._compiler
        try:
            if spec.json is not None:
                schema = json.loads(spec.json)
                bad = unenforced_keywords(schema)
                if bad:
                    raise GrammarError(
                        f"the JSON schema uses {', '.join(bad)}, which the grammar engine (xgrammar) "
                        f"does not enforce; express the constraint without "
                        f"{', '.join(sorted({b.rsplit('/', 1)[1] for b in bad}))}"
                    )
                out = c.compile_json_schema(
                    spec.json,
                    any_whitespace=not spec.disable_any_whitespace,
                    max_whitespace_cnt=MAX_WHITESPACE,
                )
            elif spec.json_object:  # any JSON object (OpenAI's json_object): not an array, not a string
                out = c.compile_json_schema(
                    '{"type": "object"}',
                    any_whitespace=not spec.disable_any_whitespace,
                    max_whitespace_cnt=MAX_WHITESPACE,
                    strict_mode=False,
                )
            elif spec.regex is not None:
                out = c.compile_regex(spec.regex)
            elif spec.choice is not None:
                out = c.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in spec.choice)
                )
            else:
                out = c.compile_grammar(spec.grammar)
        except GrammarError:
            raise
        except Exception as e:  # xgrammar's RuntimeError: "[time] file.cc:line: <the reason>"
            raise GrammarError(f"the {spec.kind} cannot be compiled: {_XGR_PREFIX.sub('', str(e))}") from None
        self.num_compiled += 1
        return Grammar(out, self._json_keep if spec.json is not None or spec.json_object else None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Constraint:
    """One sample's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, grammar: Grammar) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(grammar.compiled)
        self._keep = grammar.keep
        self.num_accepted = 0

    def sync(self, output_ids: list[int]) -> None:
        """Make the matcher's state that of `output_ids` (a replay if the counts differ)."""
        if self.num_accepted == len(output_ids):
            return
        self._matcher.reset()
        self.num_accepted = 0
        for t in output_ids:
            self.accept(t)

    def accept(self, token: int) -> None:
        if not self._matcher.is_terminated() and not self._matcher.accept_token(token):
            raise GrammarError(f"token {token} breaks the grammar")  # the mask was not applied
        self.num_accepted += 1

    @property
    def terminated(self) -> bool:
        """The grammar accepted its end: the answer is complete."""
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: Any, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._keep is not None:
            bitmask[row] &= self._keep


CONTROL_BYTES = frozenset(range(0x20)) - {0x0A, 0x0D}  # JSON text never holds these raw


def _without_control_bytes(decoded_vocab: list[bytes], vocab_size: int) -> Any:
    """The tokens a JSON answer may use: none holding a raw control byte other than newline and
    carriage return. xgrammar 0.2's strings with a maxLength allow any byte but quote, backslash,
    CR and LF, so a model could write a raw control character (invalid JSON) inside one; tabs go
    too (whitespace between tokens is then spaces and newlines)."""
    import torch

    words = (vocab_size + 31) // 32
    bits = [-1] * words
    for t, raw in enumerate(decoded_vocab[:vocab_size]):
        if CONTROL_BYTES.intersection(raw):
            bits[t // 32] &= ~(1 << (t % 32))
    return torch.tensor(
        [b if b < 2**31 else b - 2**32 for b in (x & 0xFFFFFFFF for x in bits)], dtype=torch.int32
    )


def allocate_bitmask(rows: int, vocab_size: int) -> Any:
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)
