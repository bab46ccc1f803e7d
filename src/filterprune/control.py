"""The control of a planned run: the unpruned network fine-tuned in step with the pruned one.

The demo's unpruned baseline is rarely converged: fine-tuned for the epochs pruning takes, it gains
1.6 to 3.0 validation points (benchmarks/README.md). A loop that judged each step against the
baseline spent those points as its accuracy budget, and ended below the control that the report
headlines. So the control trains alongside: one epoch of it after each of the pruned network's,
under the same learning-rate schedule (restarted at every step and final cycle), keeping its best
epoch on validation as the pruned network does; a step that is rolled back takes the control's
epochs back with it. Its best validation score so far is the bar each step is judged against.
"""

from __future__ import annotations

import time
from typing import Callable

from torch import nn

from .train import copy_state


class Control:
    """The unpruned `model`, fine-tuned by trainer(model, epochs) -> one_epoch(epoch) and scored by
    score(model) (higher is better) alongside the pruned network (follow); `best` is its best
    score so far (the unpruned network's to begin with), `scores` one per epoch from epoch 0,
    `seconds` the time its epochs and scoring took by clock()."""

    def __init__(self, model: nn.Module, trainer: Callable, score: Callable[[nn.Module], float], first_score: float,
                 clock: Callable[[], float] = time.perf_counter):
        """first_score: the unpruned model's score, which the caller has already (not scored again)."""
        self.model, self.trainer, self.score, self.clock, self.seconds = model, trainer, score, clock, 0.0
        self.best = first_score
        self.scores, self.best_epoch, self._state = [self.best], 0, copy_state(model)

    def follow(self, pruned_epoch: Callable[[int], object], epochs: int) -> Callable[[int], object]:
        """pruned_epoch (one epoch of the pruned network's fine-tune of at most `epochs`), then one of
        the control's, from its best weights, with a learning-rate schedule of the same length."""
        self.model.load_state_dict(self._state)
        own = self.trainer(self.model, epochs)

        def both(epoch: int):
            loss = pruned_epoch(epoch)
            t = self.clock()
            own(epoch)
            self.scores.append(self.score(self.model))
            self.seconds += self.clock() - t
            if self.scores[-1] > self.best:
                self.best, self.best_epoch, self._state = self.scores[-1], len(self.scores) - 1, copy_state(self.model)
            return loss

        return both

    def mark(self) -> tuple:
        """Where the control stands, for undo()."""
        return self.best, self.best_epoch, len(self.scores), self._state

    def undo(self, mark: tuple) -> None:
        """Back to `mark`: the epochs since then are taken back (a rolled-back step's)."""
        self.best, self.best_epoch, n, self._state = mark
        del self.scores[n:]
        self.model.load_state_dict(self._state)

    def finish(self) -> nn.Module:
        """The control with its best epoch's weights."""
        self.model.load_state_dict(self._state)
        return self.model

    @property
    def epochs(self) -> int:
        return len(self.scores) - 1
