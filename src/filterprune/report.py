"""The report of a pruning run: report.json (the numbers), report.md (the story) and PNG plots.

Every file goes through a temporary file and os.replace, so a crash or a full disk never leaves
a half-written report, and a failed write leaves the previous report as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global figures, no display needed

DPI = 110
COLORS = {"baseline": "tab:gray", "control": "tab:green", "pruned": "tab:blue"}
# (key in the summaries, row label, kind); the accuracy rows are labelled with their test-set sizes
ROWS = [("accuracy", "", "acc"), ("accuracy_800", "", "acc"),
        ("size_mb", "size on disk (MB)", "mb"), ("params", "parameters", "count"), ("macs", "MACs per image", "count"),
        ("latency_ms_b1", "latency, batch 1 (ms)", "ms"), ("latency_ms_b64", "latency, batch 64 (ms)", "ms")]
WORDS = {"mb": ("smaller", "larger"), "count": ("fewer", "more"), "ms": ("faster", "slower")}
TARGETS = {"latency_b1": ("latency_ms_b1", "faster at batch 1"), "latency_b64": ("latency_ms_b64", "faster at batch 64"),
           "size": ("size_mb", "smaller on disk"), "macs": ("macs", "fewer MACs per image"), "params": ("params", "fewer parameters")}


def _value(kind: str, v) -> str:
    if v is None:
        return "–"
    if kind == "acc":
        return f"{100 * v:.2f}%"
    if kind == "count":
        return f"{v / 1e9:.2f} G" if v >= 1e9 else f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} k" if v >= 1e3 else str(v)
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _change(kind: str, before, after) -> str:
    """How `after` compares with `before`: '-0.55 points', '3.1x smaller', '1.2x slower'."""
    if before is None or after is None:
        return "–"
    if kind == "acc":
        return f"{100 * (after - before):+.2f} points"
    if not before or not after:
        return "–"
    ratio, (better, worse) = before / after, WORDS[kind]
    return f"{ratio:.1f}x {better}" if ratio >= 1 else f"{1 / ratio:.1f}x {worse}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def _final_channels(report: dict) -> dict:
    kept = [it for it in report.get("iterations", []) if not it.get("rejected")]
    return kept[-1]["channels"] if kept else report.get("channels_before", {})


def headline_table(report: dict) -> str:
    """Baseline, control, pruned and the blog side by side, as a markdown table and one line on how latency was measured."""
    base, pruned, control, blog = report["baseline"], report["pruned"], report.get("control"), report.get("blog")
    task = report.get("task", {})
    header = ["", "baseline", *([f"control (+{control.get('extra_epochs', '?')} epochs)"] if control else []),
              "pruned", "pruned vs baseline", *(["blog VGG16 before", "blog after", "blog change"] if blog else [])]
    labels = {"accuracy": f"accuracy, all {task['test_images']} test images" if "test_images" in task else "accuracy, test images",
              "accuracy_800": f"accuracy, the blog's {task.get('blog_test_images', 800)} test images"}
    # the blog's figures: its accuracy is on its 800 test images, its latency for one image
    blog_keys = {"accuracy_800" if "accuracy_800" in base else "accuracy": "accuracy", "size_mb": "size_mb", "latency_ms_b1": "latency_ms_b1"}
    rows = []
    for key, label, kind in ROWS:
        if key not in base and key not in pruned:
            continue
        row = [labels.get(key, label), _value(kind, base.get(key)), *([_value(kind, control.get(key))] if control else []),
               _value(kind, pruned.get(key)), _change(kind, base.get(key), pruned.get(key))]
        if blog:
            before, after = blog.get(blog_keys.get(key), (None, None))
            row += [_value(kind, before), _value(kind, after), _change(kind, before, after)] if before is not None else ["", "", ""]
        rows.append(row)
    note = (f"Latency: median milliseconds per batch on {base.get('device', '?')}, {base.get('dtype', '?')}, "
            f"{base.get('threads', '?')} threads" + ("; the blog's: one image on an i7 CPU (its 800 test images for accuracy)." if blog else "."))
    return _table(header, rows) + "\n\n" + note


def _summary(report: dict) -> str:
    base, pruned, control, task = report["baseline"], report["pruned"], report.get("control"), report.get("task", {})
    before, after = sum(report.get("channels_before", {}).values()), sum(_final_channels(report).values())
    its = report.get("iterations", [])
    rejected = sum(1 for it in its if it.get("rejected"))
    text = f"On {' vs '.join(task['pair'])} ({task.get('train_images', '?')} training images), " if "pair" in task else ""
    text += (f"pruning removed {before - after} of {before} channels ({100 * (before - after) / max(before, 1):.0f}%) in "
             f"{len(its) - rejected} iterations" + (f" ({rejected} more rejected)" if rejected else "") +
             f" and stopped because: {report.get('stopped', 'not recorded')}. "
             f"The pruned network needs {_change('count', base['macs'], pruned['macs'])} MACs per image, is "
             f"{_change('mb', base['size_mb'], pruned['size_mb'])} on disk ({_value('mb', base['size_mb'])} -> "
             f"{_value('mb', pruned['size_mb'])} MB) and is {_change('ms', base.get('latency_ms_b1'), pruned.get('latency_ms_b1'))} "
             f"at batch 1 on {base.get('device', '?')}. On the test images its accuracy is {_value('acc', pruned['accuracy'])}, "
             f"against {_value('acc', base['accuracy'])} before pruning ({_change('acc', base['accuracy'], pruned['accuracy'])})")
    if control:
        text += (f" and {_value('acc', control['accuracy'])} for the control, the unpruned network fine-tuned for the same "
                 f"{control.get('extra_epochs', '?')} extra epochs ({_change('acc', control['accuracy'], pruned['accuracy'])})")
    text += "."
    blog = [f"{_value(kind, pair[0])} to {_value(kind, pair[1])}{unit}" for key, kind, unit in
            (("accuracy", "acc", ""), ("size_mb", "mb", " MB"), ("latency_ms_b1", "ms", " ms per image"))
            if (pair := report.get("blog", {}).get(key))]
    return text + (f" For comparison, the blog's VGG16 on Dogs vs Cats went from {', '.join(blog)}." if blog else "")


def _targets(report: dict) -> list[str]:
    base, pruned, lines = report["baseline"], report["pruned"], []
    for name, goal in report.get("targets", {}).items():
        if name == "max_accuracy_drop_points":
            # Against the control when there is one: extra fine-tuning must not pass for pruning.
            reference, label = (report["control"], "the control") if "control" in report else (base, "the baseline")
            drop = 100 * (reference["accuracy"] - pruned["accuracy"])
            lines.append(f"- lose at most {goal} accuracy points against {label}: lost {drop:.2f} points — "
                         f"**{'MET' if drop <= goal else 'MISSED'}**")
        elif name in TARGETS and base.get(TARGETS[name][0]) and pruned.get(TARGETS[name][0]):
            key, words = TARGETS[name]
            reached = base[key] / pruned[key]
            lines.append(f"- {goal}x {words}: reached {reached:.2f}x — **{'MET' if reached >= goal else 'MISSED'}**")
        else:
            lines.append(f"- {name} = {goal}: NOT CHECKED (no numbers for it in this report)")
    return lines


def _markdown(report: dict, plots: dict[str, Path]) -> str:
    base, iterations = report["baseline"], report.get("iterations", [])
    parts = ["# Pruning report", _summary(report), "## Headline", headline_table(report)]
    if targets := _targets(report):
        parts += ["## Targets", "\n".join(targets)]
    rows = [["0 (baseline)", "", _value("acc", base["accuracy"]), "1.00x", _value("mb", base["size_mb"]), _value("ms", base.get("latency_ms_b1"))]]
    for it in iterations:
        rows.append([f"{it['iteration']}{' (rejected: lost too much accuracy)' if it.get('rejected') else ''}", it["removed"],
                     _value("acc", it["accuracy"]), f"{base['macs'] / it['macs']:.2f}x", _value("mb", it["size_mb"]),
                     _value("ms", it.get("latency_ms_b1"))])
    pruned = report["pruned"]
    rows.append(["final (after final fine-tune)", "", _value("acc", pruned["accuracy"]), f"{base['macs'] / pruned['macs']:.2f}x",
                 _value("mb", pruned["size_mb"]), _value("ms", pruned.get("latency_ms_b1"))])
    parts += ["## Iterations", _table(["iteration", "channels removed", "accuracy", "MACs reduction", "size (MB)",
                                       "latency b1 (ms)"], rows)]
    if before := report.get("channels_before"):
        first = iterations[0].get("removed_per_group", {}) if iterations else {}
        after = _final_channels(report)
        parts += ["## Layers", "Filters removed per layer in the first iteration (like the blog's \"Layer 0: 6, Layer 2: 1, ...\"): "
                  + ", ".join(f"{name}: {first.get(name, 0)}" for name in before) + ".",
                  _table(["layer", "removed in iteration 1", "channels before", "channels after", "kept"],
                         [[name, first.get(name, 0), n, after.get(name, n), f"{100 * after.get(name, n) / n:.0f}%"]
                          for name, n in before.items()])]
    parts += ["## Run", f"Stopped: {report.get('stopped', 'not recorded')}.",
              f"Wall time: {report['wall_s']:.0f} s ({report['wall_s'] / 60:.1f} min)." if "wall_s" in report else "Wall time: not recorded."]
    if plots:
        parts += ["## Plots", "\n\n".join(f"![{name}]({path.name})" for name, path in plots.items())]
    return "\n\n".join(parts) + "\n"


def _plot_accuracy(report: dict) -> Figure:
    base, pruned, control, its = report["baseline"], report["pruned"], report.get("control"), report.get("iterations", [])
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    xs, ys = [base["macs"] / 1e6] + [it["macs"] / 1e6 for it in its], [100 * base["accuracy"]] + [100 * it["accuracy"] for it in its]
    ax.plot(xs, ys, "o-", color="tab:orange", label="after each pruning iteration")
    for it, x, y in zip(its, xs[1:], ys[1:]):
        ax.annotate(str(it["iteration"]) + (" rejected" if it.get("rejected") else ""), (x, y), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    ax.plot(xs[0], ys[0], "s", color=COLORS["baseline"], markersize=9, label="baseline")
    ax.plot(pruned["macs"] / 1e6, 100 * pruned["accuracy"], "*", color=COLORS["pruned"], markersize=15, label="pruned, after the final fine-tune")
    if control:
        ax.axhline(100 * control["accuracy"], color=COLORS["control"], linestyle="--", label=f"control (unpruned, +{control.get('extra_epochs', '?')} epochs)")
    ax.set(xlabel="MACs per image (millions)", ylabel="test accuracy (%)", title="Accuracy vs compute over pruning iterations")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    return fig


def _plot_channels(report: dict) -> Figure:
    before, after = report["channels_before"], _final_channels(report)
    names, x = list(before), range(len(before))
    fig = Figure(figsize=(max(6.0, 0.5 * len(names) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar([i - 0.2 for i in x], [before[n] for n in names], 0.4, label="before", color=COLORS["baseline"])
    ax.bar([i + 0.2 for i in x], [after.get(n, before[n]) for n in names], 0.4, label="after", color=COLORS["pruned"])
    if max(before.values()) / max(min(before.values()), 1) > 30:
        ax.set_yscale("log")
    ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="channels" + (" (log scale)" if ax.get_yscale() == "log" else ""), title="Channels per layer before and after pruning")
    ax.legend(fontsize=8)
    return fig


def _plot_cost(report: dict) -> Figure:
    models = [(n, report[n]) for n in ("baseline", "control", "pruned") if report.get(n)]
    panels = [(k, t) for k, t in (("latency_ms_b1", "latency, batch 1 (ms)"), ("latency_ms_b64", "latency, batch 64 (ms)"),
                                  ("size_mb", "size on disk (MB)")) if k in report["baseline"] and k in report["pruned"]]
    fig = Figure(figsize=(3.2 * len(panels) + 0.6, 3.8), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        shown, kind = [(n, m[key]) for n, m in models if m.get(key) is not None], "mb" if key == "size_mb" else "ms"
        bars = ax.bar([n for n, _ in shown], [v for _, v in shown], color=[COLORS[n] for n, _ in shown])
        ax.bar_label(bars, [_value(kind, v) for _, v in shown], fontsize=8)
        ax.set_ylim(0, 1.15 * max(v for _, v in shown))
        ax.set_title(f"{title}\npruned: {_change(kind, report['baseline'][key], report['pruned'][key])}", fontsize=10)
    base = report["baseline"]
    fig.suptitle(f"Cost on {base.get('device', '?')}, {base.get('dtype', '?')}, {base.get('threads', '?')} threads (lower is better)", fontsize=10)
    return fig


def _write(path: Path, write) -> None:
    """Write through `path`.tmp and os.replace; on failure remove only the temp file and say what to do."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(err, OSError):
            raise
        raise OSError(err.errno, f"could not write {path} ({err.strerror or err}): free some disk space or choose another "
                      f"output folder; files already in {path.parent} were left as they were") from err


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """Write out/report.json (the dict as given), out/report.md and PNG plots; returns name -> path."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the report folder {out} ({err.strerror or err}): choose another output folder") from err
    makers = {"accuracy_vs_macs": _plot_accuracy, "channels_per_layer": _plot_channels if report.get("channels_before") else None,
              "latency_size": _plot_cost}
    plots = {name: out / f"{name}.png" for name, make in makers.items() if make}
    paths = {"json": out / "report.json", "markdown": out / "report.md", **plots}
    texts = {"json": json.dumps(report, indent=2).encode(), "markdown": _markdown(report, plots).encode()}  # fail before writing
    for name, path in plots.items():
        fig = makers[name](report)
        _write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight"))
    for name in ("markdown", "json"):  # the JSON last: a new report.json means the whole report is new
        _write(paths[name], lambda f: f.write(texts[name]))
    return paths
