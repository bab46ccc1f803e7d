"""Plain training and evaluation loops used between pruning steps, with optional distillation from
a teacher (the unpruned model), bf16 autocast and channels_last."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .utils import evaluating, training


def make_optimizer(params: Iterable[nn.Parameter], name: str = "sgd", lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD with momentum (the blog's choice) or Adam; build a new one after every surgery."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', not {name!r}")


def logits_of(outputs) -> torch.Tensor:
    """The logits of a model's outputs: the tensor itself, or its .logits (Hugging Face style outputs)."""
    return outputs.logits if hasattr(outputs, "logits") else outputs


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015: KL(teacher || student) of the distributions softened by `temperature`, times
    T^2 (so its gradients keep their scale as T changes); the mean over the batch."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student.float() / t, 1), nn.functional.log_softmax(teacher.float() / t, 1),
                                reduction="batchmean", log_target=True) * t * t


def autocast(device: str | torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` (CPU or CUDA) when enabled; bf16 needs no loss scaling."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def to_device(x: torch.Tensor, device: str | torch.device, channels_last: bool = False) -> torch.Tensor:
    """`x` on `device`; non_blocking so that pinned-memory batches overlap the copy with compute."""
    layout = torch.channels_last if channels_last and x.dim() == 4 else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=layout)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: Callable = nn.functional.cross_entropy,
                device: str = "cpu", progress: bool = True, desc: str = "train", *, teacher: nn.Module | None = None,
                distill: float = 0.0, temperature: float = 4.0, amp: bool = False,
                channels_last: bool = False) -> dict[str, float]:
    """One pass over `loader`; returns the mean loss and accuracy seen during training.

    teacher, distill: the loss is (1 - distill) * loss_fn + distill * distillation_loss against the
    teacher's outputs (the teacher is run in no_grad, in whatever mode it is in: eval for a frozen one).
    """
    # Sums stay on the device: a .item() per step would make the host wait for every step's kernels.
    total_loss, correct, seen = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.long, device=device), 0
    with training(model):
        for inputs, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
            inputs, targets = to_device(inputs, device, channels_last), to_device(targets, device)
            with autocast(device, amp):
                logits = logits_of(model(inputs))
                loss = loss_fn(logits, targets)
                if teacher is not None and distill:
                    with torch.no_grad():
                        soft = logits_of(teacher(inputs))
                    loss = (1 - distill) * loss + distill * distillation_loss(logits, soft, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(targets)
            correct += (logits.argmax(1) == targets).sum()
            seen += len(targets)
    return {"loss": total_loss.item() / max(seen, 1), "accuracy": correct.item() / max(seen, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable = nn.functional.cross_entropy, device: str = "cpu",
             progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """Accuracy (0-1) and mean loss over `loader`, in eval mode; every module's mode is given back."""
    total_loss, correct, seen = 0.0, 0, 0
    with evaluating(model):
        for inputs, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            logits = logits_of(model(inputs))
            total_loss += loss_fn(logits, targets, reduction="sum").item()
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
    if seen == 0:
        raise ValueError("the evaluation loader gave no examples")
    return {"accuracy": correct / seen, "loss": total_loss / seen, "examples": seen}


def fine_tune(model: nn.Module, loader: Iterable, epochs: int, lr: float = 1e-3, optimizer: str = "sgd", weight_decay: float = 0.0,
              device: str = "cpu", progress: bool = True, desc: str = "fine-tune", *, loss_fn: Callable = nn.functional.cross_entropy,
              teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 4.0, amp: bool = False,
              channels_last: bool = False) -> list[dict[str, float]]:
    """Train all trainable layers for `epochs` with a fresh optimizer and a cosine learning rate.

    The other options are train_epoch's; channels_last also converts the model's weights.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    history = []
    for epoch in range(epochs):
        history.append(train_epoch(model, loader, opt, loss_fn, device, progress, desc=f"{desc} {epoch + 1}/{epochs}", teacher=teacher,
                                   distill=distill, temperature=temperature, amp=amp, channels_last=channels_last))
        schedule.step()
    return history


def fine_tune_to_plateau(model: nn.Module, epoch_fn: Callable[[int], object], score_fn: Callable[[], float], max_epochs: int,
                         patience: int, deadline: float | None = None, clock: Callable[[], float] = time.perf_counter,
                         first_score: float | None = None, enough: Callable[[float], bool] | None = None) -> dict:
    """Early stopping: run epoch_fn(epoch) (one epoch of training, epochs counted from 1) at most
    max_epochs times, scoring the model with score_fn() (higher is better) before the first and
    after each; stop once `patience` epochs in a row did not beat the best score, or when clock()
    reaches `deadline`. The model is left with its best epoch's weights and buffers (epoch 0: as it
    came, if no epoch beat that). first_score: the model's score as it comes, where the caller has
    it (not scored again). enough(best score): where given, a plateau stops the fine-tune only once
    that holds, so that one short of it gets all max_epochs (a restarted learning rate is still high
    when the first plateau shows). Returns {"scores": [epoch 0, 1, ...], "best_epoch", "epochs",
    "stopped"}."""
    scores = [score_fn() if first_score is None else first_score]
    best, best_state, stopped = 0, copy_state(model), f"the cap of {max_epochs} epochs"
    for epoch in range(1, max_epochs + 1):
        if deadline is not None and clock() >= deadline:
            stopped = "the time budget"
            break
        epoch_fn(epoch)
        scores.append(score_fn())
        if scores[-1] > scores[best]:
            best, best_state = epoch, copy_state(model)
        elif epoch - best >= patience and (enough is None or enough(scores[best])):
            stopped = f"a plateau ({patience} epochs without a better score)"
            break
    model.load_state_dict(best_state)
    return {"scores": scores, "best_epoch": best, "epochs": len(scores) - 1, "stopped": stopped}


def copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `model`'s parameters and buffers, to load back later (load_state_dict)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
