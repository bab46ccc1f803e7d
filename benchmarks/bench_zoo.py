"""Models users bring from the ecosystem's libraries: does filterprune prune them, and Torch-Pruning?

30 models from segmentation_models_pytorch, transformers (vision CNNs from their configs),
ultralytics (YOLOv8 and YOLO11 from their .yaml), MONAI (3-D) and timm (models outside
bench_timm.py's list), with random weights and nothing downloaded. Each is pruned once the same
way by both libraries: l1 criterion, 30% of every layer (filterprune: scope="layer",
prune(ratio=0.3); Torch-Pruning 1.6.1: MetaPruner, MagnitudeImportance(p=1), pruning_ratio=0.3,
global_pruning=False), the head ignored (the layers that give YOLO's outputs: each Detect/Segment
branch's last conv, the DFL and the mask prototypes' last conv, Classify's Linear; else the last conv
or Linear to run, timm's classifier).

The check is this script's own, not the pruner's: the original model with the removed channels
zeroed where they are consumed (found by matching the pruned layers' weights to the original's)
must give the pruned model's outputs, on fresh inputs of two batch sizes ("exact"). Where a
removal touches a norm across channels (LayerNorm, GroupNorm) exactness is undefined and only the
output shapes are compared ("forward-only"). Prints a markdown table and writes JSON.

    pip install -e '.[zoo,bench]'
    python benchmarks/bench_zoo.py [--models unet,yolov8n] [--frontend fx] [--no-torch-pruning] [--json zoo.json]
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import json
import os
import signal
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

# ultralytics writes a settings file at import and may look for updates: keep it offline and away from $HOME.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="bench-zoo-yolo-"))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import filterprune as fp  # noqa: E402

LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
ACROSS_CHANNELS = (nn.LayerNorm, nn.GroupNorm)  # removing a channel changes the others' statistics
TOLERANCE = 1e-4  # relative; a correct removal differs from its zeroed reference by rounding (~1e-6)
SHARE = 0.3
CHECK_BATCHES = (1, 3)


@dataclass
class Case:
    """One zoo model: how to build it (unpruned, random weights) and what it takes."""

    name: str
    library: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example's shape, without the batch
    head: Callable[[nn.Module], list[nn.Module]] | None = None  # default: the last conv or Linear to run


def smp(arch: str, encoder: str = "resnet18") -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import segmentation_models_pytorch

        return segmentation_models_pytorch.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=2)
    return build


def hf(config: str, **settings) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config)(num_labels=10, **settings)
        return transformers.AutoModelForImageClassification.from_config(cfg)
    return build


def yolo(cfg: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import ultralytics

        return ultralytics.YOLO(cfg).model
    return build


def monai(net: str, **settings) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from monai.networks import nets

        return getattr(nets, net)(spatial_dims=3, **settings)
    return build


def timm_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)
    return build


def yolo_head(model: nn.Module) -> list[nn.Module]:
    """The layers that give YOLO's outputs: each branch's last conv, the DFL and Proto's last conv, Classify's Linear."""
    head = model.model[-1]
    if hasattr(head, "linear"):  # Classify
        return [head.linear]
    branches = [getattr(head, name) for name in ("cv2", "cv3", "cv4") if hasattr(head, name)]
    last = [branch[-1] for sequences in branches for branch in sequences]
    return last + [head.dfl.conv] + ([head.proto.cv3.conv] if hasattr(head, "proto") else [])


def timm_head(model: nn.Module) -> list[nn.Module]:
    return [model.get_classifier()]


IMAGE, VOLUME = (3, 64, 64), (1, 32, 32, 32)
ZOO = [
    Case("unet", "smp", smp("Unet"), IMAGE),
    Case("unetplusplus", "smp", smp("UnetPlusPlus"), IMAGE),
    Case("fpn", "smp", smp("FPN", "mobilenet_v2"), IMAGE),
    Case("deeplabv3plus", "smp", smp("DeepLabV3Plus"), IMAGE),
    Case("linknet", "smp", smp("Linknet"), IMAGE),
    Case("pspnet", "smp", smp("PSPNet", "efficientnet-b0"), IMAGE),
    Case("manet", "smp", smp("MAnet"), IMAGE),
    Case("hf-resnet50", "transformers", hf("ResNetConfig"), IMAGE),
    Case("hf-convnext-tiny", "transformers", hf("ConvNextConfig"), IMAGE),
    Case("hf-mobilenet_v2", "transformers", hf("MobileNetV2Config"), IMAGE),
    Case("hf-efficientnet-b0", "transformers", hf("EfficientNetConfig", width_coefficient=1.0, depth_coefficient=1.0,
                                                                  hidden_dim=1280), IMAGE),
    Case("hf-regnet-y", "transformers", hf("RegNetConfig"), IMAGE),
    Case("yolov8n", "ultralytics", yolo("yolov8n.yaml"), IMAGE, yolo_head),
    Case("yolov8n-cls", "ultralytics", yolo("yolov8n-cls.yaml"), IMAGE, yolo_head),
    Case("yolov8n-seg", "ultralytics", yolo("yolov8n-seg.yaml"), IMAGE, yolo_head),
    Case("yolo11n", "ultralytics", yolo("yolo11n.yaml"), IMAGE, yolo_head),
    Case("yolo11n-cls", "ultralytics", yolo("yolo11n-cls.yaml"), IMAGE, yolo_head),
    Case("yolo11n-seg", "ultralytics", yolo("yolo11n-seg.yaml"), IMAGE, yolo_head),
    Case("monai-unet", "monai", monai("UNet", in_channels=1, out_channels=2, channels=(16, 32, 64, 128),
                                      strides=(2, 2, 2), num_res_units=2), VOLUME),
    Case("monai-densenet121", "monai", monai("DenseNet121", in_channels=1, out_channels=2), VOLUME),
    Case("monai-segresnet", "monai", monai("SegResNet", in_channels=1, out_channels=2, init_filters=8), VOLUME),
    Case("monai-basicunet", "monai", monai("BasicUNet", in_channels=1, out_channels=2), VOLUME),
    Case("monai-resnet18", "monai", monai("resnet18", n_input_channels=1, num_classes=2), VOLUME),
    *[Case(name, "timm", timm_model(name), IMAGE, timm_head)
      for name in ("edgenext_xx_small", "mobileone_s0", "ghostnetv2_100", "convnextv2_atto", "mobilenetv4_conv_small",
                   "efficientvit_b0", "repghostnet_050")],
]


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return case.build().eval()


def inputs(case: Case, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *case.input_shape, generator=torch.Generator().manual_seed(seed))


def head_of(case: Case, model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    if case.head is not None:
        return case.head(model)
    ran: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in model.modules() if isinstance(m, LAYERS)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return ran[-1:]


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def flat_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------- the zeroed reference

def _rows(layer: nn.Module) -> tuple[torch.Tensor, int]:
    """The layer's weight as [out, in / groups, kernel] in float64, and its groups."""
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return w.unsqueeze(-1), 1
    g = layer.groups
    if layer.transposed:  # [in, out / groups, *kernel]
        w = w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(1, 2).reshape(g * w.shape[1], w.shape[0] // g, -1)
    return w.flatten(2), g


def kept_inputs(original: nn.Module, pruned: nn.Module, keep_out: torch.Tensor) -> torch.Tensor:
    """Original indices of the input channels `pruned` kept, found by matching its weight columns
    with the original's (random weights: every column is unique) given the kept output rows."""
    w, g = _rows(original)
    wp, gp = _rows(pruned)
    per_out, per_in = w.shape[0] // g, w.shape[1]
    out_p, in_p, k = wp.shape
    rows = keep_out.view(gp, out_p // gp)
    group = rows[:, 0] // per_out  # the original group of each pruned group
    if not (rows // per_out == group[:, None]).all():
        raise ValueError("a pruned group mixes output rows of several original groups")
    # columns: [group, input, every row's kernel], hashed by one random projection
    cols_p = wp.view(gp, out_p // gp, in_p, k).transpose(1, 2).flatten(2)
    cols = w[keep_out].view(gp, out_p // gp, per_in, k).transpose(1, 2).flatten(2)
    r = torch.randn(cols.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    j = ((cols_p @ r)[:, :, None] - (cols @ r)[:, None, :]).abs().argmin(-1)  # [gp, in_p]
    matched = cols.gather(1, j[..., None].expand(-1, -1, cols.shape[-1]))
    if not torch.equal(matched, cols_p) or any(len(set(row)) < len(row) for row in j.tolist()):
        raise ValueError("its weight is not a slice of the original's")
    return (group[:, None] * per_in + j).flatten()


def zeroed_reference(original: nn.Module, pruned: nn.Module, removed: dict[str, list[int]]) -> nn.Module:
    """A copy of `original` whose convs and Linears see zeros on the input channels `pruned` lost.

    removed: layer name -> original indices of its removed output channels (the pruner's report).
    """
    reference = copy.deepcopy(original)
    pruned_layers = dict(pruned.named_modules())
    for name, layer in reference.named_modules():
        if not isinstance(layer, LAYERS):
            continue
        small = pruned_layers[name]
        if small.weight.shape == layer.weight.shape and name not in removed:
            continue
        outs = layer.weight.shape[1] * layer.groups if getattr(layer, "transposed", False) else layer.weight.shape[0]
        keep_out = torch.ones(outs, dtype=torch.bool)
        try:
            keep_out[removed.get(name, [])] = False
            kept = kept_inputs(layer, small, keep_out.nonzero().flatten())
        except (ValueError, RuntimeError, IndexError) as err:  # shapes or indices that cannot be a slice
            raise ValueError(f"{name}: {err}") from err
        mask = torch.zeros(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)
        mask[kept] = 1
        dim = -1 if isinstance(layer, nn.Linear) else 1

        def zero(module, args, mask=mask, dim=dim):
            shape = [1] * args[0].dim()
            shape[dim] = -1
            return (args[0] * mask.view(shape).to(args[0].dtype),) + tuple(args[1:])

        layer.register_forward_pre_hook(zero)
    return reference


def check(case: Case, original: nn.Module, pruned: nn.Module, removed: dict[str, list[int]], exact: bool) -> str:
    """'exact', 'forward-only', or 'failed: why', on fresh inputs of every CHECK_BATCHES size.

    exact: whether the pruner says exactness is defined; it is not where a norm across channels
    lost some (checked here too), and then only the output shapes are compared."""
    changed = [m for n, m in pruned.named_modules() if isinstance(m, ACROSS_CHANNELS)
               and any(p.shape != q.shape for p, q in zip(m.parameters(), original.get_submodule(n).parameters()))]
    exact = exact and not changed
    try:
        reference = zeroed_reference(original, pruned, removed) if exact else original
    except ValueError as err:
        return f"failed: no zeroed reference ({err})"
    for seed, batch in enumerate(CHECK_BATCHES):
        x = inputs(case, batch, seed + 1)
        try:
            got = flat_outputs(pruned, x)
        except Exception as err:
            return f"failed: the pruned model does not run at batch {batch}: {type(err).__name__}: {err}"
        want = flat_outputs(reference, x)
        if [t.shape for t in got] != [t.shape for t in want]:
            return f"failed: output shapes {[tuple(t.shape) for t in got]} at batch {batch}, not {[tuple(t.shape) for t in want]}"
        for a, b in zip(got, want) if exact else ():
            error = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()
            if error > TOLERANCE:
                return f"failed: differs from the zeroed original by {error:.1e} (relative) at batch {batch}"
    return "exact" if exact else "forward-only"


# ---------------------------------------------------------------- the two pruners

def run_filterprune(case: Case, frontend: str) -> dict:
    model = build(case)
    x = inputs(case, 1, 0)
    original, before = copy.deepcopy(model), macs(model, x)
    try:
        pruner = fp.Pruner(model, x, criterion="l1", scope="layer", ignore=head_of(case, model, x), frontend=frontend)
        result = pruner.prune(ratio=SHARE)
    except Exception as err:
        return {"check": f"failed: {one_line(err)}", "macs_before": before, "macs_after": before, "left_out": "-"}
    outcome = check(case, original, model, result.removed, result.check == "exact") if result.count else \
        "failed: nothing was pruned"
    return {"check": outcome, "macs_before": before, "macs_after": macs(model, x), "left_out": left_out(pruner),
            "first_left_out": pruner.skipped[0] if pruner.skipped else ""}


def left_out(pruner: fp.Pruner) -> int:
    """How many ops (or groups, where the front end reports them) were left out of pruning."""
    return len(pruner.skipped)


def run_torch_pruning(case: Case) -> dict:
    import torch_pruning as tp

    model = build(case)
    x = inputs(case, 1, 0)
    original, before = copy.deepcopy(model), macs(model, x)
    names = {m: n for n, m in model.named_modules()}
    removed: dict[str, list[int]] = {}
    try:
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=SHARE, global_pruning=False, ignored_layers=head_of(case, model, x))
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                if pruner.DG.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names:
                    removed.setdefault(names[dep.target.module], []).extend(int(getattr(i, "idx", i)) for i in idxs)
            group.prune()
    except Exception as err:
        return {"check": f"failed: {one_line(err)}", "macs_before": before, "macs_after": before}
    outcome = check(case, original, model, removed, True) if removed else "failed: nothing was pruned"
    try:
        after = macs(model, x)
    except Exception:
        after = before
    return {"check": outcome, "macs_before": before, "macs_after": after}


class OutOfTime(BaseException):
    """A run took too long: a BaseException, so that no `except Exception` on the way takes it for the model's error."""


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise OutOfTime in the main thread after `seconds` (a pruner that hangs on a model fails it)."""
    def expire(signum, frame):
        raise OutOfTime(f"gave up after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_line(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{text[:160]} ({os.path.basename(frame.filename)}:{frame.lineno})"


def limited(run: Callable[[Case], dict], case: Case, seconds: int) -> dict:
    """run(case), or a failed row if it takes longer than `seconds` or the model cannot even be built."""
    try:
        with time_limit(seconds):
            return run(case)
    except (Exception, OutOfTime) as err:
        return {"check": f"failed: {one_line(err)}", "macs_before": 0, "macs_after": 0, "left_out": "-"}


def counts(row: dict) -> bool:
    """Pruned with a check and at least 1.3x fewer MACs."""
    return row["check"] in ("exact", "forward-only") and row["macs_before"] >= 1.3 * row["macs_after"]


def cell(row: dict) -> str:
    cut = row["macs_before"] / max(row["macs_after"], 1)
    return f"{row['check'].replace('|', '/')[:200]} | {row['macs_before'] / 1e6:.1f} -> {row['macs_after'] / 1e6:.1f} ({cut:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: the whole zoo)")
    parser.add_argument("--libraries", default="", help="comma-separated libraries (smp, transformers, ultralytics, monai, timm)")
    parser.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning column")
    parser.add_argument("--frontend", default="auto", choices=("auto", "export", "fx"),
                        help="filterprune's front end (fx: the torch.fx tracer it had before torch.export)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds each pruner may take on one model")
    parser.add_argument("--json", default="bench_zoo.json", help="where to write the rows")
    args = parser.parse_args()
    chosen = [c for c in ZOO if (not args.models or c.name in args.models.split(","))
              and (not args.libraries or c.library in args.libraries.split(","))]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    print("| model | library | filterprune check | filterprune MMACs (cut) | left out | Torch-Pruning check | Torch-Pruning MMACs (cut) |")
    print("|---|---|---|---|---|---|---|")
    for case in chosen:
        ours = limited(lambda c: run_filterprune(c, args.frontend), case, args.timeout)
        theirs = {"check": "not run", "macs_before": 0, "macs_after": 0} if args.no_torch_pruning else \
            limited(run_torch_pruning, case, args.timeout)
        rows.append({"model": case.name, "library": case.library, "filterprune": ours, "torch_pruning": theirs})
        print(f"| {case.name} | {case.library} | {cell(ours)} | {ours['left_out']} | {cell(theirs)} |", flush=True)
        with open(args.json, "w") as f:  # after every model: a long run that is stopped keeps its rows
            json.dump(rows, f, indent=1)
    ours_ok = sum(counts(r["filterprune"]) for r in rows)
    theirs_ok = sum(counts(r["torch_pruning"]) for r in rows)
    print(f"\nfilterprune: {ours_ok} of {len(rows)} pruned with a check and >= 1.3x fewer MACs; "
          f"Torch-Pruning: {theirs_ok} of {len(rows)} (at {SHARE:.0%} per layer, l1, head ignored)")


if __name__ == "__main__":
    main()
