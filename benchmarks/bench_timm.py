"""How much of timm's CNN zoo filterprune prunes: exact (self-checked) removal and the MACs cut.

Each model is built with pretrained=False (no download), pruned once at 30% of every group
(scope="layer", l1 criterion, classifier ignored) and checked by the Pruner against the unpruned
model with the removed channels zeroed. Prints a markdown table and a summary line.

    PYTHONPATH=src python benchmarks/bench_timm.py [--models resnet18,efficientnet_b0] [--size 64]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import filterprune as fp

# (model, input size): the smallest size each accepts with a sensible feature map.
MODELS = [
    ("resnet18", 64), ("resnet50d", 64), ("resnext26ts", 64), ("seresnext26d_32x4d", 64), ("resnetv2_50x1_bit", 64),
    ("efficientnet_b0", 64), ("tf_efficientnet_b0", 64), ("mobilenetv2_100", 64), ("mobilenetv3_large_100", 64),
    ("regnetx_002", 64), ("regnety_002", 64), ("densenet121", 64), ("inception_v3", 96), ("convnext_atto", 64),
    ("dla34", 64), ("dpn48b", 64), ("ghostnet_100", 64), ("hrnet_w18_small", 64), ("mixnet_s", 64),
    ("rexnet_100", 64), ("cspresnet50", 64), ("cspdarknet53", 64), ("ese_vovnet19b_dw", 64), ("selecsls42b", 64),
    ("hardcorenas_a", 64), ("lcnet_050", 64), ("repvgg_a0", 64), ("res2net50_14w_8s", 64), ("skresnet18", 64),
    ("nf_resnet26", 64), ("gernet_s", 64), ("fbnetv3_b", 64),
]


def macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def run(name: str, size: int, share: float) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    row = {"model": name, "size": size}
    before = macs(model, x)
    start = time.perf_counter()
    try:
        pruner = fp.Pruner(model, x, criterion="l1", scope="layer", ignore=[model.get_classifier()])
        # Slots where removal changes the channels that stay (LayerNorm over channels, a weight-
        # standardised conv's inputs) cannot be compared with the zeroed model: check they run.
        inexact = sum(not s.exact and bool((s.owner >= 0).any()) for s in pruner.graph.slots)
        pruner.verify = not inexact
        with torch.no_grad():
            expected = model(x).shape
        total = sum(g.size for g in pruner.groups)
        pruner.prune(int(share * total))
        with torch.no_grad():
            assert model(x).shape == expected, "the pruned model's output changed shape"
        row["exact"] = f"forward-only ({inexact} inexact slots)" if inexact else "yes"
    except Exception as err:  # a row per model: report, do not stop
        row["exact"] = f"no: {type(err).__name__}: {str(err)[:80]}"
        pruner = None
    row["seconds"] = time.perf_counter() - start
    try:
        after = macs(model, x)
    except RuntimeError as err:  # a failed removal that could not be undone
        row["exact"] += f"; broken model: {str(err)[:60]}"
        after = before
    row["factor"] = before / after
    row["skipped"] = len(pruner.skipped) if pruner else "-"
    row["first skip"] = (pruner.skipped[0][:110] if pruner and pruner.skipped else "")
    row["macs"] = f"{before / 1e6:.1f} -> {after / 1e6:.1f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated timm names (default: the built-in set)")
    parser.add_argument("--size", type=int, default=0, help="input size for every model (default: per model)")
    parser.add_argument("--share", type=float, default=0.3, help="share of every group to remove")
    args = parser.parse_args()
    chosen = [(m, args.size or dict(MODELS).get(m, 64)) for m in args.models.split(",")] if args.models else MODELS
    rows = []
    print("| model | px | exact | MMACs before -> after | factor | skipped ops | first skip reason | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size in chosen:
        row = run(name, args.size or size, args.share)
        rows.append(row)
        print(f"| {row['model']} | {row['size']} | {row['exact']} | {row['macs']} | {row['factor']:.2f}x | {row['skipped']} "
              f"| {row['first skip'].replace('|', '/')} | {row['seconds']:.1f} |", flush=True)
    good = sum(r["exact"] == "yes" and r["factor"] > 1.05 for r in rows)
    runs = sum(r["exact"] != "yes" and not r["exact"].startswith("no") and r["factor"] > 1.05 for r in rows)
    print(f"\n{good} of {len(rows)} models exact with a MACs cut (> 1.05x) at {args.share:.0%} per layer; "
          f"{runs} more pruned with a MACs cut and checked forward-only")


if __name__ == "__main__":
    main()
