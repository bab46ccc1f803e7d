"""Every GPU measurement of filterprune in one script, printing one table per section.

    python benchmarks/bench_gpu.py [--sections round self-check rank train latency-aware]
                                   [--device cuda] [--quick]

1. round:        channel counts at equal MACs with and without rounding (round_to 1, 8, 16):
                 resnet50, mobilenet_v2, vgg16 at 224, batch 64, float32 / bf16 / bf16 + channels_last.
   deploy:       the 50% pair in bf16 + channels_last as eager, with cudnn.benchmark, and as a CUDA graph.
   profile:      the same pair through fp.profile (eager and runtime="cuda-graph") and `filterprune profile --runtime cuda-graph`.
2. self-check:   vgg16 and resnet50 at 224 pruned in 40 steps in float32 with TF32 on (cuDNN's and
                 matmul's): refusals counted; then a corrupted surgery must still be refused.
3. rank:         rank() with taylor against a plain forward + backward (resnet50, batch 64, 224).
4. train:        images per second of train.fine_tune against a plain PyTorch loop on the same
                 model and loader (resnet50, batch 64, 224), float32 and bf16 + channels_last.
5. latency-aware: prune resnet50 and vgg16 at 224 to a 2x measured batch-64 speed-up, ranking
                 regularised by MACs or by measured latency: MACs and parameters left.

The blog's recipe at 224 is a CLI run (benchmarks/README.md gives the command). Models have random
weights: none of these measurements depends on the weights' values. Timings are medians with
their interquartile range (filterprune.measure.time_ms), and every speed claim goes through
filterprune.speed_change. --quick shrinks everything to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
import traceback

import torch
import torchvision
from torch import nn

import filterprune as fp
import filterprune.pruner as pruner_module
from filterprune.measure import latency_spread_ms, time_ms
from filterprune.schedule import measured_unit_cost
from filterprune.train import fine_tune

SECTIONS = ("round", "deploy", "profile", "self-check", "rank", "train", "latency-aware")


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")
    sys.stdout.flush()


def convs_only(model: nn.Module) -> list[nn.Module]:
    """The hidden Linear layers of a VGG classifier (kept, as in the blog); none elsewhere."""
    return [m for m in model.classifier if isinstance(m, nn.Linear)] if isinstance(model, torchvision.models.VGG) else []


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None).eval()


def ms(timing: tuple[float, float]) -> str:
    return f"{timing[0]:.2f} ({timing[1]:.2f})"


# ---- 1. rounding -------------------------------------------------------------------------------------------


MODES = {"float32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16 + channels_last": (torch.bfloat16, True)}


def timed(model: nn.Module, x: torch.Tensor, mode: str, device: str, run_time: float) -> tuple[float, float]:
    dtype, channels_last = MODES[mode]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=fmt)
    return latency_spread_ms(m, x.to(device=device, dtype=dtype, memory_format=fmt), device=device, min_run_time=run_time)


def bench_round(args) -> None:
    rows = []
    for arch in ("resnet50", "mobilenet_v2", "vgg16"):
        dense = build(arch).to(args.device)
        example = torch.randn(1, 3, args.size, args.size, device=args.device)
        variants, factor = {}, None
        # 50% of every layer (the first sets the MACs target), then the default global ranking to
        # the same MACs, whose channel counts fall anywhere unless rounded.
        for scope, r in (("layer", 1), ("layer", 8), ("global", 1), ("global", 8), ("global", 16)):
            model = copy.deepcopy(dense)
            pruner = fp.Pruner(model, example, criterion="l1", scope=scope, round_to=r, ignore=convs_only(model), verify=False)
            result = pruner.prune(ratio=0.5) if factor is None else pruner.prune(macs=factor)
            factor = factor or result.macs_before / result.macs_after
            odd = sum(g.size % 8 != 0 for g in pruner.groups)
            name = f"50% per layer, round_to={r}" if scope == "layer" else f"global, same MACs, round_to={r}"
            variants[name] = (model, f"{odd}/{len(pruner.groups)}")
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
        base = {mode: timed(dense, x, mode, args.device, args.run_time) for mode in MODES}
        macs0 = fp.profile(dense, example, latency=False).macs
        rows.append([arch, "unpruned", f"{macs0 / 1e9:.2f}", "-", *(f"{ms(base[m])}" for m in MODES)])
        for name, (model, odd) in variants.items():
            macs = fp.profile(model, example, latency=False).macs
            cells = []
            for mode in MODES:
                t = timed(model, x, mode, args.device, args.run_time)
                cells.append(f"{ms(t)}: {fp.speed_change(base[mode][0], t[0], base[mode][1], t[1])}")
            rows.append([arch, name, f"{macs / 1e9:.2f} ({macs0 / macs:.2f}x fewer)", odd, *cells])
    table(f"Channel rounding at equal MACs: batch {args.batch} at {args.size}x{args.size}, ms per batch, median (IQR)",
          ["model", "channels", "GMACs", "groups not /8", *MODES], rows)


def bench_deploy(args) -> None:
    """The same pair (unpruned, 50% per layer with the default rounding) in bf16 + channels_last,
    timed as eager PyTorch, with cudnn.benchmark (cuDNN tries its kernels per shape), and replayed
    as a CUDA graph (launch overhead gone): how much of the MACs cut each deployed form turns into speed."""
    rows = []
    for arch in ("resnet50", "mobilenet_v2", "vgg16"):
        dense = build(arch).to(args.device)
        example = torch.randn(1, 3, args.size, args.size, device=args.device)
        pruned = copy.deepcopy(dense)
        pruner = fp.Pruner(pruned, example, criterion="l1", scope="layer", ignore=convs_only(pruned), verify=False)
        result = pruner.prune(ratio=0.5)
        pair = [m.to(dtype=torch.bfloat16, memory_format=torch.channels_last) for m in (dense, pruned)]
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        forms = ("eager", "eager + cudnn.benchmark", "CUDA graph + cudnn.benchmark")
        for form in forms if args.device.startswith("cuda") else forms[:1]:
            torch.backends.cudnn.benchmark = form != "eager"
            t = [latency_spread_ms(m, x, min_run_time=args.run_time, runtime="cuda-graph" if form.startswith("CUDA graph") else "eager")
                 for m in pair]
            rows.append([arch, f"{result.macs_before / result.macs_after:.2f}x", f"round_to={pruner.round_to}", form, ms(t[0]), ms(t[1]),
                         fp.speed_change(t[0][0], t[1][0], t[0][1], t[1][1])])
        torch.backends.cudnn.benchmark = False
    table(f"Deployed forms: bf16 + channels_last, batch {args.batch} at {args.size}x{args.size}, 50% of every layer's channels, "
          "ms per batch, median (IQR)", ["model", "MACs fewer", "rounding", "form", "unpruned", "pruned", "measured"], rows)


# ---- 2. self-check under TF32 --------------------------------------------------------------------------------


def corrupt_after_cut(model, graph, remove):
    """A surgery bug that keeps every shape right: the right cut, then one weight scaled."""
    kept = real_remove_units(model, graph, remove)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.weight = nn.Parameter(conv.weight.detach() * 1.5)
    return kept


real_remove_units = pruner_module.remove_units


def bench_self_check(args) -> None:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
    torch.backends.cuda.matmul.allow_tf32 = True  # not the default: the harshest case for the check
    try:
        check_under_tf32(args)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_under_tf32(args) -> None:
    rows = []
    for arch in ("vgg16", "resnet50"):
        model = build(arch).to(args.device)
        example = torch.randn(1, 3, args.size, args.size, device=args.device)
        pruner = fp.Pruner(model, example, criterion="l1", ignore=convs_only(model))
        per_step = max(1, sum(g.size for g in pruner.groups) // (2 * args.steps))  # 40 steps: about half the channels
        refused, errors, start = 0, [], time.perf_counter()
        for _ in range(args.steps):
            try:
                pruner.prune(per_step)
            except fp.GraphError as err:
                refused += 1
                errors.append(str(err).splitlines()[0][:120])
        seconds = time.perf_counter() - start
        pruner_module.remove_units = corrupt_after_cut
        try:
            caught = f"NOT refused ({pruner.prune(per_step).count} removed)"
        except fp.GraphError as err:
            caught = "refused: " + str(err).split("(")[0][:60]
        finally:
            pruner_module.remove_units = real_remove_units
        rows.append([arch, args.steps, per_step, f"{pruner.macs_at_start / pruner.macs():.2f}x", refused, f"{seconds:.1f}", caught,
                     errors[0] if errors else ""])
    table(f"Self-check on {args.device} in float32, TF32 on, {args.size}x{args.size}",
          ["model", "steps", "channels per step", "MACs fewer", "refusals", "s", "corrupted surgery", "first refusal"], rows)


# ---- 3. rank() -----------------------------------------------------------------------------------------------


def bench_rank(args) -> None:
    model = build("resnet50").to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for criterion in ("taylor", "taylor-weight"):
        pruner = fp.Pruner(model, x[:1], criterion=criterion, ignore=[model.fc])
        # One batch per call (rank()'s set-up and scoring are counted whole), and a loader of
        # --rank-batches batches (as ranking runs over data), per batch.
        for batches in (1, args.rank_batches):

            def plain():  # training steps without the optimizer, in eval mode like rank()
                for _ in range(batches):
                    model.zero_grad(set_to_none=True)
                    loss_fn(model(x), y).backward()

            # Timed in turns, `repeats` times: one pair of timings can catch a slow stretch of the machine.
            for repeat in range(args.repeats):
                base = time_ms(plain, min_run_time=args.run_time)
                ranked = time_ms(lambda: pruner.rank([(x, y)] * batches, loss_fn, progress=False), min_run_time=args.run_time)
                ratio = ranked[0] / base[0]
                per = lambda t: (t[0] / batches, t[1] / batches)  # noqa: E731
                rows.append([criterion, batches, repeat, ms(per(base)), ms(per(ranked)), f"{ratio:.2f}x",
                             "MET" if ratio <= 1.3 else "NOT MET"])
    table(f"rank() against a plain forward + backward: resnet50, batch {args.batch} at {args.size}x{args.size}, ms per batch",
          ["criterion", "batches per call", "repeat", "plain fwd+bwd, median (IQR)", "rank(), median (IQR)", "ratio", "target <= 1.3x"],
          rows)


def bench_profile(args) -> None:
    """The user's path: fp.profile on the 50% resnet50 pair cast to bf16 + channels_last (the
    example stays float32 and contiguous, as users pass it), eager and as a CUDA graph; then the
    CLI's `filterprune profile --runtime cuda-graph` on the pruned model saved with fp.save."""
    dense = build("resnet50").to(args.device)
    example = torch.randn(1, 3, args.size, args.size)
    pruned = copy.deepcopy(dense)
    fp.Pruner(pruned, example.to(args.device), criterion="l1", scope="layer", ignore=[pruned.fc], verify=False).prune(ratio=0.5)
    graph = args.device.startswith("cuda")
    torch.backends.cudnn.benchmark = True
    rows = []
    for form in (False, True) if graph else (False,):
        p = [fp.profile(m.to(dtype=torch.bfloat16, memory_format=torch.channels_last), example, batch_sizes=(args.batch,),
                        device=args.device, runtime="cuda-graph" if form else "eager", min_run_time=args.run_time)
             for m in (dense, pruned)]
        t = [(q.latency_ms[args.batch], q.latency_iqr_ms[args.batch]) for q in p]
        rows.append([p[1].runtime, p[1].dtype, ms(t[0]), ms(t[1]), fp.speed_change(t[0][0], t[1][0], t[0][1], t[1][1])])
    torch.backends.cudnn.benchmark = False
    table(f"fp.profile: resnet50, 50% of every layer's channels, bf16 + channels_last, batch {args.batch} at {args.size}x{args.size}",
          ["form", "dtype", "unpruned ms (IQR)", "pruned ms (IQR)", "measured"], rows)
    path = "/tmp/filterprune_resnet50_half.safetensors"
    fp.save(pruned.float().to(memory_format=torch.contiguous_format).cpu(), path)
    command = [sys.executable, "-m", "filterprune", "profile", "--model", path, "--size", str(args.size), "--device", args.device,
               "--batch-sizes", f"1,{args.batch}", *(["--runtime", "cuda-graph"] if graph else [])]
    print("$ filterprune " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=False)


