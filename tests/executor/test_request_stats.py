"""vLLM's per-request and per-step figures, as the engine records them (issue 30; S5.1).

A fake executor whose step takes exactly 0.5 s of a fake clock makes every phase exact: a step is
scheduled at its start and its tokens are taken at its end. vLLM's boundaries are arrival, first
scheduled, first token, last token, end.
"""

from loramux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.request_stats import Histogram, buckets_1_2_5
from loramux.executor.fake import FakeExecutor
from loramux.sampling_params import SamplingParams


class StepClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TimedExecutor(FakeExecutor):
    def __init__(self, clock: StepClock) -> None:
        super().__init__(64, 4)
        self.clock = clock

    def execute(self, out):
        self.clock.t += 0.5
        return super().execute(out)


def _engine(max_num_seqs: int = 8):
    cfg = EngineConfig(
        ModelConfig("fake"),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64),
        CacheConfig(page_size=4, num_pages=64),
        LoRAConfig(max_loras=2),
    )
    clock = StepClock()
    return LLMEngine(cfg, executor=TimedExecutor(clock), tokenizer=None, clock=clock), clock


def _run(engine, clock, steps: int = 100) -> None:
    for _ in range(steps):
        if not engine.has_unfinished_requests():
            return
        engine.step()


def _only(h: Histogram) -> float:
    """The one value observed (the sum of a histogram with count 1)."""
    assert h.count == 1, h.counts
    return h.sum


def test_S5_1_phases_of_one_request_follow_vllms_boundaries():
    eng, clock = _engine(max_num_seqs=1)
    eng.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    eng.add_request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True))  # waits one seat
    _run(eng, clock)
    h = eng.request_stats.hist
    # busy: arrives at 100, runs steps ending 100.5 (first token) and 101.0 (last).
    # r: first scheduled in the step after busy ends (starts 101.0), tokens at 101.5, 102, 102.5, 103.
    assert eng.request_stats.finished == {"stop": 0, "length": 2, "abort": 0, "error": 0}
    assert h["queue"].sum == 0.0 + 1.0  # busy waited 0 s; r was first scheduled at 101.0
    assert h["prefill"].sum == 0.5 + 0.5 and h["decode"].sum == 0.5 + 1.5
    assert h["inference"].sum == 1.0 + 2.0 and h["e2e"].sum == 1.0 + 3.0
    assert h["ttft"].sum == 0.5 + 1.5 and h["token_gap"].count == 1 + 3 and h["token_gap"].sum == 2.0
    assert h["request_tpot"].sum == 0.5 + 0.5
    assert h["prompt_len"].sum == 8 and h["output_len"].sum == 6 and h["max_tokens"].sum == 6
    assert eng.request_stats.prompt_tokens == 8 and eng.request_stats.generation_tokens == 6
    assert h["step_tokens"].count == 6  # six steps computed tokens: 3, 1, 5, 1, 1, 1
    assert h["step_tokens"].sum == 12


def test_S5_1_n_samples_count_as_one_request_and_an_abort_and_a_timeout_are_aborts():
    eng, clock = _engine()
    eng.add_request_n("n3", [1, 2, 3], SamplingParams(max_tokens=3, n=3, ignore_eos=True))
    _run(eng, clock)
    s = eng.request_stats
    assert (
        _only(s.hist["n"]) == 3 and _only(s.hist["max_output_len"]) == 3 and _only(s.hist["max_tokens"]) == 3
    )
    assert s.finished["length"] == 3 and s.hist["ttft"].count == 3 and s.prompt_tokens == 9

    eng, clock = _engine(max_num_seqs=1)
    eng.add_request("long", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("late", [1, 2], SamplingParams(max_tokens=5, ignore_eos=True, max_queue_time=1.0))
    eng.step()  # long runs; late waits for the one seat
    eng.abort_request("long")  # after one token: an abort, with its phases so far
    assert eng.request_stats.finished["abort"] == 1 and eng.request_stats.hist["output_len"].sum == 1
    clock.t += 2.0  # past late's queue deadline before it ever ran: loramux's timeout, vLLM's abort
    _run(eng, clock)
    assert eng.request_stats.finished == {"stop": 0, "length": 0, "abort": 2, "error": 0}
    # long waited 0 s; late from 100 to its end, at the end of the step that expired it (103)
    assert eng.request_stats.hist["queue"].sum == 0.0 + 3.0


def test_S5_1_a_request_refused_at_admission_is_not_counted():
    eng, _ = _engine()
    try:
        eng.add_request_n("bad", [1, 2, 3], SamplingParams(max_tokens=5000, n=2))
    except ValueError:
        pass
    else:
        raise AssertionError("a request past the model's length must be refused")
    s = eng.request_stats
    assert sum(s.finished.values()) == 0 and s.hist["n"].count == 0 and s.hist["e2e"].count == 0


def test_token_buckets_are_vllms_1_2_5_series_up_to_max_model_len():
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(4096)[-3:] == (500, 1000, 2000)  # 5000 is past the limit
    h = Histogram((1.0, 2.0))
    h.add(1.0)  # le=1 holds 1 (Prometheus buckets are upper-inclusive)
    h.add(1.5, n=2)
    h.add(9.0)
    assert h.counts == [1, 2, 1] and h.count == 4 and h.sum == 13.0
