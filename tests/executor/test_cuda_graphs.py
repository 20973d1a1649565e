"""Issue 23, point 5: CUDA graphs for decode steps (S2 paged KV, S3 batched multi-LoRA).

On CPU the graphs are emulated (LORAMUX_CUDA_GRAPHS=emulate, Triton's interpreter): the same
buckets, padding rows, scratch page and static input buffers, and every replay runs the forward
on the batch built at capture, not on the step's own, so a step input that does not reach the
graph's buffer, a padding row that writes into a live page, or a padding LoRA block that adds a
delta, shows up as output that differs from transformers+PEFT. Steps replay with batch sizes that
change as requests end (buckets 8 -> 4 -> 2 -> 1), with several distinct adapters of mixed ranks
(1, 4, 8, 64) and base rows in one graph, on Llama, Mistral (sliding window) and Qwen2 (q, k, v
biases, tied embeddings). On CUDA (tests/executor/test_gpu.py) the same checks run against real
captures.
"""

from __future__ import annotations

import os

import pytest
import torch

from loramux import SamplingParams
from loramux.executor.cuda_graphs import capture_sizes, graph_mode
from tests.executor.test_equality import TOL, loras_for, make_llm, prompts
from tests.executor.test_peft_semantics import SoloOracle, served  # noqa: F401 (a fixture)

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "emulated graphs need TRITON_INTERPRET=1 (tests/conftest.py sets it off CUDA)",
        allow_module_level=True,
    )


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("LORAMUX_KERNELS", "triton")
    monkeypatch.setenv("LORAMUX_CUDA_GRAPHS", "emulate")


def generate(llm, tm, ps, names, max_tokens):
    """Greedy outputs with a max_tokens each (so the batch shrinks step by step), and the logits of
    every sampled row."""
    logits: dict[str, list[torch.Tensor]] = {}
    llm.engine.executor.logits_hook = lambda rid, row: logits.setdefault(rid, []).append(row.clone())
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate(ps, params, lora_request=loras_for(tm, names), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [logits[o.request_id] for o in outs]


def assert_matches(oracle, ps, names, tokens, logits):
    """Each request's tokens and logits are the oracle's first len(tokens) ones."""
    ref_tokens, ref_logits = oracle.greedy(ps, names, max(len(t) for t in tokens))
    for mine, ref, mine_l, ref_l, name in zip(tokens, ref_tokens, logits, ref_logits, names, strict=True):
        assert mine == ref[: len(mine)], f"adapter {name}"
        worst = max((a - b).abs().max().item() for a, b in zip(mine_l, ref_l, strict=False))
        assert worst < TOL, f"adapter {name}: logits differ by {worst}"


def test_capture_sizes_and_buckets():
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(10_000)[-1] == 512


def test_graph_mode_follows_the_device_and_enforce_eager(monkeypatch):
    monkeypatch.delenv("LORAMUX_CUDA_GRAPHS", raising=False)
    assert graph_mode("cuda", True, False) == "capture"
    assert graph_mode("cuda", True, True) is None  # --enforce-eager
    assert graph_mode("cpu", False, False) is None  # the CPU runs eagerly
    monkeypatch.setenv("LORAMUX_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="LORAMUX_CUDA_GRAPHS"):
        graph_mode("cuda", True, False)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_decode_steps_replay_graphs_with_shrinking_batches_of_mixed_adapters_and_equal_peft(
    arch, tiny_models, oracles, emulated
):
    """Seven requests (base, ranks 1, 4, 8 and 64, two adapters twice) end one after another:
    decode steps replay the 8-, 4-, 2- and 1-row graphs, with 5 down to 1 distinct adapters, and
    last the base row alone (the graphs without LoRA launches)."""
    tm = tiny_models[arch]
    names = [None, "r1_qv", "r8_all", "r64_mlp", "rs4_attn", "r8_all", "r1_qv"]
    ps = prompts(len(names), 9, seed=11)
    max_tokens = [12, 3, 4, 5, 6, 7, 2]
    llm = make_llm(tm, max_num_seqs=8, max_loras=4)
    runner = llm.engine.executor
    assert runner.graphs is not None and runner.graphs.sizes == [1, 2, 4, 8]
    replays: list[tuple[int, bool]] = []
    replay = runner.graphs.replay
    runner.graphs.replay = lambda size, lora: (replays.append((size, lora)), replay(size, lora))[1]
    tokens, logits = generate(llm, tm, ps, names, max_tokens)
    assert_matches(oracles(arch), ps, names, tokens, logits)
    assert {8, 4, 2} <= {size for size, lora in replays if lora}, replays  # padded and exact buckets
    assert (1, False) in replays, replays  # the base row alone, no LoRA launch
    assert len(replays) >= 10


def test_a_step_with_dora_or_an_embedding_adapter_runs_eagerly_and_equals_peft(served, emulated):  # noqa: F811
    """Their paths pick rows on the host, which a graph cannot replay: steps that hold such a slot
    run eagerly (a graph would drop the DoRA scale and the embedding delta); a trained lm_head is
    applied after the graph and replays."""
    host_side = ["emb", None, "dora_qv", "r8_all"]
    ps = prompts(len(host_side), 10, seed=5)
    llm = make_llm(served, max_loras=4)
    graphs = llm.engine.executor.graphs
    tokens, logits = generate(llm, served, ps, host_side, [5] * 4)
    assert_matches(SoloOracle(served), ps, host_side, tokens, logits)
    assert graphs.replays == 0
    plain_ok = ["head", None, "r8_all"]
    tokens, logits = generate(llm, served, ps[:3], plain_ok, [5] * 3)
    assert_matches(SoloOracle(served), ps[:3], plain_ok, tokens, logits)
    assert graphs.replays > 0


def test_enforce_eager_captures_nothing(tiny_models, emulated):
    llm = make_llm(tiny_models["llama"], enforce_eager=True)
    assert llm.engine.executor.graphs is None