# ---- 4. fine-tuning throughput ------------------------------------------------------------------------------


def plain_epoch(model: nn.Module, loader, device: str, amp: bool, channels_last: bool) -> None:
    """A plain PyTorch training loop: what a user would write."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def images_per_second(run, n: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bench_train(args) -> None:
    n = args.batch * args.train_batches
    # Batches made once, in pinned memory (what make_loader gives on CUDA): the loops alone are
    # compared, not the loader's workers.
    pin = args.device.startswith("cuda")
    loader = [(torch.randn(args.batch, 3, args.size, args.size, pin_memory=pin), torch.randint(0, 1000, (args.batch,), pin_memory=pin))
              for _ in range(args.train_batches)]
    rows = []
    for amp, channels_last in ((False, False), (True, True)):
        speeds = {}
        for name in ("plain loop", "filterprune fine_tune", "plain loop ", "filterprune fine_tune "):  # alternated, twice
            model = build("resnet50").to(args.device)
            if channels_last:
                model.to(memory_format=torch.channels_last)
            if name.startswith("plain"):
                run = lambda: plain_epoch(model, loader, args.device, amp, channels_last)  # noqa: E731
            else:
                run = lambda: fine_tune(model, loader, 1, device=args.device, progress=False, amp=amp, channels_last=channels_last)  # noqa: E731
            run()  # warm-up epoch: cuDNN's search, the allocator
            speeds.setdefault(name.strip(), []).append(images_per_second(run, n, args.device))
        plain, ours = max(speeds["plain loop"]), max(speeds["filterprune fine_tune"])
        rows.append(["bf16 + channels_last" if amp else "float32", f"{plain:.0f}", f"{ours:.0f}", f"{100 * (ours / plain - 1):+.1f}%",
                     "MET" if ours >= 0.9 * plain else "NOT MET"])
    table(f"Fine-tuning throughput: resnet50, batch {args.batch} at {args.size}x{args.size}, {n} images an epoch, "
          "batches in pinned memory, best of 2 epochs, images/s",
          ["mode", "plain PyTorch loop", "filterprune fine_tune", "difference", "within 10%"], rows)


# ---- 5. latency-aware vs MACs-driven -------------------------------------------------------------------------


def bench_latency_aware(args) -> None:
    rows = []
    for arch in ("resnet50", "vgg16"):
        dense = build(arch).to(args.device)
        example = torch.randn(1, 3, args.size, args.size, device=args.device)
        x = example.expand(args.batch, -1, -1, -1).contiguous()
        base = latency_spread_ms(dense, x, min_run_time=args.run_time)
        probe = fp.Pruner(copy.deepcopy(dense), example, criterion="l1", ignore=convs_only(dense), verify=False)
        start = time.perf_counter()
        measured = measured_unit_cost(probe, args.batch, args.device, min_run_time=args.run_time / 4)
        cost_s = time.perf_counter() - start
        macs0, macs_cost = probe.macs_at_start, probe.graph.unit_cost() / 1e6
        lam = 1.0 / float(macs_cost.mean())  # the regulariser as large as the average normalised score
        # Measured once on the unpruned model (prune_iteratively measures again every iteration):
        # a unit's cost is its group's, looked up by name as the groups shrink.
        per_unit = {g.name: float(measured[g.offset]) for g in probe.groups}
        latency_cost = lambda p: torch.tensor([per_unit[g.name] for g in p.groups for _ in range(g.size)], dtype=torch.float64)  # noqa: E731
        for name, unit_cost in (("MACs-driven", None), ("latency-aware", latency_cost)):
            model = copy.deepcopy(dense)
            pruner = fp.Pruner(model, example, criterion="l1", ignore=convs_only(model), flops_lambda=lam, unit_cost=unit_cost,
                               verify=False)
            factor, now, steps = 1.0, base, 0
            while base[0] / now[0] < 2.0 and steps < 40:
                factor *= 1.15
                pruner.prune(macs=factor)
                steps += 1
                now = latency_spread_ms(model, x, min_run_time=args.run_time / 3)
            prof = fp.profile(model, example, latency=False)
            rows.append([arch, name, steps, f"{macs0 / prof.macs:.2f}x", f"{prof.params / 1e6:.2f}",
                         f"{ms(base)} -> {ms(now)}", fp.speed_change(base[0], now[0], base[1], now[1]),
                         f"{cost_s:.0f} s" if unit_cost else "-"])
    table(f"Latency-aware vs MACs-driven: l1 criterion, prune until batch-{args.batch} latency at {args.size}x{args.size} "
          "is 2x lower (MACs steps of 1.15x), float32",
          ["model", "ranking", "steps", "MACs fewer", "params (M) left", "ms per batch", "measured", "cost measuring"], rows)


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--train-batches", type=int, default=30)
    parser.add_argument("--run-time", type=float, default=0.3, help="seconds per blocked_autorange")
    parser.add_argument("--repeats", type=int, default=2, help="rank(): timings in turns")
    parser.add_argument("--rank-batches", type=int, default=8, help="rank(): batches in the loader")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.steps, args.train_batches, args.run_time, args.rank_batches = 64, 4, 3, 2, 0.02, 2
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {gpu}, cpu cores {os.cpu_count()}, "
          f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    for section in args.sections:
        start = time.perf_counter()
        try:
            {"round": bench_round, "deploy": bench_deploy, "profile": bench_profile, "self-check": bench_self_check, "rank": bench_rank, "train": bench_train,
             "latency-aware": bench_latency_aware}[section](args)
        except Exception:  # one broken section must not lose the others' tables
            traceback.print_exc()
        print(f"[{section}: {time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
