"""The `filterprune` command: the demo, and the same pipeline on your own model and image folders.

    filterprune demo                                  # the blog's experiment on Fashion-MNIST
    filterprune train   --arch vgg16 --pretrained --data DIR --out model.safetensors
    filterprune prune   --arch vgg16 --pretrained --data DIR --out runs/vgg16   # the blog's recipe
    filterprune eval    --model runs/vgg16/pruned.safetensors --data DIR
    filterprune profile --model runs/vgg16/pruned.safetensors
    filterprune export  --model runs/vgg16/pruned.safetensors --out model.onnx   # --format openvino|executorch|pt2, --int8
    filterprune predict --model runs/vgg16/pruned.safetensors cat.jpg dog.jpg

`--model` takes any file written by filterprune.save whose builder is recorded (filterprune,
torchvision or timm models). `--module NAME` prunes (or profiles) one submodule only; a model that
torch.fx cannot trace whole (a detector) is pruned in Python instead: fp.Pruner(model.backbone, x).

Every option can also come from a JSON or TOML file (--config FILE); flags given on the command
line win. Errors about input are one line that says what to do, and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from . import data, io, models
from .cli_args import RECIPE, UsageError, dest, parse
from .graph import GraphError
from .checkpoint import CheckpointError
from .checkpoint import load as load_checkpoint
from .export import ExportError
from .runtimes import RuntimeUnavailable
from .schedule import Schedule, check_reachable, prune_iteratively
from .train import evaluate, fine_tune
from .utils import evaluating

# The project's own errors about input: one line, exit 2. Anything else is a bug: a traceback.
USER_ERRORS = (data.DataError, models.ModelError, CheckpointError, GraphError, UsageError, RuntimeUnavailable, ExportError)


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _model_from_args(args, num_classes: int | None) -> nn.Module:
    if getattr(args, "model", None):
        return io.load(args.model)
    if not getattr(args, "arch", None):
        raise UsageError("say which model: --model FILE (a saved filterprune model) or --arch NAME")
    extra = {}
    if getattr(args, "width", None) is not None:
        if args.arch != "vgg16_layout":
            raise UsageError(f"--width only applies to --arch vgg16_layout, not {args.arch}")
        extra["width"] = args.width
    return models.build(args.arch, num_classes=num_classes, pretrained=args.pretrained, weights=args.weights, head=args.head,
                        **extra)


def _example(model: nn.Module, size: int, device: str = "cpu") -> torch.Tensor:
    """One image-shaped input, after checking that the model runs on images of this size."""
    example = torch.zeros(1, 3, size, size, device=device)
    try:
        with torch.no_grad(), evaluating(model):
            model(example)
    except RuntimeError as err:  # e.g. VGG's five poolings leave nothing of a 16x16 image
        raise UsageError(f"{type(model).__name__} cannot run on {size}x{size} images ({str(err).splitlines()[0]}): "
                         f"use a larger --size (VGG needs 32 or more)") from err
    return example


def _ignored(model: nn.Module, args, head: bool = True) -> list[str]:
    """--ignore, plus (like the blog, unless --prune-linear or head=False) a VGG classifier's Linear
    layers, plus everything outside --module: names of modules whose outputs are never pruned."""
    ignore = list(args.ignore) + (_vgg_head(model, args) if head else [])
    if args.module:
        inside = args.module + "."
        ignore += [n for n, m in model.named_modules()
                   if n and not n.startswith(inside) and n != args.module and not list(m.children())
                   and any(True for _ in m.parameters(recurse=False))]
    return sorted(set(ignore))


def _vgg_head(model: nn.Module, args) -> list[str]:
    """A VGG classifier's Linear layers, which the blog keeps (unless --prune-linear)."""
    if not isinstance(model, torchvision.models.VGG) or args.prune_linear:
        return []
    return [f"classifier.{n}" for n, m in model.classifier.named_children() if isinstance(m, nn.Linear)]


