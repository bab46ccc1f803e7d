"""Latency in every runtime (issue 18): each prepares the model once, runs it as PyTorch does, and
states runtime, version, threads, batch and dtype; a runtime that cannot run gives one line."""

import importlib.metadata

import numpy as np
import pytest
import torch
from torch import nn

import filterprune as fp
from filterprune.measure import latency
from filterprune.runtimes import RUNTIMES, RuntimeUnavailable, get
from images import one_thread  # noqa: F401  (an autouse fixture)

CPU = [name for name in RUNTIMES if name != "cuda-graph"]


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3)).train()


@pytest.mark.parametrize("name", CPU)
def test_each_runtime_computes_what_pytorch_does(name):
    model, x = tiny().eval(), torch.randn(2, 3, 16, 16)
    got = get(name).prepare(model, (x,), threads=1)()
    got = got[0] if isinstance(got, list) else got
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(got), model(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CPU)
def test_profile_in_each_runtime_states_its_conditions_and_leaves_the_model_alone(name):
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p = fp.profile(model, torch.randn(1, 3, 16, 16), batch_sizes=(2,), threads=1, min_run_time=0.01, runtime=name)
    package = "torch" if name in ("eager", "compile") else name
    record = latency(p.as_dict(), 2, name)
    assert record["ms"] > 0 and record["iqr_ms"] >= 0 and record["threads"] == 1 and record["dtype"] == "float32"
    assert record["version"] == importlib.metadata.version(package) and record["batch"] == 2
    assert f"1 threads, {name} {record['version']}" in str(p)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_latency_ms_in_a_runtime():
    assert fp.latency_ms(tiny(), torch.randn(2, 3, 16, 16), threads=1, min_run_time=0.01, runtime="onnxruntime") > 0


def test_a_runtime_not_installed_names_the_extra(monkeypatch):
    import importlib

    real = importlib.import_module

    def missing(name, *args):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(RuntimeUnavailable, match=r"needs openvino, which is not installed: pip install 'filterprune\[deploy\]'"):
        fp.profile(tiny(), torch.randn(1, 3, 16, 16), batch_sizes=(1,), runtime="openvino")


def test_cpu_runtimes_refuse_a_gpu_and_unknown_names_list_the_known():
    with pytest.raises(RuntimeUnavailable, match="runs on the CPU here: give device='cpu'"):
        get("openvino").check(torch.device("cuda"))
    with pytest.raises(ValueError, match="choose one of eager, compile, cuda-graph, onnxruntime, openvino, executorch"):
        fp.profile(tiny(), torch.randn(1, 3, 16, 16), runtime="tensorrt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["eager", "compile", "cuda-graph"])
def test_gpu_runtimes(name):
    p = fp.profile(tiny(), torch.randn(1, 3, 16, 16), batch_sizes=(4,), device="cuda", min_run_time=0.05, runtime=name)
    assert p.runtime == name and p.latency_ms[4] > 0


def test_prune_targets_the_chosen_runtime_and_reports_it_beside_eager(tmp_path, capsys):
    """`filterprune prune --runtime onnxruntime --target-speedup`: the stop is decided on ORT latency, and the
    report has both runtimes with ORT as the headline. The target is trivially reached (0.01x), so that
    timing noise cannot decide the test; what is checked is which runtime decided and what was recorded."""
    import json

    from PIL import Image

    from filterprune.cli import main
    from filterprune.measure import measured_runtimes
    from images import picture

    for c in ("cat", "dog"):
        for i in range(6):
            folder = tmp_path / "data" / ("train" if i < 4 else "test") / c
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture(c, i)).save(folder / f"{c}{i}.jpg")
    out = tmp_path / "run"
    code = main(["prune", "--data", str(tmp_path / "data"), "--arch", "vgg16_layout", "--width", "0.03", "--size", "32",
                 "--workers", "0", "--batch-size", "4", "--quiet", "--head-epochs", "0", "--epochs", "0", "--epochs-between", "0",
                 "--step", "0.2", "--iterations", "3", "--ignore", "classifier.0", "classifier.3",
                 "--runtime", "onnxruntime", "--target-speedup", "0.01", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"].startswith("measured speed-up (onnxruntime)") and len(report["iterations"]) == 1
    for summary in (report["baseline"], report["iterations"][0], report["pruned"]):
        assert measured_runtimes(summary) == ["eager", "onnxruntime"]
        assert latency(summary, 1, "onnxruntime")["version"] == importlib.metadata.version("onnxruntime")
    md = (out / "report.md").read_text()
    assert "| latency, batch 1 in onnxruntime (ms) |" in md and "| latency, batch 1 in eager (ms) |" in md
    assert md.index("batch 1 in onnxruntime (ms)") < md.index("batch 1 in eager (ms)")  # the chosen one first
    assert "headline: batch 1 in onnxruntime" in md


def test_a_loop_in_a_runtime_that_cannot_run_fails_before_any_work():
    from filterprune.schedule import Schedule, check_reachable

    with pytest.raises(RuntimeUnavailable, match="needs a GPU"):
        check_reachable(tiny(), torch.randn(1, 3, 16, 16), Schedule(runtime="cuda-graph"))


def test_cli_profile_in_a_runtime(tmp_path, capsys):
    from filterprune.cli import main

    fp.save(fp.build("vgg16_layout", num_classes=2, width=0.03), tmp_path / "m.safetensors", metadata={"image_size": 32})
    code = main(["profile", "--model", str(tmp_path / "m.safetensors"), "--runtime", "onnxruntime", "--threads", "1",
                 "--batch-sizes", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"cpu, float32, 1 threads, onnxruntime {importlib.metadata.version('onnxruntime')}" in out and "latency, batch 1" in out
