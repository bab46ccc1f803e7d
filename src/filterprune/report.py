"""The report of a pruning run: report.json (the numbers), report.md (the story) and PNG plots.

Every file is written atomically (utils.atomic_path), so a crash or a full disk never leaves a
half-written report, and a failed write leaves the previous report as it was.

Every "faster"/"slower" goes through measure.speed_change: a change inside the measured spread
(a latency record's iqr_ms) reads "no measurable change". On a GPU the headline latency is batch 64.
Latency is read with measure.latency from each summary's "latency" records; where a runtime was
measured beside eager PyTorch (Schedule.runtime), it is the headline and eager is shown beside it.

Keys read from the report dict, besides baseline/pruned/control summaries and iterations:
  skipped: list of strings, ops left out of pruning and why (a section when non-empty);
  iterations[i]["check"]: "exact" | "forward-only", which check verified that removal;
  labels: {summary key: row label}, e.g. {"accuracy_800": "accuracy, 800 test images"};
  reference: {"label": str, "note": str, "before": {summary key: value}, "after": {...}},
    published figures shown beside ours (their keys are ours: "accuracy_800", "latency"...);
  loop: {"baseline": {...}, "final": {...}, "evaluated_on": str, "control_accuracy": float}: the
    loop's own measurements, for the iterations table and plot, when the loop evaluated on other
    data than the headline.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global figures, no display needed

from .measure import GPU_BATCH, latency, latency_batches, launch_note, measured_runtimes, paired_change, paired_speedup, speed_change
from .schedule import accuracy_drop, within_drop
from .utils import atomic_path, atomic_write

DPI = 110
COLORS = {"baseline": "tab:gray", "control": "tab:green", "pruned": "tab:blue"}
# (key in the summaries, row label, kind); accuracy and latency rows are found in the summaries
ROWS = [("size_mb", "size on disk (MB)", "mb"), ("params", "parameters", "count"), ("macs", "MACs per image", "count")]
WORDS = {"mb": ("smaller", "larger"), "count": ("fewer", "more")}
TARGETS = {"size": ("size_mb", "smaller on disk"), "macs": ("macs", "fewer MACs per image"), "params": ("params", "fewer parameters")}
LATENCY_TARGETS = {"latency_b1": 1, "latency_b64": 64}  # target name -> batch, in the headline runtime


def _value(kind: str, v) -> str:
    if v is None:
        return "–"
    if kind == "acc":
        return f"{100 * v:.2f}%"
    if kind == "count":
        return f"{v / 1e9:.2f} G" if v >= 1e9 else f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} k" if v >= 1e3 else str(v)
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _change(kind: str, before, after) -> str:
    """How `after` compares with `before`: '-0.55 points', '3.1x smaller'. Latency: see _speed."""
    if before is None or after is None:
        return "–"
    if kind == "acc":
        return f"{100 * (after - before):+.2f} points"
    if not before or not after:
        return "–"
    ratio, (better, worse) = before / after, WORDS[kind]
    return f"{ratio:.1f}x {better}" if ratio >= 1 else f"{1 / ratio:.1f}x {worse}"


def _get(summary: dict, key):
    """A summary's value for a row key: a field's name, or (runtime, batch) for a latency in ms."""
    if isinstance(key, tuple):
        record = latency(summary, key[1], key[0])
        return record["ms"] if record else None
    return summary.get(key)


def speed_vs_baseline(before: dict, after: dict, batch: int, runtime: str = "eager") -> str:
    """How much faster `after` is than the baseline `before` at `batch` in `runtime`: the median of the
    ratios timed in turns with it where measured (a change only when every round agrees on its
    direction), else speed_change of their latencies with their spreads (saying so where a spread was
    not measured)."""
    if paired := paired_speedup(after, batch, runtime):
        return paired_change(paired)
    b, a = latency(before, batch, runtime), latency(after, batch, runtime)
    if not b or not a or not b["ms"] or not a["ms"]:
        return "–"
    if "iqr_ms" in b and "iqr_ms" in a:
        return speed_change(b["ms"], a["ms"], b["iqr_ms"], a["iqr_ms"])
    return speed_change(b["ms"], a["ms"], 0.0, 0.0) + " (spread not measured)"


def _batches(*summaries: dict, runtime: str = "eager") -> list[int]:
    return sorted({b for s in summaries for b in latency_batches(s, runtime)})


def _runtimes(*summaries: dict) -> list[str]:
    """The runtimes measured, the headline first: the one the model ships on, measured beside eager PyTorch."""
    found = list(dict.fromkeys(r for s in summaries for r in measured_runtimes(s)))
    return sorted(found, key=lambda r: r == "eager")


def _headline_runtime(summary: dict) -> str:
    return (_runtimes(summary) or ["eager"])[0]


def _in(runtime: str, summary: dict) -> str:
    """' in onnxruntime' where a summary has runtimes beside eager, else '' (eager only: as always)."""
    return f" in {runtime}" if len(_runtimes(summary)) > 1 or runtime != "eager" else ""


def _headline_batch(summary: dict) -> int | None:
    """GPU_BATCH on a GPU where measured (batch 1 there is launch overhead), else the smallest measured batch."""
    batches = _batches(summary, runtime=_headline_runtime(summary))
    if str(summary.get("device", "")).startswith("cuda") and GPU_BATCH in batches:
        return GPU_BATCH
    return batches[0] if batches else None


def _table(header: list[str], rows: list[list]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def _final_channels(report: dict) -> dict:
    kept = [it for it in report.get("iterations", []) if not it.get("rejected")]
    return kept[-1]["channels"] if kept else report.get("channels_before", {})


def _rows(report: dict) -> list[tuple[str, str, str]]:
    """(key, label, kind) for every row the summaries have: accuracies, then size, params, MACs, then latencies."""
    base, pruned, task = report["baseline"], report["pruned"], report.get("task", {})
    labels = {"accuracy": f"accuracy, all {task['test_images']} test images" if "test_images" in task else "accuracy, test images",
              **report.get("labels", {})}
    accuracies = [k for k in dict.fromkeys([*base, *pruned]) if k == "accuracy" or k.startswith("accuracy_")]
    rows = [(k, labels.get(k, f"accuracy ({k.removeprefix('accuracy_')})"), "acc") for k in accuracies]
    rows += [(k, label, kind) for k, label, kind in ROWS if k in base or k in pruned]
    return rows + [((runtime, b), f"latency, batch {b}{_in(runtime, base)} (ms)", "ms")
                   for runtime in _runtimes(base, pruned) for b in _batches(base, pruned, runtime=runtime)]


def _cells(kind: str, key, before: dict, after: dict) -> str:
    if kind == "ms":
        return speed_vs_baseline(before, after, key[1], key[0])
    return _change(kind, before.get(key), after.get(key))


def headline_table(report: dict) -> str:
    """Baseline, control, pruned and a reference (published figures) side by side, as a markdown table
    and a note on how latency was measured."""
    base, pruned, control, ref = report["baseline"], report["pruned"], report.get("control"), report.get("reference")
    header = ["", "baseline", *([f"control (+{control.get('extra_epochs', '?')} epochs)"] if control else []),
              "pruned", "pruned vs baseline", *([f"{ref['label']} before", f"{ref['label']} after", f"{ref['label']} change"] if ref else [])]
    rows = []
    for key, label, kind in _rows(report):
        row = [label, _value(kind, _get(base, key)), *([_value(kind, _get(control, key))] if control else []),
               _value(kind, _get(pruned, key)), _cells(kind, key, base, pruned)]
        if ref:
            before, after = _get(ref["before"], key), _get(ref["after"], key)
            row += [_value(kind, before), _value(kind, after), _cells(kind, key, ref["before"], ref["after"])] \
                if before is not None else ["", "", ""]
        rows.append(row)
    device, batch = base.get("device", "?"), _headline_batch(base)
    how = f"milliseconds per batch, {base['timing']}," if base.get("timing") else "median milliseconds per batch"
    note = f"Latency: {how} on {device}, {base.get('dtype', '?')}, {base.get('threads', '?')} threads; "
    note += ("speed-ups: the median of each round's ratio to the baseline, timed back to back (\"no measurable change\" "
             "unless every round agrees)" if pruned.get("speedup") else
             "a change within the two timings' interquartile ranges reads \"no measurable change\"")
    if batch is not None:
        note += f"; headline: batch {batch}" + _in(_headline_runtime(base), base)
    if versions := {(r["runtime"], r.get("version", "")) for r in base.get("latency", [])}:
        note += "; runtimes: " + ", ".join(f"{name} {version}".strip() for name, version in sorted(versions))
    if 1 in _batches(base) and (caveat := launch_note(device, 1)):
        note += f"; batch 1: {caveat}"
    if ref and ref.get("note"):
        note += f"; {ref['label']}: {ref['note']}"
    return _table(header, rows) + "\n\n" + note + "."


def _summary(report: dict) -> str:
    base, pruned, control, task = report["baseline"], report["pruned"], report.get("control"), report.get("task", {})
    before, after = sum(report.get("channels_before", {}).values()), sum(_final_channels(report).values())
    its = report.get("iterations", [])
    rejected = sum(1 for it in its if it.get("rejected"))
    batch, runtime = _headline_batch(base), _headline_runtime(base)
    speed = (f"{speed_vs_baseline(base, pruned, batch, runtime)} at batch {batch}" if batch is not None else "not timed") + \
        f" on {base.get('device', '?')}{_in(runtime, base)}"
    if batch is not None and runtime != "eager":
        speed += f" (eager PyTorch: {speed_vs_baseline(base, pruned, batch)})"
    text = f"On {' vs '.join(task['pair'])} ({task.get('train_images', '?')} training images), " if "pair" in task else ""
    text += (f"pruning removed {before - after} of {before} channels ({100 * (before - after) / max(before, 1):.0f}%) in "
             f"{len(its) - rejected} iterations" + (f" ({rejected} more rejected)" if rejected else "") +
             f" and stopped because: {report.get('stopped', 'not recorded')}. "
             f"The pruned network needs {_change('count', base['macs'], pruned['macs'])} MACs per image, is "
             f"{_change('mb', base['size_mb'], pruned['size_mb'])} on disk ({_value('mb', base['size_mb'])} -> "
             f"{_value('mb', pruned['size_mb'])} MB) and its latency: {speed}. "
             f"On the test images its accuracy is {_value('acc', pruned['accuracy'])}, "
             f"against {_value('acc', base['accuracy'])} before pruning ({_change('acc', base['accuracy'], pruned['accuracy'])})")
    if control:
        text += (f" and {_value('acc', control['accuracy'])} for the control, the unpruned network fine-tuned for the same "
                 f"{control.get('extra_epochs', '?')} extra epochs ({_change('acc', control['accuracy'], pruned['accuracy'])})")
    text += "."
    if ref := report.get("reference"):
        pairs = [f"{label} {_value(kind, _get(ref['before'], key))} -> {_value(kind, _get(ref['after'], key))}"
                 for key, label, kind in _rows({"baseline": ref["before"], "pruned": ref["after"], "labels": report.get("labels", {})})
                 if _get(ref["before"], key) is not None and _get(ref["after"], key) is not None]
        text += f" For comparison, {ref['label']}" + (f" ({ref['note']})" if ref.get("note") else "") + f": {'; '.join(pairs)}."
    return text


def _targets(report: dict) -> list[str]:
    base, pruned, lines = report["baseline"], report["pruned"], []
    for name, goal in report.get("targets", {}).items():
        if name == "max_accuracy_drop_points":
            # Against the control when there is one: extra fine-tuning must not pass for pruning.
            reference, label = (report["control"], "the control") if "control" in report else (base, "the baseline")
            # Judged as the loop judges its limit (schedule.within_drop), so the two never disagree.
            drop, met = accuracy_drop(reference["accuracy"], pruned["accuracy"]), within_drop(reference["accuracy"], pruned["accuracy"], goal)
            change = f"lost {drop:.2f} points" if drop > 0 else f"gained {-drop:.2f} points" if drop < 0 else "level"
            lines.append(f"- lose at most {goal} accuracy points against {label}: {change} — "
                         f"**{'MET' if met else 'MISSED'}**")
        elif name in LATENCY_TARGETS and _get(base, key := (runtime := _headline_runtime(base), LATENCY_TARGETS[name])) \
                and _get(pruned, key):
            # a speed-up counts only beyond the noise, and is worded by speed_change
            said = speed_vs_baseline(base, pruned, key[1], runtime)
            reached = paired["x"] if (paired := paired_speedup(pruned, key[1], runtime)) else _get(base, key) / _get(pruned, key)
            met = reached >= goal and said.endswith("faster")
            lines.append(f"- {goal}x faster at batch {key[1]}{_in(runtime, base)}: reached {said} — **{'MET' if met else 'MISSED'}**")
        elif name in TARGETS and base.get(TARGETS[name][0]) and pruned.get(TARGETS[name][0]):
            key, words = TARGETS[name]
            reached = base[key] / pruned[key]
            lines.append(f"- {goal}x {words}: reached {reached:.2f}x — **{'MET' if reached >= goal else 'MISSED'}**")
        else:
            lines.append(f"- {name} = {goal}: NOT CHECKED (no numbers for it in this report)")
    return lines


def _iteration_rows(report: dict) -> tuple[list[str], list[list]]:
    # The loop's own measurements where given (report["loop"]: its baseline and final, and the data
    # it evaluated on), so that every accuracy in this table comes from the same images.
    loop = report.get("loop", {})
    base, iterations, pruned = loop.get("baseline", report["baseline"]), report.get("iterations", []), loop.get("final", report["pruned"])
    runtimes = _runtimes(base) or ["eager"]
    batches = _batches(*iterations, runtime=runtimes[0]) or _batches(base, runtime=runtimes[0])
    batch = _headline_batch(base) if _headline_batch(base) in batches else (batches[0] if batches else None)
    checks = any("check" in it for it in iterations)
    accuracy = f"accuracy ({loop['evaluated_on']})" if "evaluated_on" in loop else "accuracy"
    timings = [[f"latency b{batch}{_in(r, base)} (ms)", "speed vs baseline" + (f" ({r})" if _in(r, base) else "")] for r in runtimes]
    header = ["iteration", "channels removed", accuracy, "MACs reduction", "size (MB)", *sum(timings, []),
              *(["verified by"] if checks else [])]

    def row(name, removed, summary, check=""):
        times = [[_value("ms", _get(summary, (r, batch))), speed_vs_baseline(base, summary, batch, r) if batch and summary is not base else ""]
                 for r in runtimes]
        return [name, removed, _value("acc", summary["accuracy"]), f"{base['macs'] / summary['macs']:.2f}x",
                _value("mb", summary["size_mb"]), *sum(times, []), *([check] if checks else [])]

    rows = [row("0 (baseline)", "", base)]
    rows += [row(f"{it['iteration']}{' (rejected: lost too much accuracy)' if it.get('rejected') else ''}", it["removed"], it,
                 it.get("check", "–")) for it in iterations]
    return header, rows + [row("final (after final fine-tune)", "", pruned)]


def _plan(report: dict) -> list[str]:
    """The planned run's steps (auto.prune_auto): what each asked and reached, its fine-tuning, kept or
    rolled back and why; what the budget cut; the time spent where."""
    plan, loop = report["plan"], report.get("loop", {})
    base, its = loop.get("baseline", report["baseline"]), report.get("iterations", [])
    batch = (_batches(*its) or _batches(base) or [None])[0]  # the batch the loop timed
    runtime = _headline_runtime(base)
    # With a control, each step is judged against its validation accuracy as it stood then (auto.py).
    judge = "the control's (the unpruned network fine-tuned alongside)" if plan.get("plan", {}).get("control") else "the baseline's"
    header = ["step", "asked (of the model before)", "MACs (vs baseline)", f"speed b{batch}{_in(runtime, base)}", "size", "validation accuracy",
              "judged against", "epochs (best)", "fine-tune stopped by", "outcome", "seconds (prune + fine-tune)"]
    rows = [[it["iteration"], f"{it['asked_macs']:.2f}x fewer MACs", f"{base['macs'] / it['macs']:.2f}x fewer",
             speed_vs_baseline(base, it, batch, runtime), f"{base['size_mb'] / it['size_mb']:.1f}x smaller", _value("acc", it["accuracy"]),
             _value("acc", it.get("against", base["accuracy"])), f"{it['epochs']} ({it['best_epoch']})", it["fine_tune_stopped"], it["why"],
             f"{it['seconds']['prune']:.0f} + {it['seconds']['fine_tune']:.0f}"] for it in its]
    final = plan["final_fine_tune"]
    lines = [f"The loop planned its steps from the targets (each step asks for what the targets still need, at most the last "
             f"step that held; a step that ends more than the accuracy limit below {judge} validation accuracy is rolled back "
             f"and retried at the square root of its size) and fine-tuned after each until the validation accuracy stopped "
             f"improving, keeping the best epoch. Final fine-tune: {final['epochs']} epochs (best {final['best_epoch']}), "
             f"stopped by {final['stopped']}.",
             _table(header, rows)]
    if noise := plan.get("noise"):
        lines.append(f"While pruning went on, a step was kept up to {noise['step_allowance']:.2f} points beyond the accuracy limit "
                     f"(the noise of {noise['examples']} validation images: {noise['points']:.2f} points, one standard error of a "
                     "difference of two accuracies); the final network is held to the limit itself.")
    if back := plan.get("fell_back"):
        lines.append(f"The final network ended {back['final_missed_by']:.2f} points below the limit's reference, so step "
                     f"{back['step']}'s network (the last within the limit) had a final fine-tune too: "
                     f"{_value('acc', back['score'])} against {_value('acc', back['instead_of'])}; "
                     + ("it was kept in place of the final network." if back["used"] else "the final network stayed."))
    if recovery := plan.get("recovery"):
        lines += _recovery(recovery)
    lines.append("Gave up for the time budget: " + "; ".join(plan["gave_up"]) + "." if plan["gave_up"] else
                 "Nothing was given up for a time budget.")
    seconds = plan["seconds"]
    lines.append("Time spent: " + ", ".join(f"{name.replace('_', ' ')} {value:.0f} s" for name, value in seconds.items()) + ".")
    return lines


def _recovery(recovery: dict) -> list[str]:
    """Which recovery tools the planned run used, and the trials (recovery.py) that chose them."""
    used = ", ".join(f"{tool} {value}" for tool, value in recovery["used"].items())
    rows = [[t["tool"], t["tried"], _value("acc", t["score"]), _value("acc", t["against"]) if "against" in t else "", t["outcome"]]
            for t in recovery["trials"]]
    rows += [[t["tool"], "not tried", "", "", t["why"]] for t in recovery["left_out"]]
    return [f"Recovery tools used: **{used}**. Each was chosen by a trial of the first step ({recovery['asked_macs']:.2f}x fewer "
            f"MACs, {recovery['trial_epochs']} epochs of fine-tuning, the step's seed) on a copy of the network, scored on the "
            f"validation images; a tool is used only when it gains more than {recovery['margin']:.2f} points over the setting it "
            "would replace (the larger of --recovery-margin and the validation images' noise), one tool at a time.",
            _table(["tool", "tried", "validation accuracy", "against", "outcome"], rows)]


def _markdown(report: dict, plots: dict[str, Path]) -> str:
    iterations = report.get("iterations", [])
    parts = ["# Pruning report", _summary(report), "## Headline", headline_table(report)]
    if control := report.get("control"):  # what pruning cost, with what extra epochs alone give taken out
        parts.insert(1, f"**Pruned - control: {_change('acc', control['accuracy'], report['pruned']['accuracy'])}** "
                        f"({_rows(report)[0][1]}).")
    if targets := _targets(report):
        parts += ["## Targets", "\n".join(targets)]
    if report.get("plan"):
        parts += ["## Plan", *_plan(report)]
    parts += ["## Iterations", _table(*_iteration_rows(report))]
    if before := report.get("channels_before"):
        first = iterations[0].get("removed_per_group", {}) if iterations else {}
        after = _final_channels(report)
        parts += ["## Layers", "Filters removed per layer in the first iteration: "
                  + ", ".join(f"{name}: {first.get(name, 0)}" for name in before) + ".",
                  _table(["layer", "removed in iteration 1", "channels before", "channels after", "kept"],
                         [[name, first.get(name, 0), n, after.get(name, n), f"{100 * after.get(name, n) / n:.0f}%"]
                          for name, n in before.items()])]
    if skipped := report.get("skipped"):
        parts += ["## Left out of pruning", "These ops' channels were not pruned:\n\n" + "\n".join(f"- {s}" for s in skipped)]
    parts += ["## Run", f"Stopped: {report.get('stopped', 'not recorded')}.",
              f"Wall time: {report['wall_s']:.0f} s ({report['wall_s'] / 60:.1f} min)." if "wall_s" in report else "Wall time: not recorded."]
    if plots:
        parts += ["## Plots", "\n\n".join(f"![{name}]({path.name})" for name, path in plots.items())]
    return "\n\n".join(parts) + "\n"


def _plot_accuracy(report: dict) -> Figure:
    # All on the data the loop evaluated on (report["loop"]), so the curve never mixes two image sets.
    loop, control, its = report.get("loop", {}), report.get("control"), report.get("iterations", [])
    base, pruned = loop.get("baseline", report["baseline"]), loop.get("final", report["pruned"])
    control_accuracy = loop.get("control_accuracy", control["accuracy"]) if control else None
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    xs, ys = [base["macs"] / 1e6] + [it["macs"] / 1e6 for it in its], [100 * base["accuracy"]] + [100 * it["accuracy"] for it in its]
    ax.plot(xs, ys, "o-", color="tab:orange", label="after each pruning iteration")
    for it, x, y in zip(its, xs[1:], ys[1:]):
        ax.annotate(str(it["iteration"]) + (" rejected" if it.get("rejected") else ""), (x, y), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    ax.plot(xs[0], ys[0], "s", color=COLORS["baseline"], markersize=9, label="baseline")
    ax.plot(pruned["macs"] / 1e6, 100 * pruned["accuracy"], "*", color=COLORS["pruned"], markersize=15, label="pruned, after the final fine-tune")
    if control_accuracy is not None:
        ax.axhline(100 * control_accuracy, color=COLORS["control"], linestyle="--", label=f"control (unpruned, +{control.get('extra_epochs', '?')} epochs)")
    ax.set(xlabel="MACs per image (millions)", ylabel=f"accuracy on {loop.get('evaluated_on', 'the test images')} (%)",
           title="Accuracy vs compute over pruning iterations")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    return fig


def _plot_curves(report: dict) -> Figure:
    """Validation accuracy after each epoch of every fine-tune of a planned run, one after another."""
    loop, control = report.get("loop", {}), report.get("control")
    fig = Figure(figsize=(7.2, 4.4), layout="constrained")
    ax = fig.add_subplot()
    start = 0
    for it in report.get("iterations", []):
        xs = range(start, start + len(it["curve"]))
        rejected = it.get("rejected")
        ax.plot(xs, [100 * v for v in it["curve"]], "o--" if rejected else "o-", markersize=3,
                color="tab:red" if rejected else "tab:blue", alpha=0.6 if rejected else 1.0)
        ax.annotate(f"{it['iteration']}{' rolled back' if rejected else ''}", (start, 100 * it["curve"][0]), fontsize=7,
                    textcoords="offset points", xytext=(0, -10))
        start += len(it["curve"])
    final = report["plan"]["final_fine_tune"]["scores"]
    ax.plot(range(start, start + len(final)), [100 * v for v in final], "o-", markersize=3, color="tab:purple", label="final fine-tune")
    ax.axhline(100 * loop.get("baseline", report["baseline"])["accuracy"], color=COLORS["baseline"], linestyle=":", label="baseline")
    if control and "curve" in control:
        ax.axhline(100 * max(control["curve"]), color=COLORS["control"], linestyle="--", label="control (best epoch)")
    ax.plot([], [], "o-", color="tab:blue", label="after a step (kept)")
    ax.plot([], [], "o--", color="tab:red", label="after a step (rolled back)")
    ax.set(xlabel="epochs of fine-tuning, one step after another (each starts at the step's epoch 0)",
           ylabel=f"accuracy on {loop.get('evaluated_on', 'the validation images')} (%)", title="Validation accuracy during each fine-tune")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=3, fontsize=8)
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
    base, pruned = report["baseline"], report["pruned"]
    models = [(n, report[n]) for n in ("baseline", "control", "pruned") if report.get(n)]
    panels = [((r, b), f"latency, batch {b}{_in(r, base)} (ms)" + (" (launch-bound)" if launch_note(base.get("device", ""), b) else ""))
              for r in _runtimes(base) for b in _batches(base, runtime=r) if b in _batches(pruned, runtime=r)]
    panels += [("size_mb", "size on disk (MB)")] if "size_mb" in base and "size_mb" in pruned else []
    fig = Figure(figsize=(3.2 * len(panels) + 0.6, 3.8), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        shown, kind = [(n, _get(m, key)) for n, m in models if _get(m, key) is not None], "mb" if key == "size_mb" else "ms"
        bars = ax.bar([n for n, _ in shown], [v for _, v in shown], color=[COLORS[n] for n, _ in shown])
        ax.bar_label(bars, [_value(kind, v) for _, v in shown], fontsize=8)
        ax.set_ylim(0, 1.15 * max(v for _, v in shown))
        change = _cells(kind, key, base, pruned) if kind == "ms" else _change(kind, base[key], pruned[key])
        ax.set_title(f"{title}\npruned: {change}", fontsize=10)
    fig.suptitle(f"Cost on {base.get('device', '?')}, {base.get('dtype', '?')}, {base.get('threads', '?')} threads (lower is better)", fontsize=10)
    return fig


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """Write out/report.json (the dict as given), out/report.md and PNG plots; returns name -> path."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the report folder {out} ({err.strerror or err}): choose another output folder") from err
    makers = {"accuracy_vs_macs": _plot_accuracy, "channels_per_layer": _plot_channels if report.get("channels_before") else None,
              "latency_size": _plot_cost, "validation_curves": _plot_curves if report.get("plan") else None}
    plots = {name: out / f"{name}.png" for name, make in makers.items() if make}
    paths = {"json": out / "report.json", "markdown": out / "report.md", **plots}
    texts = {"json": json.dumps(report, indent=2), "markdown": _markdown(report, plots)}  # fail before writing
    for name, path in plots.items():
        with atomic_path(path) as tmp:
            makers[name](report).savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    for name in ("markdown", "json"):  # the JSON last: a new report.json means the whole report is new
        atomic_write(paths[name], texts[name])
    return paths