def _submodule(model: nn.Module, name: str | None) -> nn.Module:
    if not name:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        children = [n for n, _ in model.named_children()]
        raise UsageError(f"--module: {type(model).__name__} has no submodule {name!r}; its children are {children}") from err


def _from_args(cls, args, empty: tuple[str, ...] = ()):
    """A Schedule or auto.Plan of the parsed flags (cli_args.dataclass_options); a field in `empty` left
    unset (None) takes its default."""
    values = {f.name: getattr(args, dest(f)) for f in dataclasses.fields(cls) if "help" in f.metadata}
    values = {k: v for k, v in values.items() if not (k in empty and v is None)}
    return cls(**values, **({"seed": args.seed} if "seed" in {f.name for f in dataclasses.fields(cls)} else {}))


def _schedule(args) -> Schedule:
    """The prune command's options as a Schedule."""
    return _from_args(Schedule, args, RECIPE)


def _planned(args) -> bool:
    """Whether the loop plans the run: a target given and no fixed recipe's flag."""
    targets = (args.target_macs, args.target_speedup, args.target_size)
    recipe = [f for f in dataclasses.fields(Schedule) if f.name in RECIPE and getattr(args, dest(f)) is not None]
    if args.budget is not None and (recipe or not any(t is not None for t in targets)):
        raise UsageError("--budget is for a planned run: give a target (--target-speedup, --target-macs or --target-size) and none of "
                         "--step, --macs-step, --epochs-between, --iterations, --final-epochs")
    return any(t is not None for t in targets) and not recipe


def _folders(args):
    train, test, classes = data.image_folder_datasets(args.data, size=args.size, test_fraction=args.test_fraction, seed=args.seed)
    loader = data.make_loader(train, args.batch_size, shuffle=True, seed=args.seed, num_workers=args.workers)
    test_loader = data.make_loader(test, args.batch_size, shuffle=False, num_workers=args.workers)
    return loader, test_loader, classes


def _train_new(model: nn.Module, args, loader, device: str) -> None:
    """Transfer learning as in the blog: head only on a frozen backbone, then (optionally) all layers."""
    head = [p for n, p in model.named_parameters() if n.startswith(("classifier", "fc", "heads", "head"))]
    if args.head_epochs and head:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        fine_tune(model, loader, args.head_epochs, args.lr, args.optimizer, device=device, progress=not args.quiet, desc="head",
                  amp=args.amp, channels_last=args.channels_last)
        for p in model.parameters():
            p.requires_grad_(True)
    if args.epochs:
        fine_tune(model, loader, args.epochs, args.lr, args.optimizer, device=device, progress=not args.quiet, desc="all layers",
                  amp=args.amp, channels_last=args.channels_last)


def cmd_demo(args) -> int:
    from .recipes.demo import DemoConfig, run_demo
    from .report import headline_table

    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.seed, config.auto = args.seed, args.auto
    report = run_demo(args.out, config, cache=args.cache, progress=not args.quiet)
    print(headline_table(report))
    print(f"\nwall time {report['wall_s']:.0f} s; report: {report['paths']['markdown']}")
    return 0


