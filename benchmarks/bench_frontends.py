"""torch.fx against torch.export as filterprune's front end, on torchvision's and timm's zoos.

For each model (random weights, no download): build a Pruner with each front end, say whether both
find the same groups, then prune 30% of every group (scope="layer", l1, classifier ignored) with
each and report the check ("exact", "forward-only" where removal changes the channels that stay,
or the error) and the MACs cut. The seconds columns are construction times; on a loaded machine
they say nothing, so read them from an idle one.

    PYTHONPATH=src python benchmarks/bench_frontends.py [--zoo torchvision|timm|all] [--models a,b]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision
from torch import nn

import filterprune as fp

TIMM_SIZES = {"inception_v3": 96}
TORCHVISION = [  # classification, video, segmentation
    "alexnet", "vgg11_bn", "vgg16_bn", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
    "googlenet", "inception_v3", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf", "regnet_y_400mf",
    "mnasnet0_5", "convnext_tiny", "r3d_18", "mc3_18", "r2plus1d_18", "fcn_resnet50", "lraspp_mobilenet_v3_large",
]


def build(zoo: str, name: str) -> tuple[nn.Module, torch.Tensor, nn.Module | None]:
    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        size = TIMM_SIZES.get(name, 64)
        return model, torch.randn(1, 3, size, size), model.get_classifier()
    kwargs = {"weights": None, "num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs |= {"aux_logits": False, "init_weights": True}
    if name.startswith(("fcn", "lraspp", "deeplab")):
        kwargs |= {"weights_backbone": None}
    model = torchvision.models.get_model(name, **kwargs).eval()
    video = name in ("r3d_18", "mc3_18", "r2plus1d_18")
    size = 96 if name == "inception_v3" else 64
    x = torch.randn(1, 3, 4, 32, 32) if video else torch.randn(1, 3, size, size)
    head = next((m for m in reversed(list(model.modules())) if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))), None)
    return model, x, head


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def prune(model: nn.Module, x: torch.Tensor, head, frontend: str) -> dict:
    start = time.perf_counter()
    pruner = fp.Pruner(model, x, criterion="l1", scope="layer", ignore=[head] if head is not None else [], frontend=frontend)
    seconds = time.perf_counter() - start
    groups = [(g.name, g.size) for g in pruner.groups]
    before = macs(model, x)
    result = pruner.prune(int(0.3 * sum(g.size for g in pruner.groups)))
    return {"groups": groups, "check": result.check, "factor": before / macs(model, x), "seconds": seconds,
            "probed": sum(s.startswith("group ") for s in pruner.skipped)}


def row(zoo: str, name: str) -> dict:
    out = {"model": name}
    model, x, head = build(zoo, name)
    for frontend in ("fx", "export"):
        trial = copy.deepcopy(model)
        head_copy = None if head is None else trial.get_submodule(next(n for n, m in model.named_modules() if m is head))
        try:
            out[frontend] = prune(trial, x, head_copy, frontend)
        except Exception as err:  # a row per model: report, do not stop
            out[frontend] = {"check": f"no: {type(err).__name__}: {' '.join(str(err).split())[:70]}", "groups": None,
                             "factor": 1.0, "seconds": float("nan"), "probed": "-"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="all", choices=["torchvision", "timm", "all"])
    parser.add_argument("--models", default="", help="comma-separated names (default: the whole zoo)")
    args = parser.parse_args()
    zoos = ["torchvision", "timm"] if args.zoo == "all" else [args.zoo]
    print("| zoo | model | same groups | fx check | fx MACs cut | export check | export MACs cut | groups left out by the probe "
          "| fx s | export s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    counts = {"fx": 0, "export": 0, "same": 0, "rows": 0}
    for zoo in zoos:
        if args.models:
            names = args.models.split(",")
        elif zoo == "timm":
            from bench_timm import MODELS

            names = [m for m, _ in MODELS]
        else:
            names = TORCHVISION
        for name in names:
            r = row(zoo, name)
            fx, ex = r["fx"], r["export"]
            same = fx["groups"] is not None and fx["groups"] == ex["groups"]
            counts["rows"] += 1
            counts["same"] += same
            counts["fx"] += fx["check"] in ("exact", "forward-only") and fx["factor"] > 1.05
            counts["export"] += ex["check"] in ("exact", "forward-only") and ex["factor"] > 1.05
            print(f"| {zoo} | {name} | {'yes' if same else 'no'} | {fx['check']} | {fx['factor']:.2f}x | {ex['check']} | "
                  f"{ex['factor']:.2f}x | {ex['probed']} | {fx['seconds']:.1f} | {ex['seconds']:.1f} |", flush=True)
    print(f"\n{counts['rows']} models: fx prunes {counts['fx']} with a check and a MACs cut > 1.05x, export {counts['export']}; "
          f"the same groups on {counts['same']}")


if __name__ == "__main__":
    main()
