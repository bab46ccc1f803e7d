"""The `filterprune` command's options, and option values read from a JSON or TOML file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import typing
from pathlib import Path

from .export import FORMATS
from .runtimes import RUNTIMES

DESCRIPTION = "The `filterprune` command: the demo, and the same pipeline on your own model and image folders."


class UsageError(ValueError):
    """Bad command-line input (options, their values, a config file); the message says what to do."""


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 1, not {text!r}")
    return value


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
    p.add_argument("--module", help="prune (or profile) only this submodule, e.g. features, or a detector's backbone")


def _pretraining_options(p: argparse.ArgumentParser, head_epochs: int, epochs: int) -> None:
    p.add_argument("--head-epochs", type=int, default=head_epochs, help="epochs training only the new head (blog: 20)")
    p.add_argument("--epochs", type=int, default=epochs, help="epochs training all layers before pruning")


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--amp", action="store_true", help="bf16 autocast while training")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format while training")


def duration(text: str) -> float:
    """'20m', '1.5h', '90s' or '300' (seconds) as seconds."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:].lower(), None)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a duration like 20m, 1.5h, 90s or 300 (seconds), not {text!r}")
    return value


def batch_sizes(text: str) -> tuple[int, ...]:
    """'1,64' as (1, 64)."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of batch sizes: write e.g. 1,64") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes are whole numbers of at least 1, e.g. 1,64")
    return sizes


# A field's own parser where its type annotation does not say how to read it.
_PARSERS = {"round_to": _round_to, "budget_s": duration, "speed_batches": batch_sizes}
# The fixed recipe's fields: given none of them, a prune with a target plans its own steps (auto.Plan).
RECIPE = ("step", "macs_step", "epochs", "final_epochs", "max_iterations")


def _plain(hint) -> type:
    """The type a flag's text is read as: `float | None` -> float, `int | dict` -> int."""
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint) if typing.get_args(hint) else hint


def dest(field: dataclasses.Field) -> str:
    """The attribute of the parsed arguments that holds `field` (its flag's name: epochs -> epochs_between)."""
    return (field.metadata["flag"] or field.name).lstrip("-").replace("-", "_")


def dataclass_options(p: argparse.ArgumentParser, cls: type, empty: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` that has help (schedule._option): its name, type, default, choices and
    help come from the field. Fields in `empty` default to None (the field's default is filled in later),
    so that a run can tell whether they were given."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        shown = "" if f.default is None else f" (default {f.default})"
        if hints[f.name] is bool:  # --amp; or, on by default, --control and --no-control
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(flag, dest=dest(f), action=action, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, dest=dest(f), type=_PARSERS.get(f.name, _plain(hints[f.name])), choices=f.metadata["choices"],
                           default=None if f.name in empty else f.default, help=f.metadata["help"] + shown)


def _prune_options(p: argparse.ArgumentParser) -> None:
    from .auto import Plan
    from .schedule import Schedule

    p.add_argument("--out", default="runs/prune")
    dataclass_options(p, Schedule, empty=RECIPE)
    dataclass_options(p, Plan)
    p.add_argument("--val", help="folder of validation images (like --data's); default: --val-fraction of the training images")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of each class's training images kept aside for the loop's evaluations (default 0.1)")
    p.add_argument("--ignore", nargs="*", default=[], help="module names whose outputs are never pruned")
    p.add_argument("--prune-linear", action="store_true",
                   help="also prune the hidden units of a VGG classifier (by default, as in the blog, conv filters only)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (a fixed recipe's run)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; args.command names the command (cli.py's COMMANDS runs it)."""
    parser = argparse.ArgumentParser(prog="filterprune", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # No abbreviations: a config file's "siz" must be an unknown option, not --size.
        return sub.add_parser(name, help=help, allow_abbrev=False)

    p = command("demo", "the blog's experiment on Fashion-MNIST (the main job)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="small subsets, about a minute (CI's smoke test)")
    p.add_argument("--auto", action="store_true", help="the same targets, the steps and fine-tuning planned by the loop (auto.Plan)")
    p.add_argument("--cache", help="where the pretrained network is cached (default ~/.cache/filterprune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = command("train", "train a model on an image folder")
    _common(p)
    _model_options(p)
    _pretraining_options(p, head_epochs=20, epochs=0)
    _training_options(p)
    p.add_argument("--out", default="model.safetensors")

    p = command("prune", "iteratively prune and fine-tune: planned from the targets, or a fixed recipe (--step, --epochs-between...)")
    _common(p)
    _model_options(p)
    _pretraining_options(p, head_epochs=20, epochs=0)
    _prune_options(p)

    p = command("eval", "accuracy of a saved model on an image folder's test split")
    _common(p)
    p.set_defaults(size=None)
    p.add_argument("--model", required=True)

    p = command("profile", "parameters, size, MACs and measured latency")
    _common(p, data_needed=False)
    _model_options(p)
    p.add_argument("--size", type=int)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--runtime", default="eager", choices=RUNTIMES,
                   help="where to time it (default eager PyTorch; cuda-graph needs --device cuda)")
    p.add_argument("--threads", type=int, help="threads of the runtime while timed (default: all)")

    p = command("export", "export a saved model for a runtime, checked against PyTorch")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int)
    p.add_argument("--format", default="onnx", choices=FORMATS,
                   help="onnx (ONNX Runtime), openvino (IR .xml + .bin), executorch (.pte, XNNPACK), pt2 (torch.export)")
    p.add_argument("--int8", action="store_true",
                   help="also write OUT with .int8.onnx: int8 static quantisation calibrated on --data's training images "
                        "(--format onnx), its accuracy on the test images beside the float model's")
    p.add_argument("--data", help="image folder for --int8 (calibration: its training split; accuracy: its test split)")
    p.add_argument("--calibration-images", type=int, default=256, help="training images --int8 calibrates on")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held out per class when DIR has no test folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)

    p = command("predict", "classify images with a saved model")
    p.add_argument("--model", required=True)
    p.add_argument("--size", type=int)
    p.add_argument("images", nargs="+")

    p = command("criteria", "every criterion against the oracle of 1611.06440 (its Table 1), on held-out images")
    _common(p, data_needed=False)
    p.add_argument("--model", help="a saved filterprune model (default: the demo's transferred network)")
    p.add_argument("--data", help="image folder whose held-out split is used (default for the demo's network: its 400 held-out images)")
    p.add_argument("--size", type=int, help="image size for --data (default: the model's, else 224)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held out per class when DIR has no test folder")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--out", default="runs/criteria", help="where criteria.json, criteria.md and criteria.png go")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse `argv`; the values of --config FILE go in as if typed before the command line's flags."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    if not config or not argv:
        return parser.parse_args(argv)
    from_file = _config_flags(Path(config))
    args, unknown = parser.parse_known_args([argv[0], *from_file, *argv[1:]])
    if bad := [flag for flag in unknown if flag.startswith("--") and flag in from_file]:
        raise UsageError(f"unknown options in {config} for `filterprune {argv[0]}`: {sorted(f.lstrip('-') for f in bad)}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _config_flags(path: Path) -> list[str]:
    """A config file's {option: value} as command-line flags."""
    if not path.is_file():
        raise UsageError(f"config file {path} not found: pass a .json or .toml file of option values")
    try:
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise UsageError(f"cannot read config file {path} ({err}): it must be {'TOML' if path.suffix == '.toml' else 'JSON'}") from err
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values")
    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags
