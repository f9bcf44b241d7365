"""Learning-rate schedules as pure functions of (step, total steps), shared by TWA and base training.

``lr_factor`` returns the multiplier of the base learning rate; ``make_scheduler`` wraps
it in a ``torch.optim.lr_scheduler.LambdaLR`` so that state_dict() resumes it exactly.
``compressed_factor`` / ``make_compressed_scheduler``: the rest of a schedule compressed
into a shorter continuation (the SGD-at-equal-compute baseline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "cosine", "linear", "step", "swa")


@dataclass
class ScheduleSpec:
    """What the schedule is; ``total_steps`` is the full budget the schedule is laid out for,
    ``epochs`` the same budget in epochs (None: every step counts as one).

    - constant: 1.
    - cosine: warmup, then 1 -> final_factor along a half cosine.
    - linear: warmup, then 1 -> final_factor linearly.
    - step: multiply by ``gamma`` at each milestone: fractions of the budget (e.g. [0.5, 0.75]),
      or by default (None) the paper's: epochs int(0.5 * E) and int(0.75 * E + 0.9) of an
      E-epoch budget (``paper_milestones``), so a user's epoch counts give its schedule.
    - swa: SWA's own schedule: 1 for the first half of ``swa_start``, then linear down to
      ``final_factor`` (swa_lr / lr) at 0.9 * swa_start, then constant (the tail).
    """

    kind: str = "cosine"
    total_steps: int = 1
    warmup_frac: float = 0.0
    milestones: list[float] | None = None
    gamma: float = 0.1
    final_factor: float = 0.0
    swa_start: float = 1.0
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule {self.kind!r} is not one of {list(SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"schedule total_steps must be >= 1, got {self.total_steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"schedule epochs must be >= 1, got {self.epochs}")
        if self.milestones is not None:
            self.milestones = [float(m) for m in self.milestones]
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"schedule warmup must be in [0, 1), got {self.warmup_frac}")


def paper_milestones(epochs: int) -> list[int]:
    """The step schedule's milestones (epochs) in the TWA paper's code for an E-epoch budget:
    int(0.5 * E) and int(0.75 * E + 0.9), as torch's MultiStepLR stepped once per epoch."""
    return [int(epochs * 0.5), int(epochs * 0.75 + 0.9)]


def lr_factor(step: int, spec: ScheduleSpec) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``spec.total_steps``."""
    t = step / spec.total_steps
    if spec.kind == "swa":
        t = t / spec.swa_start
        if t <= 0.5:
            return 1.0
        if t <= 0.9:
            return 1.0 - (1.0 - spec.final_factor) * (t - 0.5) / 0.4
        return spec.final_factor
    if spec.kind == "step":
        return spec.gamma ** _decays(step, spec)
    warmup_steps = int(round(spec.warmup_frac * spec.total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if spec.kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, spec.total_steps - warmup_steps))
    if spec.kind == "cosine":
        return spec.final_factor + (1.0 - spec.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - spec.final_factor) * progress  # linear


def _decays(step: int, spec: ScheduleSpec) -> int:
    """How many of a step schedule's milestones ``step`` has reached."""
    if spec.milestones is not None:
        return sum(step / spec.total_steps >= m for m in spec.milestones)
    epochs = spec.epochs or spec.total_steps
    # epoch e of E starts at step e * total / E: compared in integers, exactly
    return sum(step * epochs >= e * spec.total_steps for e in paper_milestones(epochs))


def make_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))


# ---------------------------------------------------------------- a continuation, the rest compressed


def _decay_steps(spec: ScheduleSpec) -> list[int]:
    """The steps at which a step schedule decays, one per milestone reached within its
    ``total_steps`` (a milestone at the budget's end or past it never takes effect)."""
    steps = []
    for count in range(1, _decays(spec.total_steps - 1, spec) + 1):
        low, high = 0, spec.total_steps - 1  # the first step with ``count`` decays (their number grows with the step)
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if _decays(middle, spec) >= count else (middle + 1, high)
        steps.append(low)
    return steps


def compressed_factor(step: int, spec: ScheduleSpec, start: int, steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of a continuation of
    ``steps`` steps that resumes ``spec`` (the full budget's schedule) where training stopped,
    after ``start`` of its ``spec.total_steps`` steps, and compresses the rest of the
    schedule into those steps (SGD at the compute of TWA: the rest of the budget in TWA's
    epochs). The first step has the schedule's factor at ``start``; then

    - step: each decay still ahead (at step d of the budget) comes at the same fraction of
      the continuation, (d - start) / (total_steps - start): from the first continuation step
      ``j`` with ``j / steps`` at least that;
    - cosine, linear, constant (and swa): the rest of the curve (warmup included, if any is
      left) stretched over the continuation, whose last step has the schedule's final value
      (cosine and linear: ``final_factor``);

    a step past the last keeps the last one's factor.
    """
    total = spec.total_steps
    if not 0 <= start <= total:
        raise ValueError(f"the continuation starts at step {start}, outside the schedule's 0..{total} steps")
    if steps < 1:
        raise ValueError(f"a continuation needs at least one step, got {steps}")
    step = min(max(0, step), steps - 1)
    if spec.kind == "step":
        decays = _decay_steps(spec)
        done = sum(d <= start for d in decays)
        # exactly, in integers: j / steps >= (d - start) / (total - start)
        ahead = sum(d > start and step * (total - start) >= (d - start) * steps for d in decays)
        return spec.gamma ** (done + ahead)
    position = float(total) if steps == 1 else start + (total - start) * step / (steps - 1)
    return lr_factor(position, spec)


def make_compressed_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, start: int,
                              steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step through ``compressed_factor``'s
    continuation (state_dict() resumes it exactly: the factors depend on the step alone)."""
    factors = [compressed_factor(j, spec, start, steps) for j in range(steps)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda j: factors[min(j, steps - 1)])


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(
    params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False
) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay, optional Nesterov) or AdamW by name."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not one of {list(OPTIMIZERS)}")
