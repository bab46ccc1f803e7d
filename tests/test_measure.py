import time

import pytest
import torch
from torch import nn

from filterprune.measure import (GPU_BATCH, Profile, default_batch_sizes, keep_lowest, latency, latency_batches, latency_ms,
                                 latency_spread_ms, launch_note, measured_runtimes, profile, speed_change, time_ms)
from filterprune.runtimes import RuntimeUnavailable
from filterprune.recipes.vgg import vgg16_layout


class Recorder(nn.Module):
    """A Linear that remembers the modes it ran in."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_inference_mode_enabled()))
        return self.linear(x)


def test_params_and_size():
    model = vgg16_layout(width=0.125, hidden=16)
    p = profile(model, torch.randn(1, 3, 32, 32), latency=False)
    numel = sum(t.numel() for t in model.parameters())
    assert p.params == numel
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert state_bytes <= p.size_mb * 1e6 < state_bytes + 20_000  # plus the safetensors header
    assert p.latency_ms == {}


@pytest.mark.parametrize(
    "layer, shape, macs",
    [
        (nn.Conv2d(3, 8, 3, padding=1), (4, 3, 16, 16), 8 * 16 * 16 * 3 * 3 * 3),
        (nn.Conv2d(8, 12, 3, stride=2, groups=4), (2, 8, 9, 9), 12 * 4 * 4 * (8 // 4) * 3 * 3),
        (nn.Linear(20, 7), (5, 20), 20 * 7),
    ],
)
def test_macs_match_hand_formula(layer, shape, macs):
    # Batches larger than one must not change the per-example count.
    assert profile(layer, torch.randn(shape), latency=False).macs == macs


def test_latency_keys_and_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    p = profile(model, torch.randn(1, 3, 16, 16), batch_sizes=(1, 2), threads=1, min_run_time=0.05)
    assert set(p.latency_ms) == {1, 2} and all(ms > 0 for ms in p.latency_ms.values())
    d = p.as_dict()
    assert list(d) == ["params", "size_mb", "macs", "latency", "device", "dtype", "threads"]
    assert [(r["runtime"], r["batch"]) for r in d["latency"]] == [("eager", 1), ("eager", 2)]
    assert all(latency(d, b)["iqr_ms"] >= 0 and latency(d, b)["ms"] == p.latency_ms[b] for b in (1, 2))
    assert latency_batches(d) == [1, 2] and latency(d, 2, "onnxruntime") is None and latency(d, 3) is None
    assert (d["device"], d["dtype"], d["threads"], latency(d, 1)["threads"]) == ("cpu", "float32", 1, 1)
    assert latency(d, 1)["version"] == torch.__version__.split("+")[0] and p.runtime == "eager"
    text = str(p)
    assert "ms" in text and "MB" in text and "MMACs" in text and "IQR" in text
    assert p.headline_batch == 1 and "launch" not in text  # the GPU caveat only on a GPU


def test_mode_restored_and_measured_in_eval_inference_mode():
    model = Recorder().train()
    profile(model, torch.randn(3, 6), batch_sizes=(1,), min_run_time=0.02)
    assert model.training
    assert model.seen and set(model.seen) == {(False, True)}
    model.eval()
    model.seen.clear()
    assert latency_ms(model, torch.randn(2, 6), min_run_time=0.02) > 0
    assert not model.training and set(model.seen) == {(False, True)}


def test_as_dict_names_each_batch_size():
    p = Profile(params=1, size_mb=0.5, macs=2, latency_ms={64: 3.0}, device="cpu", dtype="float32", threads=2,
                runtime="openvino", runtime_version="2026.4.1")
    assert latency(p.as_dict(), 64, "openvino")["ms"] == 3.0 and latency(p.as_dict(), 64) is None
    assert measured_runtimes(p.as_dict()) == ["openvino"]


def test_keep_lowest_keeps_the_lowest_median_of_each_runtime_and_batch():
    def record(runtime, batch, ms):
        return {"runtime": runtime, "batch": batch, "ms": ms, "iqr_ms": ms / 10}

    kept = keep_lowest([record("eager", 1, 2.0), record("eager", 64, 9.0)],
                       [record("eager", 1, 1.5), record("eager", 64, 9.5), record("onnxruntime", 1, 0.7)])
    assert sorted((r["runtime"], r["batch"], r["ms"]) for r in kept) == [("eager", 1, 1.5), ("eager", 64, 9.0),
                                                                         ("onnxruntime", 1, 0.7)]


def test_in_turns_gives_each_models_speed_up_over_the_first_as_the_median_of_the_rounds_ratios():
    """Three models timed in turns, 3 rounds, a load that doubles every time in round 2: the lowest
    times are kept, and the speed-ups over the first model are per round (10/5, 20/10, 11/5.5: 2x),
    unmoved by the load, which a ratio of the lowest times (10/5) happens to match here only
    because every model had its lowest in round 1."""
    from filterprune.measure import in_turns

    times = iter([10.0, 5.0, 20.0, 20.0, 10.0, 40.0, 11.0, 5.5, 22.0])
    models = {"baseline": nn.Identity(), "pruned": nn.Identity(), "slower": nn.Identity()}
    lowest, speedups = in_turns(models, lambda m: [{"runtime": "eager", "batch": 1, "ms": next(times)}], rounds=3)
    assert {k: v[0]["ms"] for k, v in lowest.items()} == {"baseline": 10.0, "pruned": 5.0, "slower": 20.0}
    assert sorted(speedups) == ["pruned", "slower"]  # none for the first: it is the reference
    assert speedups["pruned"] == [{"runtime": "eager", "batch": 1, "x": 2.0, "ratios": [2.0, 2.0, 2.0]}]
    assert speedups["slower"][0]["x"] == 0.5


class Frozen(nn.Module):
    """A training model with one BatchNorm frozen in eval mode by its user."""

    def __init__(self):
        super().__init__()
        self.bn, self.frozen = nn.BatchNorm1d(6), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.frozen(self.bn(x))


def test_each_module_gets_its_own_mode_back():
    model = Frozen().train()
    model.frozen.eval()
    latency_ms(model, torch.randn(4, 6), min_run_time=0.01)
    profile(model, torch.randn(4, 6), min_run_time=0.01)
    assert model.training and model.bn.training and not model.frozen.training


def test_time_ms_is_milliseconds_of_one_call():
    calls = []
    median, iqr = time_ms(lambda: (calls.append(1), time.sleep(0.002)), min_run_time=0.01)
    assert 2.0 <= median < 200 and iqr >= 0  # at least the 2 ms slept, in milliseconds
    assert len(calls) >= 5 + 3  # MIN_SAMPLES timed calls at least, after the warm-up


def test_spread_rests_on_several_samples_and_brackets_the_median():
    median, iqr = latency_spread_ms(nn.Linear(6, 3), torch.randn(2, 6), min_run_time=0.01)
    assert median > 0 and iqr >= 0


@pytest.mark.parametrize("before, after, spreads, words", [
    (10.0, 4.76, (0.1, 0.1), "2.10x faster"),
    (4.0, 5.0, (0.1, 0.1), "1.25x slower"),  # never "0.80x faster"
    (10.0, 9.0, (0.6, 0.5), "no measurable change"),  # |-1.0| <= 1.1: inside the two spreads
    (10.0, 9.0, (0.5, 0.4), "1.11x faster"),  # 1.0 > 0.9: outside them
    (9.0, 10.0, (0.5, 0.5), "no measurable change"),  # exactly the sum of the spreads is not beyond it
    (1000.0, 999.0, (0.0, 0.0), "no measurable change"),  # a real but negligible change that rounds to 1.00x
    (0.89, 1.74, (0.9, 0.1), "no measurable change"),  # GPU batch-1 noise: spread as wide as the change
])
def test_speed_change_words_and_noise_rule(before, after, spreads, words):
    assert speed_change(before, after, *spreads) == words


def test_speed_change_rejects_non_positive_timings():
    with pytest.raises(ValueError, match="positive"):
        speed_change(0.0, 1.0, 0.1, 0.1)


def test_gpu_headline_is_batch_64_and_batch_1_carries_the_launch_note():
    assert default_batch_sizes("cuda:0") == (1, GPU_BATCH) == (1, 64) and default_batch_sizes("cpu") == (1,)
    assert "launch" in launch_note("cuda", 1) and launch_note("cuda", 64) is None and launch_note("cpu", 1) is None
    gpu = Profile(params=1, size_mb=0.5, macs=2, latency_ms={1: 1.0, 64: 9.0}, latency_iqr_ms={1: 0.5, 64: 0.1},
                  device="cuda:0", dtype="float32", threads=2)
    assert gpu.headline_batch == 64 and "launch overhead" in str(gpu)
    assert Profile(params=1, size_mb=0.5, macs=2, latency_ms={8: 2.0, 2: 1.0}, device="cpu", dtype="float32",
                   threads=2).headline_batch == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_measures_batch_64_by_default():
    p = profile(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 32, 32), device="cuda", min_run_time=0.05)
    assert set(p.latency_ms) == {1, 64} and p.headline_batch == 64


def test_deployment_batch_is_64_on_a_gpu_and_1_elsewhere():
    from filterprune.measure import deployment_batch

    assert deployment_batch("cuda") == deployment_batch(torch.device("cuda:1")) == GPU_BATCH == 64
    assert deployment_batch("cpu") == 1


def test_a_channels_last_model_is_timed_on_channels_last_inputs():
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(1, 3, 12, 12)
    profile(model, x, batch_sizes=(2,), min_run_time=0.01)
    assert seen and not any(seen)  # a contiguous model: contiguous inputs
    seen.clear()
    model.to(memory_format=torch.channels_last)
    profile(model, x, batch_sizes=(2,), min_run_time=0.01)
    latency_spread_ms(model, torch.randn(2, 3, 12, 12), min_run_time=0.01)
    assert seen and all(seen)


def test_a_bfloat16_model_is_timed_on_bfloat16_inputs_and_integer_inputs_keep_their_type():
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).to(torch.bfloat16)
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    p = profile(model, torch.randn(1, 3, 8, 8), batch_sizes=(2,), min_run_time=0.01)  # a float32 example, as users give
    latency_spread_ms(model, torch.randn(2, 3, 8, 8), min_run_time=0.01)
    assert seen and set(seen) == {torch.bfloat16} and p.dtype == "bfloat16"
    embed = nn.Embedding(10, 4)
    embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    profile(embed, torch.tensor([[1, 2]]), batch_sizes=(2,), min_run_time=0.01)
    assert seen[-1] == torch.int64


def test_cuda_graph_timing_needs_a_gpu_and_says_so():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(RuntimeUnavailable, match="device='cuda'"):
        profile(model, torch.randn(1, 3, 8, 8), batch_sizes=(1,), device="cpu", runtime="cuda-graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_timing_on_a_gpu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    p = profile(model, torch.randn(1, 3, 16, 16), batch_sizes=(4,), device="cuda", runtime="cuda-graph", min_run_time=0.05)
    assert p.runtime == "cuda-graph" and p.latency_ms[4] > 0 and not next(model.parameters()).is_cuda


def test_measure_imports_nothing_of_the_graph():
    """measure.py and what it imports at module level (transitively, within filterprune) reach none of
    the tracing and surgery modules: timing a model needs no graph."""
    import ast
    from pathlib import Path

    import filterprune

    root = Path(filterprune.__file__).parent
    seen, todo = set(), ["measure"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.parse((root / f"{name}.py").read_text()).body:  # module level only: not lazy imports
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1 or module.startswith("filterprune"):
                    inner = module.removeprefix("filterprune").lstrip(".")
                    todo += [inner.split(".")[0]] if inner else [a.name for a in node.names]
    assert seen & {"graph", "graph_ops", "trace", "surgery", "io", "pruner"} == set()
    assert {"measure", "runtimes", "utils"} <= seen
