"""Distributed ranking and pruning: 2 gloo processes on 127.0.0.1 must agree with one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import filterprune as fp
from filterprune import cli, criteria, io, measure
from filterprune.data import make_loader
from filterprune.distributed import Context, setup
from filterprune.graph import ChannelGraph
from filterprune.schedule import Schedule, prune_iteratively

NAMES = ["taylor", "activation-mean", "activation-std", "apoz"]
SIZES = ((13, 4), (8, 3))  # (examples, batch): 13 gives shards of 7 and 6
LOCAL = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem(n: int, seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.filterprune_arch = {"builder": "test_distributed:problem", "kwargs": {}}  # checkpoints need one; never loaded
    return model, TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 3, (n,)))


def prune_run(ctx: Context | None, epochs: int, folder: Path | None):
    model, dataset = problem(16, seed=1)
    shard = ctx.sharded_loader if ctx else (lambda ds, b, shuffle=False, seed=0: make_loader(ds, b, shuffle, seed))
    schedule = Schedule(criterion="taylor", step=3, epochs=epochs, max_iterations=2, lr=0.05)
    return prune_iteratively(model, dataset.tensors[0][:1], shard(dataset, 4, shuffle=True, seed=3), make_loader(dataset, 8, False),
                             schedule, rank_loader=shard(dataset, 3), checkpoint_dir=folder, progress=False,
                             log_fn=lambda line: None, context=ctx)


def torchrun_worker(folder: Path, cli_args: list[str]) -> None:
    """One process of the torchrun launch (see WORKER): library checks, then the CLI."""
    rank = int(os.environ["RANK"])
    # Timing is slow and differs between processes: here it differs on purpose (only rank 0's may count).
    measure._timed_ms = lambda *args, **kwargs: (1.0 + rank, 0.0)
    ctx = setup("cpu")
    try:
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend) == (rank, 2, rank == 0, "gloo")
        results = {}
        for n, batch in SIZES:
            model, dataset = problem(n)
            graph = ChannelGraph(model, dataset.tensors[0][:1])
            results[n] = criteria.accumulate(model, graph, ctx.sharded_loader(dataset, batch), nn.functional.cross_entropy, NAMES,
                                             progress=False, reduce=ctx.reduce)
        for epochs in (0, 1):
            model, log = prune_run(ctx, epochs, folder / f"checkpoint-{epochs}-rank{rank}")
            results[f"epochs{epochs}"] = (model.state_dict(), dict(model.named_parameters()), log)
        torch.save(results, folder / f"rank{rank}.pt")
        os.chdir(folder / str(rank))  # each process in its own folder, to see which one writes
        assert cli.main(cli_args) == 0  # joins the process group set up above
    finally:
        ctx.teardown()


WORKER = """import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_distributed
test_distributed.torchrun_worker(Path(sys.argv[1]), sys.argv[2:])
"""


def image_folder(root: Path, n: int = 6) -> None:
    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = (torch.rand(20, 20, 3, generator=gen) * 120 + 100 * c).byte().numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.jpg")


def cli_args(folder: Path) -> list[str]:
    return ["prune", "--model", str(folder / "model.safetensors"), "--data", str(folder / "data"), "--size", "32",
            "--batch-size", "3", "--workers", "0", "--device", "cpu", "--step", "10", "--iterations", "2",
            "--epochs-between", "0", "--quiet", "--out", "run"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One `torchrun --nproc_per_node 2` launch on 127.0.0.1 (process start-up is most of the cost)."""
    folder = tmp_path_factory.mktemp("distributed")
    image_folder(folder / "data")
    torch.manual_seed(0)
    io.save(fp.vgg16_layout(num_classes=2, width=0.125, hidden=16), folder / "model.safetensors")
    for rank in "01":
        (folder / rank).mkdir()
    (folder / "worker.py").write_text(WORKER.format(tests=str(Path(__file__).parent)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--log-dir", str(folder / "logs"),
                           "--redirects", "3", str(folder / "worker.py"), str(folder), *cli_args(folder)],
                          cwd=folder, env={**os.environ, **LOCAL}, capture_output=True, text=True, timeout=150)
    logs = {(int(p.parent.name), p.stem): p.read_text() for p in (folder / "logs").rglob("*.log")}
    assert done.returncode == 0, "\n".join([done.stderr[-2000:], *(text[-3000:] for text in logs.values())])
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)], logs


@pytest.fixture(autouse=True)
def constant_latency(monkeypatch):
    monkeypatch.setattr(measure, "_timed_ms", lambda *args, **kwargs: (1.0, 0.0))


