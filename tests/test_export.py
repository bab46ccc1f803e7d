"""Export to every format (issue 18): each file runs in its runtime and agrees with PyTorch on the
example input (and at another batch size, where the batch is dynamic); int8 from the CLI."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import filterprune as fp
from filterprune.cli import main
from filterprune.export import FORMATS, ExportError, check_agreement, export_model, onnx_accuracy, quantize_int8
from filterprune.runtimes import get
from images import COLOURS, one_thread, picture  # noqa: F401  (one_thread: an autouse fixture)


def tiny() -> nn.Module:
    """Conv, BatchNorm with non-trivial statistics, pooling and a Linear, in training mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model[1].running_mean.uniform_(-0.1, 0.1)
    model[1].running_var.uniform_(0.5, 1.5)
    return model.train()


def run_file(path, fmt: str, x: torch.Tensor) -> np.ndarray:
    if fmt == "pt2":
        with torch.no_grad():
            return torch.export.load(str(path)).module()(x).numpy()
    return get(FORMATS[fmt].runtime).open(path, threads=1)((x,))[0]


def test_onnx_export_matches_pytorch(tmp_path):
    model = tiny()
    path = fp.export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")  # the old name still works
    assert model.training  # mode restored
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch
    model.eval()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_agrees_with_pytorch_at_any_batch(fmt, tmp_path):
    model, x = tiny(), torch.randn(1, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path, error = export_model(model, x, tmp_path / f"m{FORMATS[fmt].suffix}", fmt)
    assert path.is_file() and 0 <= error <= 1e-4
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # left as it was
    model.eval()
    for batch in (3, 64):  # other batch sizes than traced, up to ExecuTorch's largest: the batch is dynamic
        xb = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            np.testing.assert_allclose(run_file(path, fmt, xb), model(xb).numpy(), atol=1e-4, rtol=1e-4)


def test_a_file_that_does_not_agree_is_refused(tmp_path):
    model, x = tiny(), torch.randn(1, 3, 16, 16)
    path, _ = export_model(model, x, tmp_path / "m.onnx", "onnx")
    with torch.no_grad():
        model[-1].bias += 0.01  # the PyTorch model changed after the export
    with pytest.raises(ExportError, match="differs from the PyTorch model by 0.01"):
        check_agreement(model, x, path, "onnx")


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="choose one of onnx, openvino, executorch, pt2"):
        export_model(tiny(), torch.randn(1, 3, 16, 16), tmp_path / "m.x", "tflite")


def test_int8_keeps_accuracy_of_a_model_that_separates_its_classes(tmp_path):
    """A model whose float accuracy is 100%: int8 must keep nearly all of it, and be smaller."""
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (64,))
    images = torch.randn(64, 3, 16, 16)
    images[:, 0] += 2.0 * labels[:, None, None] - 1.0  # the first channel's mean decides the class, with a margin
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.zero_(), model[0].bias.zero_()
        model[0].weight[0, 0], model[0].weight[1, 0] = 1.0, -1.0
        model[-1].weight.zero_(), model[-1].bias.zero_()
        model[-1].weight[1, 0], model[-1].weight[1, 1] = 1.0, -1.0
    path, _ = export_model(model, images[:1], tmp_path / "m.onnx")
    int8 = quantize_int8(path, tmp_path / "m.int8.onnx", images[:32].split(8))
    loader = list(zip(images.split(16), labels.split(16)))
    assert onnx_accuracy(path, loader, threads=1) == 1.0
    assert onnx_accuracy(int8, loader, threads=1) >= 0.95
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_cli_exports_each_format_and_int8_with_accuracies(tmp_path, capsys):
    for c in ("cat", "dog"):
        for i in range(6):
            folder = tmp_path / "data" / ("train" if i < 4 else "test") / c
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture(c, i)).save(folder / f"{c}{i}.jpg")
    model = fp.build("vgg16_layout", num_classes=2, width=0.03)
    fp.save(model, tmp_path / "m.safetensors", metadata={"image_size": 32})
    code = main(["export", "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "m.xml"), "--format", "openvino"])
    out, err = capsys.readouterr()
    assert code == 0 and (tmp_path / "m.xml").is_file() and (tmp_path / "m.bin").is_file(), err
    assert re.search(r"\(openvino\); largest difference from PyTorch on the example input: \S+", out), out
    code = main(["export", "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "m.onnx"), "--int8",
                 "--data", str(tmp_path / "data"), "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert code == 0 and (tmp_path / "m.int8.onnx").is_file(), err
    assert re.search(r"int8, calibrated on 8 training images\); accuracy on the 4 test images in ONNX Runtime: "
                     r"float \d+\.\d\d%, int8 \d+\.\d\d% \([+-]\d+\.\d\d points\)", out), out
    code = main(["export", "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "m.pte"), "--int8"])
    err = capsys.readouterr().err
    assert code == 2 and "--format onnx and --data DIR" in err and len(err.strip().splitlines()) == 1, err
