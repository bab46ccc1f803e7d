import pytest
import torch
from torch import nn

from filterprune.measure import Profile, latency_ms, profile
from filterprune.models import vgg16_layout


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
    assert list(d) == ["params", "size_mb", "macs", "latency_ms_b1", "latency_ms_b2", "device", "dtype", "threads"]
    assert (d["device"], d["dtype"], d["threads"]) == ("cpu", "float32", 1)
    text = str(p)
    assert "ms" in text and "MB" in text and "MMACs" in text


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
    p = Profile(params=1, size_mb=0.5, macs=2, latency_ms={64: 3.0}, device="cpu", dtype="float32", threads=2)
    assert p.as_dict()["latency_ms_b64"] == 3.0
