"""The `filterprune` command's options, and option values read from a JSON or TOML file."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from .criteria import CRITERIA
from .export import FORMATS
from .pruner import NORMALIZE
from .runtimes import RUNTIMES


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


def _training_options(p: argparse.ArgumentParser, head_epochs: int, epochs: int) -> None:
    p.add_argument("--head-epochs", type=int, default=head_epochs, help="epochs training only the new head (blog: 20)")
    p.add_argument("--epochs", type=int, default=epochs, help="epochs training all layers before pruning")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--amp", action="store_true", help="bf16 autocast while training and fine-tuning")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format while training and fine-tuning")


def _prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/prune")
    p.add_argument("--criterion", default="taylor", choices=CRITERIA)
    p.add_argument("--step", type=float, default=512, help="channels per iteration: a count, or a fraction (<1) of the original channels")
    p.add_argument("--macs-step", type=float,
                   help="instead of --step: each iteration cuts MACs by this factor (e.g. 1.5), rounding included")
    p.add_argument("--epochs-between", type=int, default=10)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--final-epochs", type=int, default=0)
    p.add_argument("--target-macs", type=float, help="stop once MACs are this many times fewer")
    p.add_argument("--target-speedup", type=float, help="stop once measured latency (at --latency-batch) is this many times lower")
    p.add_argument("--target-size", type=float, help="stop once the model is this many times smaller on disk")
    p.add_argument("--max-drop", type=float, help="stop before losing more than this many accuracy points")
    p.add_argument("--flops-lambda", type=float, default=0.0, help="FLOPs regularisation (paper: 1e-3)")
    p.add_argument("--latency-aware", action="store_true", help="regularise by measured latency per channel instead of MACs")
    p.add_argument("--round-to", type=_round_to, default="auto",
                   help="keep channel counts at multiples of this (default auto: 8 on CUDA, 1 on the CPU)")
    p.add_argument("--normalize", default="mean", choices=NORMALIZE,
                   help="how scores of different layers are made comparable (default mean: each layer's scores divided by "
                        "their mean, size-neutral; l2: the paper's per-layer L2 norm; macs: mean, then per MAC a channel costs)")
    p.add_argument("--runtime", default="eager", choices=RUNTIMES,
                   help="where latency is measured (--target-speedup, --latency-aware, the report): the runtime you ship on")
    p.add_argument("--latency-batch", type=int,
                   help="batch size of the measured latency (targets, --latency-aware; default 64 on a GPU, 1 on the CPU)")
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--rank-batches", type=int, help="rank on at most this many batches")
    p.add_argument("--ignore", nargs="*", default=[], help="module names whose outputs are never pruned")
    p.add_argument("--prune-linear", action="store_true",
                   help="also prune the hidden units of a VGG classifier (by default, as in the blog, conv filters only)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of distillation from the unpruned model while fine-tuning (0: off; Hinton et al. 2015)")
    p.add_argument("--temperature", type=float, default=4.0, help="softmax temperature of --distill")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")


def build_parser() -> argparse.ArgumentParser:
    from .cli import __doc__ as doc, cmd_criteria, cmd_demo, cmd_eval, cmd_export, cmd_predict, cmd_profile, cmd_prune, cmd_train

    parser = argparse.ArgumentParser(prog="filterprune", description=doc.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        # No abbreviations: a config file's "siz" must be an unknown option, not --size.
        p = sub.add_parser(name, help=help, allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    p = command("demo", cmd_demo, "the blog's experiment on Fashion-MNIST (the main job)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="small subsets, about a minute (CI's smoke test)")
    p.add_argument("--cache", help="where the pretrained network is cached (default ~/.cache/filterprune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = command("train", cmd_train, "train a model on an image folder")
    _common(p)
    _model_options(p)
    _training_options(p, head_epochs=20, epochs=0)
    p.add_argument("--out", default="model.safetensors")

    p = command("prune", cmd_prune, "iteratively prune and fine-tune (the blog's recipe by default)")
    _common(p)
    _model_options(p)
    _training_options(p, head_epochs=20, epochs=0)
    _prune_options(p)

    p = command("eval", cmd_eval, "accuracy of a saved model on an image folder's test split")
    _common(p)
    p.set_defaults(size=None)
    p.add_argument("--model", required=True)

    p = command("profile", cmd_profile, "parameters, size, MACs and measured latency")
    _common(p, data_needed=False)
    _model_options(p)
    p.add_argument("--size", type=int)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--runtime", default="eager", choices=RUNTIMES,
                   help="where to time it (default eager PyTorch; cuda-graph needs --device cuda)")
    p.add_argument("--threads", type=int, help="threads of the runtime while timed (default: all)")

    p = command("export", cmd_export, "export a saved model for a runtime, checked against PyTorch")
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

    p = command("predict", cmd_predict, "classify images with a saved model")
    p.add_argument("--model", required=True)
    p.add_argument("--size", type=int)
    p.add_argument("images", nargs="+")

    p = command("criteria", cmd_criteria, "every criterion against the oracle of 1611.06440 (its Table 1), on held-out images")
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
