"""Learning-rate schedules: the original (dense) schedule S and the retraining variants derived
from it (DESIGN.md, "Retraining variants").

Every schedule is a pure function of the step within its stage (per iteration, so warm-ups and
cycles are smooth) that costs O(1) per call: the engine calls it every step and, on resume, jumps
straight to any step. Past its last step a schedule holds its last value.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import ScheduleConfig

LrFn = Callable[[int], float]

VARIANTS: tuple[str, ...] = ("ft", "lrr", "wr", "slr", "clr")
_KINDS = ("step", "cosine", "linear", "onecycle", "constant")


@dataclass(frozen=True)
class StageSchedule:
    """What a stage steps by: LR per step, momentum per step (None: keep the optimizer's)."""

    lr: LrFn
    momentum: Callable[[int], float] | None
    total_steps: int


def build(cfg: ScheduleConfig, lr: float, steps_per_epoch: int) -> LrFn:
    """The original schedule S as a function of the step; S is defined for any step >= 0
    (past the end it holds its last value)."""
    if cfg.kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {cfg.kind!r} (allowed: {', '.join(_KINDS)})")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = cfg.epochs * steps_per_epoch
    if cfg.kind == "onecycle":
        if cfg.warmup_epochs:
            raise ValueError(
                "schedule.warmup_epochs must be 0 with kind onecycle, which warms up by itself "
                "(schedule.pct_start)"
            )
        initial = lr / cfg.div_factor
        return _one_cycle(total, cfg.pct_start, (initial, lr, initial / cfg.final_div_factor))
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if warm >= total:
        raise ValueError(
            f"schedule.warmup_epochs ({cfg.warmup_epochs}) leaves no step of the "
            f"{cfg.epochs}-epoch schedule after the warm-up"
        )
    base = _base(cfg, lr, steps_per_epoch, warm, total)
    last = total - 1
    start = cfg.warmup_start * lr
    target = base(warm)

    def schedule(step: int) -> float:
        if step < warm:
            return start + (target - start) * step / warm
        return base(min(step, last))

    return schedule


def _base(cfg: ScheduleConfig, lr: float, spe: int, warm: int, total: int) -> LrFn:
    """The schedule shape without warm-up; cosine and linear run from step `warm` and reach
    end_factor * lr at step `total` (the end of training), as torch's schedulers do, so the
    last step still trains with a nonzero LR when end_factor is 0."""
    if cfg.kind == "step":
        bounds = sorted(m * spe for m in cfg.milestones)
        values = [lr * cfg.gamma**i for i in range(len(bounds) + 1)]
        return lambda step: values[bisect_right(bounds, step)]
    end = cfg.end_factor * lr
    span = total - warm
    if cfg.kind == "cosine":
        return lambda step: end + (lr - end) * (1 + math.cos(math.pi * (step - warm) / span)) / 2
    if cfg.kind == "linear":
        return lambda step: lr + (end - lr) * (step - warm) / span
    return lambda step: lr


def _peak(cfg: ScheduleConfig, lr: float, spe: int, schedule: LrFn) -> float:
    """The largest LR of S: lr for onecycle; otherwise S is linear during warm-up and monotone
    after it, so the maximum is at the start, the end of warm-up or the last step."""
    if cfg.kind == "onecycle":
        return lr
    warm = round(cfg.warmup_epochs * spe)
    return max(schedule(0), schedule(warm), schedule(cfg.epochs * spe - 1))


def _one_cycle(total: int, pct_start: float, values: tuple[float, float, float]) -> LrFn:
    """torch's OneCycleLR (cos, two phases) step for step: cosine from values[0] to values[1]
    up to step pct_start * total - 1, then to values[2] at step total - 1. Used for the LR and
    for the momentum (values = (max, base, max))."""
    first, mid, final = values
    turn = float(pct_start * total) - 1
    last = total - 1

    def curve(step: int) -> float:
        step = min(step, last)
        if step <= turn:
            return _cos(first, mid, _fraction(step, 0.0, turn))
        return _cos(mid, final, _fraction(step, turn, last))

    return curve


def _fraction(step: int, start: float, end: float) -> float:
    """How far `step` is through a phase; a zero-length phase (where torch divides by zero) is
    complete."""
    return (step - start) / (end - start) if end != start else 1.0


def _cos(start: float, end: float, pct: float) -> float:
    """Cosine from start (pct 0) to end (pct 1), with torch's arithmetic so values match."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def retrain(
    variant: str,
    cfg: ScheduleConfig,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    cycle_momentum: bool = True,
    momentum_range: tuple[float, float] = (0.85, 0.95),
) -> StageSchedule:
    """The schedule of an `epochs`-long retraining stage, derived from the original schedule
    `cfg` (peak `lr`) as the variant prescribes; momentum_range is (base, max) for clr."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown retraining variant {variant!r} (allowed: {', '.join(VARIANTS)})")
    if epochs < 1:
        raise ValueError(f"retraining epochs must be >= 1, got {epochs}")
    s = build(cfg, lr, steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    steps = epochs * steps_per_epoch
    last_lr = s(total - 1)
    if variant == "ft":
        return StageSchedule(lambda step: last_lr, None, steps)
    if variant in ("lrr", "wr"):
        if epochs > cfg.epochs:
            raise ValueError(
                f"retraining epochs ({epochs}) must not exceed schedule.epochs ({cfg.epochs}) "
                f"for {variant}, which replays S from epoch schedule.epochs - epochs"
            )
        offset = total - steps
        return StageSchedule(lambda step: s(offset + step), None, steps)
    peak = _peak(cfg, lr, steps_per_epoch, s)
    if variant == "slr":
        warm = round(0.1 * steps)

        def slr(step: int) -> float:
            if step < warm:
                return last_lr + (peak - last_lr) * step / warm
            return s((step - warm) * total // (steps - warm))

        return StageSchedule(slr, None, steps)
    lr_fn = _one_cycle(steps, 0.1, (peak / 100, peak, peak / 100 / 100))
    base, top = momentum_range
    momentum = _one_cycle(steps, 0.1, (top, base, top)) if cycle_momentum else None
    return StageSchedule(lr_fn, momentum, steps)