def cmd_train(args) -> int:
    device = _device(args.device)
    loader, test_loader, classes = _folders(args)
    torch.manual_seed(args.seed)  # the same seed gives the same model
    model = _model_from_args(args, len(classes)).to(device)
    _example(model, args.size, device)
    _train_new(model, args, loader, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    accuracy = evaluate(model, test_loader, device=device, progress=not args.quiet)["accuracy"]
    io.save(model.cpu(), args.out, metadata={"classes": classes, "image_size": args.size, "accuracy": accuracy})
    print(f"accuracy {100 * accuracy:.2f}% on {len(test_loader.dataset)} held-out images; saved {args.out}")
    return 0


def cmd_prune(args) -> int:
    from .auto import Plan, prune_auto
    from .distributed import setup
    from .report import headline_table, write_report

    ctx = setup(_device(args.device))  # under torchrun: this process's rank, device and process group
    many = ctx.world_size > 1
    try:
        if not ctx.is_main:  # only rank 0 prints (errors aside) and writes files
            args.quiet = True
            warnings.filterwarnings("ignore")
        device = ctx.device
        out = Path(args.out)
        schedule, planned = _schedule(args), _planned(args)
        if planned and (args.resume or many):
            raise UsageError("a planned run (a target and no --step/--epochs-between...) is one process and starts over: "
                             "drop --resume and torchrun, or give a fixed recipe")
        train, val, test, classes = data.image_folder_splits(args.data, size=args.size, test_fraction=args.test_fraction, seed=args.seed,
                                                             val_fraction=args.val_fraction, val_dir=args.val)
        loader = data.make_loader(train, args.batch_size, shuffle=True, seed=args.seed, num_workers=args.workers)
        val_loader, test_loader = (data.make_loader(d, args.batch_size, shuffle=False, num_workers=args.workers) for d in (val, test))
        start = time.perf_counter()
        if args.resume:  # prune_iteratively resumes from the checkpoint; its model names the layers to ignore
            model, ignore = None, _ignored(load_checkpoint(out / "checkpoint")[0], args)
            base_test = json.loads((out / "checkpoint" / "baseline_test.json").read_text())
        else:
            torch.manual_seed(args.seed)  # the same seed gives the same run
            model = _model_from_args(args, len(classes)).to(device)
            ignore = _ignored(model, args)
            # Before the (long) training: can the model be traced, and can the targets be reached?
            try:
                check_reachable(model, _example(model, args.size, device), schedule, ignore)
            except ValueError as err:  # unknown --ignore names, unreachable targets
                raise UsageError(str(err)) from err
            if args.arch:  # a fresh torchvision model: train it on this data first, as the blog does
                _train_new(model, args, loader, device)  # under torchrun: in every process alike, not sharded
            ctx.sync(model)  # every process starts from rank 0's weights
            # The test images are looked at only here and after pruning, never to choose or stop.
            base_test = ctx.on_main(lambda: _test_summary(model, test_loader, device, args))
            if ctx.is_main:
                (out / "checkpoint").mkdir(parents=True, exist_ok=True)
                (out / "checkpoint" / "baseline_test.json").write_text(json.dumps(base_test))
        rank_train = data.ImageFiles(train.samples, classes, data.eval_transform(args.size))
        if many:  # shard training (padded, shuffled per epoch) and ranking (each image once) over the processes
            loader = ctx.sharded_loader(train, args.batch_size, shuffle=True, seed=args.seed, num_workers=args.workers)
            rank_loader = ctx.sharded_loader(rank_train, args.batch_size, shuffle=False, num_workers=args.workers)
        else:
            rank_loader = data.make_loader(rank_train, args.batch_size, shuffle=False, num_workers=args.workers)
        example = test[0][0].unsqueeze(0).to(device)
        quiet = dict(device=device, progress=not args.quiet, log_fn=print if ctx.is_main else (lambda line: None))
        if planned:
            # The VGG head kept like the blog's, unless a recovery trial finds pruning it better; --ignore is never overridden.
            pruned, log, control = prune_auto(model, example, loader, val_loader, schedule, _from_args(Plan, args),
                                              rank_loader=rank_loader, ignore=_ignored(model, args, head=False),
                                              head_kept=_vgg_head(model, args), **quiet)
        else:
            control = None
            pruned, log = prune_iteratively(model, example, loader, val_loader, schedule, rank_loader=rank_loader, ignore=ignore,
                                            checkpoint_dir=out / "checkpoint", resume=args.resume, context=ctx, **quiet)
        if not ctx.is_main:
            return 0
        report = _prune_report(args, log, base_test, _test_summary(pruned, test_loader, device, args),
                               control and _test_summary(control, test_loader, device, args), (train, val, test))
        report["wall_s"] = round(time.perf_counter() - start, 1)
        # Two files change together: the model goes under a temporary name, renamed only after
        # the report is written, so a failure (a full disk) leaves the previous run's pair as it was.
        staged = io.save(pruned.cpu(), out / ".pruned.safetensors.new", metadata={"classes": classes, "image_size": args.size,
                                                                                   "accuracy": report["pruned"]["accuracy"]})
        try:
            paths = write_report(report, out)
            os.replace(staged, out / "pruned.safetensors")
        finally:
            staged.unlink(missing_ok=True)
        print(headline_table(report))
        print(f"\npruned model: {out / 'pruned.safetensors'}; report: {paths['markdown']}")
        return 0
    finally:
        ctx.teardown()


def _test_summary(model: nn.Module, loader, device: str, args) -> dict:
    result = evaluate(model, loader, device=device, progress=not args.quiet)
    return {"accuracy": result["accuracy"], "loss": result["loss"]}


def _prune_report(args, log: dict, base_test: dict, pruned_test: dict, control_test: dict | None, splits) -> dict:
    """report.json of a prune run: the headline on the test images, the loop's own numbers (on the
    validation images) under "loop" and in the iterations."""
    train, val, test = splits

    def summary(loop_summary: dict, on_test: dict) -> dict:
        return {**loop_summary, "val_accuracy": loop_summary["accuracy"], **on_test}

    s = log["schedule"]
    batch = s["latency_batch"]
    targets = {"macs": s["target_macs"], "size": s["target_size"], f"latency_b{batch}": s["target_speedup"],
               "max_accuracy_drop_points": s["max_accuracy_drop"]}
    report = {"config": {k: v for k, v in vars(args).items()}, "baseline": summary(log["baseline"], base_test),
              "pruned": summary(log["final"], pruned_test), "channels_before": log["channels_before"], "iterations": log["iterations"],
              "stopped": log["stopped"], "skipped": log["skipped"], "targets": {k: v for k, v in targets.items() if v is not None},
              "task": {"train_images": len(train), "val_images": len(val), "test_images": len(test)},
              "labels": {"val_accuracy": f"accuracy, {len(val)} validation images"},
              "loop": {"baseline": log["baseline"], "final": log["final"], "evaluated_on": f"{len(val)} validation images"}}
    if control_test is not None:
        report["control"] = summary(log["control"], control_test)
        report["loop"]["control_accuracy"] = log["control"]["accuracy"]
    if "plan" in log:
        from .auto import reported_plan

        report["plan"] = reported_plan(log)
    return report


def cmd_eval(args) -> int:
    device = _device(args.device)
    model = io.load(args.model).to(device)
    args.size = args.size or model.filterprune_metadata.get("image_size", 224)
    _, test_loader, classes = _folders(args)
    saved = model.filterprune_metadata.get("classes")
    if saved and saved != classes:
        raise UsageError(f"the model was trained on classes {saved} but {args.data} has {classes}")
    result = evaluate(model, test_loader, device=device, progress=not args.quiet)
    print(f"accuracy {100 * result['accuracy']:.2f}% ({result['examples']} images), loss {result['loss']:.4f}")
    return 0


def cmd_profile(args) -> int:
    from .measure import profile

    model = _model_from_args(args, None)
    size = args.size or getattr(model, "filterprune_metadata", {}).get("image_size", 224)
    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError as err:
        raise UsageError(f"--batch-sizes must be whole numbers separated by commas, not {args.batch_sizes!r}") from err
    example = _example(model, size)
    if args.module:  # e.g. a detector's backbone, which sees the (normalised) image batch
        model = _submodule(model, args.module)
        print(f"module {args.module}:")
    device = _device(args.device)
    if args.runtime == "cuda-graph" and not device.startswith("cuda"):
        raise UsageError(f"--runtime cuda-graph times a CUDA graph, which needs a GPU: add --device cuda (this run's device is {device})")
    print(profile(model, example, batch_sizes=batches, device=device, threads=args.threads, runtime=args.runtime))
    return 0


def cmd_export(args) -> int:
    from .export import export_model, onnx_accuracy, quantize_int8

    if args.int8 and (args.format != "onnx" or not args.data):
        raise UsageError("--int8 quantises with ONNX Runtime: give --format onnx and --data DIR (calibration and test images)")
    model = io.load(args.model)
    size = args.size or model.filterprune_metadata.get("image_size", 224)
    path, error = export_model(model, _example(model, size), args.out, args.format)
    print(f"wrote {path} ({args.format}); largest difference from PyTorch on the example input: {error:.2g}")
    if args.int8:
        train, test, _ = data.image_folder_datasets(args.data, size=size, test_fraction=args.test_fraction, seed=args.seed,
                                                    augment=False)
        calibration = torch.utils.data.Subset(train, range(min(args.calibration_images, len(train))))
        int8 = quantize_int8(path, Path(path).with_suffix(".int8.onnx"),
                             (images for images, _ in data.make_loader(calibration, args.batch_size, shuffle=False)))
        test_loader = data.make_loader(test, args.batch_size, shuffle=False)
        accuracy = {name: onnx_accuracy(p, test_loader) for name, p in (("float", path), ("int8", int8))}
        print(f"wrote {int8} (int8, calibrated on {len(calibration)} training images); accuracy on the {len(test)} test "
              f"images in ONNX Runtime: float {100 * accuracy['float']:.2f}%, int8 {100 * accuracy['int8']:.2f}% "
              f"({100 * (accuracy['int8'] - accuracy['float']):+.2f} points)")
    return 0


def cmd_predict(args) -> int:
    model = io.load(args.model)
    meta = model.filterprune_metadata
    size = args.size or meta.get("image_size", 224)
    classes = meta.get("classes")
    transform = data.eval_transform(size)
    unread = 0
    with torch.no_grad():
        for path in args.images:
            try:
                image = transform(data.load_image(path)).unsqueeze(0)
            except data.DataError as err:
                print(f"{path}: cannot read this image ({err})", file=sys.stderr)
                unread += 1
                continue
            probs = model(image).softmax(1)[0]
            best = int(probs.argmax())
            print(f"{path}: {classes[best] if classes else best} ({100 * float(probs[best]):.1f}%)")
    if unread:
        print(f"filterprune: error: {unread} of {len(args.images)} images could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_criteria(args) -> int:
    from .study import run_study, study_table, write_study
    from .recipes.demo import DemoConfig, default_cache, heldout_images, transferred_path

    path = Path(args.model) if args.model else transferred_path(DemoConfig(), default_cache())
    if not path.is_file():
        hint = "pass --model FILE" if args.model else "run `filterprune demo` first, or pass --model FILE"
        raise FileNotFoundError(f"model file {path} not found: {hint}")
    device = _device(args.device)
    model = io.load(path).to(device)
    if args.data:
        size = args.size or model.filterprune_metadata.get("image_size", 224)
        _, heldout, _ = data.image_folder_datasets(args.data, size=size, test_fraction=args.test_fraction, seed=args.seed,
                                                   augment=False)
    elif (heldout := heldout_images(model)) is None:
        raise UsageError(f"{path} is not the demo's network: pass --data DIR (an image folder; its held-out split is used)")
    loader = data.make_loader(heldout, args.batch_size, shuffle=False)
    result = run_study(model, loader, device=device, seed=args.seed, progress=not args.quiet)
    paths = write_study(result, args.out)
    print(study_table(result))
    print(f"\n{result['units']} units, {result['images']} held-out images, {result['wall_s']:.0f} s; report: {paths['markdown']}")
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "prune": cmd_prune, "eval": cmd_eval, "profile": cmd_profile, "export": cmd_export,
            "predict": cmd_predict, "criteria": cmd_criteria}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _warning_printer():
    """Warnings as `filterprune: warning: ...` lines on stderr, each text once per command."""
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            print(f"filterprune: warning: {text}", file=sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer()
            args = parse(sys.argv[1:] if argv is None else list(argv))
            return COMMANDS[args.command](args)
    except OSError as err:  # a missing file; writing output: a full disk, no permission
        where = f" ({err.filename})" if err.filename and str(err.filename) not in str(err) else ""
        print(f"filterprune: error: {_one_line(err)}{where}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"filterprune: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("filterprune: interrupted; a prune run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
