"""Pruner construction time on torchvision resnet50 at 224, this checkout against an earlier one.

    git worktree add --detach /tmp/old 238941e        # the commit before the torch.export front end
    python benchmarks/bench_construction.py --old /tmp/old

Each version runs in its own process (1 thread), in turns, `--rounds` times; each process builds
the Pruner once untimed (lazy imports, allocator) and then `--repeats` times, and its median is
kept. The table shows each version's lowest median over the rounds: load elsewhere only slows a
timing. Front ends: this checkout's default ("auto": fx where it traces) and frontend="export".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time, torch, torchvision
torch.set_num_threads(1)
import filterprune as fp
kwargs = json.loads(sys.argv[1])
model, x = torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224)
times = []
for i in range(int(sys.argv[2]) + 1):
    start = time.perf_counter()
    fp.Pruner(model, x, criterion="l1", **kwargs)
    times.append(time.perf_counter() - start)
print(json.dumps(times[1:]))
"""


def run(src: Path, kwargs: dict, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kwargs), str(repeats)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return statistics.median(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the earlier commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    versions = {"before (fx only)": (args.old, {}), "now, default (auto)": (here, {}), "now, frontend=export": (here, {"frontend": "export"})}
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (src, kwargs) in versions.items():
            best[name] = min(best.get(name, float("inf")), run(src, kwargs, args.repeats))
    print("| Pruner construction, resnet50 at 224, 1 thread | seconds | vs before |\n|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {s / best['before (fx only)']:.2f}x |")


if __name__ == "__main__":
    main()
