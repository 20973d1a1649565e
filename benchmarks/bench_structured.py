"""Structured output's cost: grammar masks by vocabulary size (xgrammar and llguidance), and a batch
of 64 with schemas against without on the mid model.

Not a test. Two parts, both printed as Markdown tables:

1. Masks. Byte-level BPE tokenizers of the demo's 259 tokens and of 32k and 128k tokens (trained
   here on words of ten languages from wordfreq, so their tokens look like a real vocabulary's)
   and one JSON schema; for each library, the compile time, then the time to fill one row's mask
   at each step of a valid answer (mean and worst), and a step's masks for 64 rows.
2. Engine. `LLM` on the mid model (~91M parameters, random weights), 64 requests at once, 64
   tokens each: free text (ignore_eos, so every request makes all 64) against a JSON schema and a
   regex, tokens per second over the generated tokens, runs interleaved (free, json, regex, free, ...).

    pip install llguidance  # the library not chosen, for the comparison
    python benchmarks/bench_structured.py [--cache-dir DIR] [--reps 3] [--skip-engine] [--skip-masks]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"]})


def tokenizers(cache: Path) -> dict[str, object]:
    from transformers import AutoTokenizer

    from loramux import demo
    from loramux.bench.artifacts import train_bpe_tokenizer

    out: dict[str, object] = {"demo (259)": AutoTokenizer.from_pretrained(str(demo.demo_paths()[0]))}
    for size in (32_000, 128_000):
        path = cache / f"tokenizer-{size}"
        if not (path / "tokenizer.json").is_file():
            import wordfreq

            words = [
                w
                for lang in ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "sv", "tr")
                for w in wordfreq.top_n_list(lang, 60_000)
            ]
            rng = random.Random(0)
            lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(60_000)]
            lines += [json.dumps({"k": rng.choice(words), "v": rng.randint(0, 10**6)}) for _ in range(5_000)]
            train_bpe_tokenizer(lines, size).save_pretrained(path)
        out[f"{size // 1000}k"] = AutoTokenizer.from_pretrained(str(path))
    return out


def time_xgrammar(tok, ids: list[int]) -> dict[str, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t
    bm = xgr.allocate_token_bitmask(64, len(tok))
    per_row = []
    m = xgr.GrammarMatcher(compiled)
    for x in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(bm, 0)
        per_row.append(time.perf_counter() - t)
        assert m.accept_token(x)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(64)]
    steps = []
    for x in ids:
        t = time.perf_counter()
        for i, mm in enumerate(matchers):
            mm.fill_next_token_bitmask(bm, i)
        steps.append(time.perf_counter() - t)
        for mm in matchers:
            mm.accept_token(x)
    return _summary(compile_s, per_row, steps)


def time_llguidance(tok, ids: list[int]) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lt = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    m = llguidance.LLMatcher(lt, grammar)
    compile_s = time.perf_counter() - t
    bm = llguidance.torch.allocate_token_bitmask(64, len(tok))
    per_row = []
    for x in ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(m, bm, 0)
        per_row.append(time.perf_counter() - t)
        assert m.consume_token(x), m.get_error()
    matchers = [llguidance.LLMatcher(lt, grammar) for _ in range(64)]
    steps = []
    for x in ids:
        t = time.perf_counter()
        for i, mm in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(mm, bm, i)
        steps.append(time.perf_counter() - t)
        for mm in matchers:
            mm.consume_token(x)
    return _summary(compile_s, per_row, steps)


def _summary(compile_s: float, per_row: list[float], steps: list[float]) -> dict[str, float]:
    return {
        "compile_ms": compile_s * 1e3,
        "row_mean_us": statistics.mean(per_row) * 1e6,
        "row_max_us": max(per_row) * 1e6,
        "step64_mean_ms": statistics.mean(steps) * 1e3,
    }


def masks(cache: Path) -> None:
    print("| vocabulary | library | compile (ms) | row mask, mean (us) | worst (us) | 64 rows, a step (ms) |")
    print("|---|---|---|---|---|---|")
    for name, tok in tokenizers(cache).items():
        ids = tok.encode(ANSWER, add_special_tokens=False)
        for lib, fn in (("xgrammar", time_xgrammar), ("llguidance", time_llguidance)):
            r = fn(tok, ids)
            print(
                f"| {name} | {lib} | {r['compile_ms']:.1f} | {r['row_mean_us']:.0f} | {r['row_max_us']:.0f} "
                f"| {r['step64_mean_ms']:.2f} |"
            )


def engine(cache: Path, reps: int) -> None:
    from loramux import LLM, SamplingParams, StructuredOutputsParams
    from loramux.bench.artifacts import build_random_model

    path = build_random_model(cache / "llama-mid", "mid")
    llm = LLM(str(path), max_num_seqs=64, max_num_batched_tokens=2048, num_pages=1024, page_size=16)
    prompts = [f"lora adapter {i} serve batch token cache fast fair" for i in range(64)]
    kinds = {
        "free text": SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.8, seed=1),
        "JSON schema": SamplingParams(
            max_tokens=64, temperature=0.8, seed=1, structured_outputs=StructuredOutputsParams(json=SCHEMA)
        ),
        "regex": SamplingParams(
            max_tokens=64,
            temperature=0.8,
            seed=1,
            structured_outputs=StructuredOutputsParams(regex=r"[a-z]{8}( [a-z]{8}){7}"),
        ),
    }
    for p in kinds.values():
        llm.generate(prompts[:2], p, use_tqdm=False)  # warm up, grammars compiled
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    lengths: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(reps):
        for k, p in kinds.items():
            t = time.perf_counter()
            outs = llm.generate(prompts, p, use_tqdm=False)
            dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[k].append(n / dt)
            lengths[k].append(n / len(outs))
    print("| 64 requests | tokens/s (median) | runs | mean tokens per request |")
    print("|---|---|---|---|")
    for k in kinds:
        runs = ", ".join(f"{r:.0f}" for r in rates[k])
        print(f"| {k} | {statistics.median(rates[k]):.0f} | {runs} | {statistics.mean(lengths[k]):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path("bench_cache"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-masks", action="store_true")
    a = p.parse_args()
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    if not a.skip_masks:
        masks(a.cache_dir)
    if not a.skip_engine:
        engine(a.cache_dir, a.reps)


if __name__ == "__main__":
    main()