@pytest.mark.parametrize("n, batch", SIZES)
def test_two_processes_score_like_one(two_processes, n, batch):
    _, ranks, _ = two_processes
    model, dataset = problem(n)
    graph = ChannelGraph(model, dataset.tensors[0][:1])
    single = criteria.accumulate(model, graph, make_loader(dataset, batch, False), nn.functional.cross_entropy, NAMES, progress=False)
    for name in NAMES:
        assert not single[name].isnan().all()
        for results in ranks:
            torch.testing.assert_close(results[n][name], single[name], rtol=1e-6, atol=1e-9, equal_nan=True, msg=name)


def test_two_processes_remove_the_same_channels_and_only_rank_0_writes(two_processes):
    folder, ranks, _ = two_processes
    model, log = prune_run(None, 0, None)
    for results in ranks:
        state, _, dist_log = results["epochs0"]
        assert [e["channels"] for e in dist_log["iterations"]] == [e["channels"] for e in log["iterations"]]
        assert [e["removed_per_group"] for e in dist_log["iterations"]] == [e["removed_per_group"] for e in log["iterations"]]
        assert len(log["iterations"]) == 2 and sum(e["removed"] for e in log["iterations"]) == 6
        # Without fine-tuning the survivors are untouched: equal weights = the same channels, in order.
        assert state.keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value), key
    for epochs in (0, 1):
        assert (folder / f"checkpoint-{epochs}-rank0" / "state.json").exists()
        assert not (folder / f"checkpoint-{epochs}-rank1").exists()


def test_fine_tuning_is_shared_by_ddp_after_every_surgery(two_processes):
    _, ranks, _ = two_processes
    tuned = [results["epochs1"] for results in ranks]
    untuned = ranks[0]["epochs0"][1]
    for name, value in tuned[0][1].items():  # DDP keeps the processes' weights equal ...
        assert torch.equal(value, tuned[1][1][name]), name
    assert any(not torch.equal(v, untuned[n]) for n, v in tuned[0][1].items() if v.shape == untuned[n].shape)  # ... and trained
    logs = [log for _, _, log in tuned]
    # Decisions rest on rank 0's measurements and the mean training loss of all processes.
    # Wall-clock times too are rank 0's (each process's own clock would differ), so the logs are equal.
    assert logs[0]["iterations"] == logs[1]["iterations"] and logs[0]["baseline"] == logs[1]["baseline"]
    assert [e["wall_s"] for e in logs[0]["iterations"]] == [e["wall_s"] for e in logs[1]["iterations"]]
    assert all(e["train_loss"] is not None for e in logs[0]["iterations"])


def shard_indices(loader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_ranking_shards_hold_every_example_once():
    dataset = TensorDataset(torch.arange(11))
    shards = [shard_indices(Context(rank=r, world_size=3).sharded_loader(dataset, 2)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]


def test_training_shards_reshuffle_every_epoch_reproducibly():
    dataset = TensorDataset(torch.arange(9))

    def epochs(seed, count=3):
        loaders = [Context(rank=r, world_size=2).sharded_loader(dataset, 2, shuffle=True, seed=seed) for r in range(2)]
        return [[shard_indices(loader) for loader in loaders] for _ in range(count)], loaders

    runs, loaders = epochs(seed=5)
    for shards in runs:
        assert [len(s) for s in shards] == [5, 5]  # padded: DDP needs equal step counts
        assert set(shards[0] + shards[1]) == set(range(9))
    assert len({tuple(shards[0]) for shards in runs}) == 3  # every epoch a new order
    assert epochs(seed=5)[0] == runs  # the same seed, the same orders
    assert epochs(seed=6)[0] != runs
    for loader in loaders:  # reseeding the generator (as prune_iteratively does per iteration) replays
        loader.generator.manual_seed(5)
    assert [shard_indices(loader) for loader in loaders] == runs[0]


def test_torchrun_cli_prunes_like_one_process(two_processes, monkeypatch, capsys):
    folder, _, logs = two_processes
    assert logs[0, "stdout"].count("pruned model:") == 1
    assert logs[1, "stdout"] == logs[1, "stderr"] == ""  # rank 1 prints nothing ...
    assert list((folder / "1").iterdir()) == []  # ... and writes nothing
    (folder / "single").mkdir()
    monkeypatch.chdir(folder / "single")  # the same relative --out, in one process
    assert cli.main(cli_args(folder)) == 0
    assert capsys.readouterr().out.count("pruned model:") == 1
    single = io.load(folder / "single" / "run" / "pruned.safetensors").state_dict()
    several = io.load(folder / "0" / "run" / "pruned.safetensors").state_dict()
    original = io.load(folder / "model.safetensors").state_dict()
    assert sum(v.numel() for v in several.values()) < sum(v.numel() for v in original.values())
    assert several.keys() == single.keys()
    for key, value in single.items():
        assert several[key].shape == value.shape and torch.equal(several[key], value), key
