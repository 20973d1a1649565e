"""Sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Boundary: logits of the rows that sample (float32, [N, V]) and their
`SamplingParams` in; one token per row (and logprobs when asked) out. A row
with a seed draws from its own generator, so its tokens do not depend on what
else is in the batch. In order, as vLLM's sampler: allowed_token_ids (-inf
for the rest); logit_bias; repetition, frequency and presence penalties
(batched over the rows that have them, from each request's token history,
which the runner keeps); the masks the control plane names (min_tokens' eos
and stop ids until enough outputs exist, and the tokens that would complete
one of the request's bad_words: -inf in one indexed write); then temperature,
min-p, top-k and top-p. Logprobs are those of the model's raw distribution, as
vLLM reports by default. Rows under a grammar (structured output) have their
forbidden tokens at -inf before all of this (`apply_token_masks`, called by
the runner), as vLLM applies its grammar bitmask to the logits before its
sampler: their logprobs are those of the allowed tokens. Where a grammar or
allowed_token_ids leave nothing but what those masks forbid (a grammar that
allows only its end before min_tokens, say), the masks yield: the row keeps
what its own constraint allows.

`sample_each` is the fallback when a batch fails: it samples the rows one at a
time, so a fault that belongs to one request's parameters (a distribution its
own masks emptied, say) is pinned on that row and the others still get tokens.
"""

from __future__ import annotations

import torch

from loramux.core.outputs import SampleLogprobs
from loramux.sampling_params import SamplingParams


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
    suppress: list[frozenset[int]] | None = None,
    histories: list[tuple[list[int], int] | None] | None = None,
    grammar_rows: list[bool] | None = None,
) -> tuple[list[int], list[SampleLogprobs | None]]:
    """grammar_rows: rows under a grammar, whose min_tokens suppression yields to the grammar's end."""
    n = logits.shape[0]
    raw = logits
    logits = apply_allowed_token_ids(logits, params)
    logits = apply_logit_bias(logits, params)
    if histories is not None and any(h is not None for h in histories):
        logits = apply_penalties(logits, params, histories)
    if suppress is not None and any(suppress):
        rows = [i for i, ids in enumerate(suppress) for _ in ids]
        cols = [t for ids in suppress for t in ids]
        logits = logits.clone() if logits is raw else logits
        dev = logits.device
        held = sorted(  # rows whose own masks came first (a grammar, allowed_token_ids)
            {
                i
                for i in rows
                if (grammar_rows is not None and grammar_rows[i]) or params[i].allowed_token_ids is not None
            }
        )
        before = logits[held] if held else None
        logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = float("-inf")
        if before is not None:  # a grammar or allowed_token_ids outrank min_tokens and bad_words:
            emptied = torch.isinf(logits[held]).all(dim=-1)  # a row left with no token gets them back
            if emptied.any():
                logits[torch.tensor(held, device=dev)[emptied]] = before[emptied]
    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        tokens[idx] = logits.index_select(0, idx).argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits.index_select(0, idx), [params[i] for i in random_rows])
        shared = [j for j, i in enumerate(random_rows) if generators[i] is None]
        if shared:
            sidx = torch.tensor(shared, device=logits.device)
            drawn = torch.multinomial(probs.index_select(0, sidx), 1, generator=default_generator)
            tokens[idx[sidx]] = drawn.squeeze(1)
        for j, i in enumerate(random_rows):
            g = generators[i]
            if g is not None:
                tokens[i] = torch.multinomial(probs[j], 1, generator=g)[0]
    token_list = tokens.tolist()
    return token_list, _logprobs(raw, token_list, params)


def sample_each(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
    suppress: list[frozenset[int]],
    histories: list[tuple[list[int], int] | None],
    grammar_rows: list[bool] | None = None,
) -> tuple[list[int | None], list[SampleLogprobs | None], dict[int, str]]:
    """`sample` one row at a time: (tokens, logprobs, {row: why it failed}); a failed row's token
    is None. Slower than one batch, so only used after the batch raised."""
    tokens: list[int | None] = []
    lps: list[SampleLogprobs | None] = []
    errors: dict[int, str] = {}
    for i in range(logits.shape[0]):
        try:
            t, lp = sample(
                logits[i : i + 1],
                [params[i]],
                [generators[i]],
                default_generator,
                [suppress[i]],
                [histories[i]],
                None if grammar_rows is None else [grammar_rows[i]],
            )
        except Exception as e:
            errors[i] = f"{type(e).__name__}: {e}"
            t, lp = [None], [None]  # type: ignore[list-item]
        tokens.append(t[0])
        lps.append(lp[0])
    return tokens, lps, errors


