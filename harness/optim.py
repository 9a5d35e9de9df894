"""The optimizer and the step's clocks: AdamW with verl's lr schedule, and what a
step's timings and memory are read from."""

from __future__ import annotations

import resource
import time

import torch


class Optimizer:
    """AdamW over the trainable parameters, with verl's constant lr after a linear warm-up:
    training step k = 0, 1, ... runs at lr * min(1, k / warmup_steps) (so, as in verl, the
    first step of a warm-up runs at lr 0). The training step clips the gradient and calls
    `step`, or `skip` when the gradient is not finite (counted, so that the loop can stop
    after --max-bad-steps in a row); `end_training_step` advances the schedule once per
    rollout, however many optimizer steps it fed."""

    def __init__(self, params, lr: float, weight_decay: float, warmup_steps: int = 0):
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda k: min(1.0, k / warmup_steps) if warmup_steps > 0 else 1.0
        )
        self.bad_in_a_row = 0
        self.bad_total = 0

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.opt.step()
        self.bad_in_a_row = 0

    def skip(self) -> None:
        """A non-finite gradient: no update, counted."""
        self.bad_in_a_row += 1
        self.bad_total += 1
        self.zero_grad()

    def end_training_step(self) -> None:
        self.schedule.step()

    def state_dict(self) -> dict:
        return {
            "adamw": self.opt.state_dict(),
            "schedule": self.schedule.state_dict(),
            "bad_in_a_row": self.bad_in_a_row,
            "bad_total": self.bad_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["adamw"])
        self.schedule.load_state_dict(state["schedule"])
        self.bad_in_a_row, self.bad_total = state["bad_in_a_row"], state["bad_total"]


def clock() -> float:
    """Seconds, after the GPU has finished its queued work (else a timing shows launch time)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
