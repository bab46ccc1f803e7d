"""The `filterprune` command: the demo, and the same pipeline on your own model and image folders.

    filterprune demo                                  # the blog's experiment on Fashion-MNIST
    filterprune train   --arch vgg16 --pretrained --data DIR --out model.safetensors
    filterprune prune   --arch vgg16 --pretrained --data DIR --out runs/vgg16   # the blog's recipe
    filterprune eval    --model runs/vgg16/pruned.safetensors --data DIR
    filterprune profile --model runs/vgg16/pruned.safetensors
    filterprune export  --model runs/vgg16/pruned.safetensors --out model.onnx
    filterprune predict --model runs/vgg16/pruned.safetensors cat.jpg dog.jpg

Every option can also come from a JSON or TOML file (--config FILE); flags given on the command
line win. Errors about input are one line that says what to do, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
import warnings
from pathlib import Path

import torch
from torch import nn

from . import data, io, models
from .criteria import CRITERIA
from .graph import GraphError
from .checkpoint import CheckpointError
from .schedule import Schedule, check_reachable, prune_iteratively
from .train import evaluate, fine_tune

USER_ERRORS = (data.DataError, models.ModelError, CheckpointError, GraphError, ValueError, FileNotFoundError)


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _model_from_args(args, num_classes: int | None) -> nn.Module:
    if getattr(args, "model", None):
        return io.load(args.model)
    if not getattr(args, "arch", None):
        raise ValueError("say which model: --model FILE (a saved filterprune model) or --arch NAME")
    extra = {}
    if getattr(args, "width", None) is not None:
        if args.arch != "vgg16_layout":
            raise ValueError(f"--width only applies to --arch vgg16_layout, not {args.arch}")
        extra["width"] = args.width
    return models.build(args.arch, num_classes=num_classes, pretrained=args.pretrained, weights=args.weights, head=args.head,
                        **extra)


def _folders(args):
    train, test, classes = data.image_folder_datasets(args.data, size=args.size, test_fraction=args.test_fraction, seed=args.seed)
    loader = data.make_loader(train, args.batch_size, shuffle=True, seed=args.seed, num_workers=args.workers)
    test_loader = data.make_loader(test, args.batch_size, shuffle=False, num_workers=args.workers)
    return train, loader, test_loader, classes


def _train_new(model: nn.Module, args, loader, device: str) -> None:
    """Transfer learning as in the blog: head only on a frozen backbone, then (optionally) all layers."""
    head = [p for n, p in model.named_parameters() if n.startswith(("classifier", "fc", "heads", "head"))]
    if args.head_epochs and head:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        fine_tune(model, loader, args.head_epochs, args.lr, args.optimizer, device=device, progress=not args.quiet, desc="head")
        for p in model.parameters():
            p.requires_grad_(True)
    if args.epochs:
        fine_tune(model, loader, args.epochs, args.lr, args.optimizer, device=device, progress=not args.quiet, desc="all layers")


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    from .report import headline_table

    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.seed = args.seed
    report = run_demo(args.out, config, cache=args.cache, progress=not args.quiet)
    print(headline_table(report))
    print(f"\nwall time {report['wall_s']:.0f} s; report: {report['paths']['markdown']}")
    return 0


def cmd_train(args) -> int:
    device = _device(args.device)
    train, loader, test_loader, classes = _folders(args)
    torch.manual_seed(args.seed)  # the same seed gives the same model
    model = _model_from_args(args, len(classes)).to(device)
    _train_new(model, args, loader, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    accuracy = evaluate(model, test_loader, device=device, progress=not args.quiet)["accuracy"]
    io.save(model.cpu(), args.out, metadata={"classes": classes, "image_size": args.size, "accuracy": accuracy})
    print(f"accuracy {100 * accuracy:.2f}% on {len(test_loader.dataset)} held-out images; saved {args.out}")
    return 0


def cmd_prune(args) -> int:
    import warnings

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
        train, loader, test_loader, classes = _folders(args)
        start = time.perf_counter()
        if args.resume:
            model = None
        else:
            torch.manual_seed(args.seed)  # the same seed gives the same run
            model = _model_from_args(args, len(classes)).to(device)
            if args.arch:  # a fresh torchvision model: train it on this data first, as the blog does
                # before the (long) training: can the model be traced, and can the targets be reached?
                check_reachable(model, test_loader.dataset[0][0].unsqueeze(0).to(device), ignore=args.ignore,
                                schedule=Schedule(target_macs=args.target_macs, target_size=args.target_size,
                                                  min_channels=args.min_channels, round_to=args.round_to))
                _train_new(model, args, loader, device)  # under torchrun: in every process alike, not sharded
            ctx.sync(model)  # every process starts from rank 0's weights
        rank_train, _, _ = data.image_folder_datasets(args.data, size=args.size, test_fraction=args.test_fraction, seed=args.seed, augment=False)
        if many:  # shard training (padded, shuffled per epoch) and ranking (each image once) over the processes
            loader = ctx.sharded_loader(train, args.batch_size, shuffle=True, seed=args.seed, num_workers=args.workers)
            rank_loader = ctx.sharded_loader(rank_train, args.batch_size, shuffle=False, num_workers=args.workers)
        else:
            rank_loader = data.make_loader(rank_train, args.batch_size, shuffle=False, num_workers=args.workers)
        example = test_loader.dataset[0][0].unsqueeze(0).to(device)
        schedule = Schedule(criterion=args.criterion, step=args.step, epochs=args.epochs_between, final_epochs=args.final_epochs,
                            max_iterations=args.iterations, target_macs=args.target_macs, target_speedup=args.target_speedup,
                            target_size=args.target_size, max_accuracy_drop=args.max_drop, lr=args.lr, optimizer=args.optimizer,
                            flops_lambda=args.flops_lambda, latency_aware=args.latency_aware, round_to=args.round_to,
                            min_channels=args.min_channels, rank_batches=args.rank_batches, seed=args.seed)
        pruned, log = prune_iteratively(model, example, loader, test_loader, schedule, rank_loader=rank_loader, ignore=args.ignore,
                                        checkpoint_dir=out / "checkpoint", resume=args.resume, device=device, progress=not args.quiet,
                                        log_fn=print if ctx.is_main else (lambda line: None), context=ctx)
        if not ctx.is_main:
            return 0
        # Written under a temporary name and renamed only after the report: a failure (a full disk)
        # leaves the previous run's pruned.safetensors and report as they were.
        staged = io.save(pruned.cpu(), out / ".pruned.safetensors.new", metadata={"classes": classes, "image_size": args.size,
                                                                                   "accuracy": log["final"]["accuracy"]})
        report = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "baseline": log["baseline"], "pruned": log["final"],
                  "channels_before": log["channels_before"], "iterations": log["iterations"], "stopped": log["stopped"],
                  "wall_s": round(time.perf_counter() - start, 1)}
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


def cmd_eval(args) -> int:
    device = _device(args.device)
    model = io.load(args.model).to(device)
    args.size = args.size or model.filterprune_metadata.get("image_size", 224)
    _, _, test_loader, classes = _folders(args)
    saved = model.filterprune_metadata.get("classes")
    if saved and saved != classes:
        raise ValueError(f"the model was trained on classes {saved} but {args.data} has {classes}")
    result = evaluate(model, test_loader, device=device, progress=not args.quiet)
    print(f"accuracy {100 * result['accuracy']:.2f}% ({result['examples']} images), loss {result['loss']:.4f}")
    return 0


def cmd_profile(args) -> int:
    from .measure import profile

    model = _model_from_args(args, None)
    size = args.size or getattr(model, "filterprune_metadata", {}).get("image_size", 224)
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    print(profile(model, torch.randn(1, 3, size, size), batch_sizes=batches, device=_device(args.device)))
    return 0


def cmd_export(args) -> int:
    model = io.load(args.model)
    size = args.size or model.filterprune_metadata.get("image_size", 224)
    path = io.export_onnx(model, torch.randn(1, 3, size, size), args.out)
    print(f"wrote {path}")
    return 0


def cmd_predict(args) -> int:
    model = io.load(args.model)
    meta = model.filterprune_metadata
    size = args.size or meta.get("image_size", 224)
    classes = meta.get("classes")
    transform = data.eval_transform(size)
    with torch.no_grad():
        for path in args.images:
            try:
                image = transform(data.load_image(path)).unsqueeze(0)
            except (OSError, ValueError) as err:
                print(f"{path}: cannot read this image ({err})", file=sys.stderr)
                continue
            probs = model(image).softmax(1)[0]
            best = int(probs.argmax())
            print(f"{path}: {classes[best] if classes else best} ({100 * float(probs[best]):.1f}%)")
    return 0


def cmd_criteria(args) -> int:
    from .demo import DemoConfig, default_cache, pair_data, transferred_path
    from .oracle import run_study, study_table, write_study

    config = DemoConfig()
    path = Path(args.model) if args.model else transferred_path(config, default_cache())
    if not path.is_file():
        hint = "pass --model FILE" if args.model else "run `filterprune demo` first, or pass --model FILE"
        raise FileNotFoundError(f"model file {path} not found: {hint}")
    device = _device(args.device)
    model = io.load(path).to(device)
    arch = model.filterprune_arch
    if args.data:
        size = args.size or model.filterprune_metadata.get("image_size", 224)
        _, heldout, _ = data.image_folder_datasets(args.data, size=size, test_fraction=args.test_fraction, seed=args.seed,
                                                   augment=False)
    elif (arch["builder"].endswith(":vgg16_layout") and arch["kwargs"].get("num_classes") == 2
          and "classes" not in model.filterprune_metadata):  # the demo's network: `train` would have saved classes
        heldout = pair_data(config)["heldout"]
    else:
        raise ValueError(f"{path} is not the demo's network: pass --data DIR (an image folder; its held-out split is used)")
    loader = data.make_loader(heldout, args.batch_size, shuffle=False)
    result = run_study(model, loader, device=device, seed=args.seed, progress=not args.quiet)
    paths = write_study(result, args.out)
    print(study_table(result))
    print(f"\n{result['units']} units, {result['images']} held-out images, {result['wall_s']:.0f} s; report: {paths['markdown']}")
    return 0


def _common(p: argparse.ArgumentParser, data_needed: bool = True) -> None:
    p.add_argument("--config", help="JSON or TOML file of option values (command-line flags win)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if data_needed:
        p.add_argument("--data", required=True, help="image folder: DIR/train/<class>/*.jpg (ImageFolder) or DIR/train/cat.0.jpg (Kaggle)")
        p.add_argument("--size", type=int, default=224, help="image size (default 224, the blog's crops)")
        p.add_argument("--test-fraction", type=float, default=0.2, help="held out per class when DIR has no test folder")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--workers", type=int, default=2, help="data loading processes")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a saved filterprune model (.safetensors)")
    p.add_argument("--arch", help="torchvision model name (e.g. vgg16, resnet50) or vgg16_layout")
    p.add_argument("--pretrained", action="store_true", help="torchvision's ImageNet weights (needs internet)")
    p.add_argument("--weights", help="weights file for --arch (.safetensors or a state-dict .pth)")
    p.add_argument("--head", default="auto", choices=["auto", "three-linear", "replace"], help="new classifier (blog: three-linear)")
    p.add_argument("--width", type=float, help="width multiplier of --arch vgg16_layout (default 0.5; e.g. 0.03 for a tiny model)")


def _training_options(p: argparse.ArgumentParser, head_epochs: int, epochs: int) -> None:
    p.add_argument("--head-epochs", type=int, default=head_epochs, help="epochs training only the new head (blog: 20)")
    p.add_argument("--epochs", type=int, default=epochs, help="epochs training all layers before pruning")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filterprune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the blog's experiment on Fashion-MNIST (the main job)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="small subsets, about a minute (CI's smoke test)")
    p.add_argument("--cache", help="where the pretrained network is cached (default ~/.cache/filterprune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model on an image folder")
    _common(p)
    _model_options(p)
    _training_options(p, head_epochs=20, epochs=0)
    p.add_argument("--out", default="model.safetensors")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prune", help="iteratively prune and fine-tune (the blog's recipe by default)")
    _common(p)
    _model_options(p)
    _training_options(p, head_epochs=20, epochs=0)
    p.add_argument("--out", default="runs/prune")
    p.add_argument("--criterion", default="taylor", choices=CRITERIA)
    p.add_argument("--step", type=float, default=512, help="channels per iteration: a count, or a fraction (<1) of the original channels")
    p.add_argument("--epochs-between", type=int, default=10)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--final-epochs", type=int, default=0)
    p.add_argument("--target-macs", type=float, help="stop once MACs are this many times fewer")
    p.add_argument("--target-speedup", type=float, help="stop once measured batch-1 latency is this many times lower")
    p.add_argument("--target-size", type=float, help="stop once the model is this many times smaller on disk")
    p.add_argument("--max-drop", type=float, help="stop before losing more than this many accuracy points")
    p.add_argument("--flops-lambda", type=float, default=0.0, help="FLOPs regularisation (paper: 1e-3)")
    p.add_argument("--latency-aware", action="store_true", help="regularise by measured latency per channel instead of MACs")
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts at multiples of this (e.g. 8)")
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--rank-batches", type=int, help="rank on at most this many batches")
    p.add_argument("--ignore", nargs="*", default=[], help="module names whose outputs are never pruned")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="accuracy of a saved model on an image folder's test split")
    _common(p)
    p.set_defaults(size=None)
    p.add_argument("--model", required=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="parameters, size, MACs and measured latency")
    _common(p, data_needed=False)
    _model_options(p)
    p.add_argument("--size", type=int)
    p.add_argument("--batch-sizes", default="1,64")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="export a saved model to ONNX")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify images with a saved model")
    p.add_argument("--model", required=True)
    p.add_argument("--size", type=int)
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("criteria", help="every criterion against the oracle of 1611.06440 (its Table 1), on held-out images")
    _common(p, data_needed=False)
    p.add_argument("--model", help="a saved filterprune model (default: the demo's transferred network)")
    p.add_argument("--data", help="image folder whose held-out split is used (default for the demo's network: its 400 held-out images)")
    p.add_argument("--size", type=int, help="image size for --data (default: the model's, else 224)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held out per class when DIR has no test folder")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--out", default="runs/criteria", help="where criteria.json, criteria.md and criteria.png go")
    p.set_defaults(func=cmd_criteria)
    return parser


def _with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    commands = parser._subparsers._group_actions[0].choices
    command = next((a for a in argv if a in commands), None)
    if not config or command is None:
        return parser.parse_args(argv)
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"config file {config} not found: pass a .json or .toml file of option values")
    try:
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"cannot read config file {config} ({err}): it must be {'TOML' if path.suffix == '.toml' else 'JSON'}") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {config} must hold a mapping of option names to values")
    subparser = commands[command]
    values = {k.replace("-", "_"): v for k, v in values.items()}
    actions = {a.dest: a for a in subparser._actions}
    unknown = set(values) - set(actions) - {"config"}
    if unknown:
        raise ValueError(f"unknown options in {config} for `filterprune {command}`: {sorted(unknown)}")
    for dest in values:  # a required option given in the file need not be repeated on the command line
        actions[dest].required = False
    subparser.set_defaults(**values)
    return parser.parse_args(argv)


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
    parser = build_parser()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer()
            args = _with_config(parser, argv)
            return args.func(args)
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