def apply_token_masks(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """-inf wherever a row's grammar forbids the token, in one masked write over all those rows.
    `bitmask[j]` is row rows[j]'s packed mask (int32, bit t set: token t allowed); a new tensor."""
    dev, vocab = logits.device, logits.shape[1]
    bits = torch.arange(32, dtype=torch.int32, device=dev)
    packed = bitmask.to(dev, torch.int32)
    allowed = ((packed.unsqueeze(-1) >> bits) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    idx = torch.tensor(rows, device=dev)
    return logits.index_copy(0, idx, logits.index_select(0, idx).masked_fill(~allowed, float("-inf")))


def apply_allowed_token_ids(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """-inf outside each row's allowed_token_ids, in one masked write over those rows (a new
    tensor if any). Where a row's grammar (already applied) allows none of them, the grammar
    wins: the row keeps its grammar's tokens, so the answer still parses."""
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return logits
    dev = logits.device
    keep = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool, device=dev)
    r = torch.tensor([j for j, i in enumerate(rows) for _ in params[i].allowed_token_ids], device=dev)  # type: ignore[arg-type]
    c = torch.tensor([t for i in rows for t in params[i].allowed_token_ids], device=dev)  # type: ignore[union-attr]
    keep[r, c] = True
    idx = torch.tensor(rows, device=dev)
    own = logits.index_select(0, idx)
    masked = own.masked_fill(~keep, float("-inf"))
    emptied = torch.isinf(masked).all(dim=-1, keepdim=True)  # a grammar allows none of them: it wins
    return logits.index_copy(0, idx, torch.where(emptied, own, masked))


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Add every row's logit_bias in one indexed accumulate (a new tensor if any)."""
    rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
    if not rows:
        return logits
    dev = logits.device
    cols = torch.tensor([t for p in params for t, _ in p.logit_bias], device=dev)
    vals = torch.tensor([b for p in params for _, b in p.logit_bias], device=dev, dtype=logits.dtype)
    return logits.index_put((torch.tensor(rows, device=dev), cols), vals, accumulate=True)


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], int] | None]
) -> torch.Tensor:
    """Repetition, then frequency and presence penalties, batched over the rows that have them.

    `histories[i]` is (every token of row i's request so far, how many of them are the prompt);
    None for rows without penalties. Counts come from one accumulating scatter over the flattened
    histories; the penalties are tensor operations over all the rows at once.
    """
    rows = [i for i, h in enumerate(histories) if h is not None]
    dev, vocab = logits.device, logits.shape[1]
    hist = [histories[i] for i in rows]
    # (row, token) for every token of every history, and whether it is an output token
    row_of = [j for j, (toks, _) in enumerate(hist) for _ in toks]  # type: ignore[misc]
    flat = [t for toks, _ in hist for t in toks]  # type: ignore[misc]
    is_out = [k >= n_prompt for toks, n_prompt in hist for k in range(len(toks))]  # type: ignore[misc]
    r = torch.tensor(row_of, dtype=torch.long, device=dev)
    t = torch.tensor(flat, dtype=torch.long, device=dev)
    counts = torch.zeros((len(rows), vocab), dtype=logits.dtype, device=dev)
    counts.index_put_((r, t), torch.tensor(is_out, dtype=logits.dtype, device=dev), accumulate=True)
    seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=dev)
    seen[r, t] = True  # anywhere in prompt or output
    p = [params[i] for i in rows]
    rep = torch.tensor([q.repetition_penalty for q in p], device=dev, dtype=logits.dtype).unsqueeze(1)
    freq = torch.tensor([q.frequency_penalty for q in p], device=dev, dtype=logits.dtype).unsqueeze(1)
    pres = torch.tensor([q.presence_penalty for q in p], device=dev, dtype=logits.dtype).unsqueeze(1)
    idx = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, idx)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    return logits.index_copy(0, idx, sub)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then min-p, then top-k, then top-p (vLLM's order), as probabilities [N, V]."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype)
    logits = logits / temps.unsqueeze(1)
    mins = [p.min_p for p in params]
    if max(mins) > 0:  # only steps with a min_p row pay for it; rows at 0 keep every token
        probs = logits.softmax(dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * torch.tensor(
            mins, device=dev, dtype=logits.dtype
        ).unsqueeze(1)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    vocab = logits.shape[1]
    ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    ps = [p.top_p for p in params]
    if min(ks) < vocab or min(ps) < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev).unsqueeze(0)
        drop = rank >= torch.tensor(ks, device=dev).unsqueeze(1)  # top-k
        probs_sorted = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = probs_sorted.cumsum(dim=-1) - probs_sorted  # mass of strictly more likely tokens
        drop |= before >= torch.tensor(ps, device=dev, dtype=logits.dtype).unsqueeze(1)  # top-p
        drop[:, 0] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits.softmax(dim=-1)


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[SampleLogprobs]:
    """Each row's logprob of the prompt token that follows it (`next_ids`), its rank (1: the
    most likely) and the `k` most likely tokens: vLLM's prompt_logprobs, from the raw logits."""
    logp = logits.log_softmax(dim=-1)
    nxt = torch.tensor(next_ids, device=logits.device)
    own = logp.gather(1, nxt.unsqueeze(1))  # [N, 1]
    ranks = ((logp > own).sum(dim=-1) + 1).tolist()
    own_lps = own.squeeze(1).tolist()
    if not k:
        return [SampleLogprobs(lp, [], r) for lp, r in zip(own_lps, ranks, strict=True)]
    top = logp.topk(k)
    ids, vals = top.indices.tolist(), top.values.tolist()
    return [
        SampleLogprobs(lp, list(zip(i, v, strict=True)), r)
        for lp, r, i, v in zip(own_lps, ranks, ids, vals, strict=True)
    ]


def _logprobs(
    logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
) -> list[SampleLogprobs | None]:
    want = [p.logprobs for p in params]
    if all(w is None for w in want):
        return [None] * len(tokens)
    logp = logits.log_softmax(dim=-1)
    out: list[SampleLogprobs | None] = []
    for i, k in enumerate(want):
        if k is None:
            out.append(None)
            continue
        top: list[tuple[int, float]] = []
        if k:
            vals, ids = logp[i].topk(k)
            top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        out.append(SampleLogprobs(float(logp[i, tokens[i]]), top))
    return out
