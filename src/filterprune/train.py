"""Plain training and evaluation loops used between pruning steps (nothing pruning-specific here)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def make_optimizer(params: Iterable[nn.Parameter], name: str = "sgd", lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD with momentum (the blog's choice) or Adam; build a new one after every surgery."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', not {name!r}")


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: Callable = nn.functional.cross_entropy,
                device: str = "cpu", progress: bool = True, desc: str = "train") -> dict[str, float]:
    """One pass over `loader`; returns the mean loss and accuracy seen during training."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable = nn.functional.cross_entropy, device: str = "cpu",
             progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """Accuracy (0-1) and mean loss over `loader`, in eval mode; restores the model's mode."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for inputs, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            total_loss += loss_fn(logits, targets, reduction="sum").item()
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("the evaluation loader gave no examples")
    return {"accuracy": correct / seen, "loss": total_loss / seen, "examples": seen}


def fine_tune(model: nn.Module, loader: Iterable, epochs: int, lr: float = 1e-3, optimizer: str = "sgd", weight_decay: float = 0.0,
              device: str = "cpu", progress: bool = True, desc: str = "fine-tune") -> list[dict[str, float]]:
    """Train all trainable layers for `epochs` with a fresh optimizer and a cosine learning rate."""
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    history = []
    for epoch in range(epochs):
        history.append(train_epoch(model, loader, opt, device=device, progress=progress, desc=f"{desc} {epoch + 1}/{epochs}"))
        schedule.step()
    return history
