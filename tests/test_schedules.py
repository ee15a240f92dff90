"""LR schedules and retraining variants against hand-computed values and torch's OneCycleLR."""

import math

import pytest
import torch

from engine.config import ScheduleConfig
from engine.schedules import VARIANTS, StageSchedule, build, retrain

CIFAR = ScheduleConfig(kind="step", epochs=160, milestones=[80, 120], gamma=0.1)
SPE = 391


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-12, abs=1e-15)


def torch_one_cycle(max_lr, total, pct, div=100.0, final_div=100.0, momentum=(0.85, 0.95)):
    """LR and momentum per step from the real OneCycleLR stepping a dummy SGD optimizer."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lr,
        total_steps=total,
        pct_start=pct,
        div_factor=div,
        final_div_factor=final_div,
        anneal_strategy="cos",
        three_phase=False,
        base_momentum=momentum[0],
        max_momentum=momentum[1],
    )
    lrs, moms = [], []
    for step in range(total):
        if step:
            opt.step()
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
    return lrs, moms


def test_step_schedule():
    cfg = ScheduleConfig(kind="step", epochs=90, milestones=[30, 60, 80], gamma=0.1)
    s = build(cfg, 0.4, 10)
    expected = {0: 0.4, 299: 0.4, 300: 0.04, 599: 0.04, 600: 0.004, 800: 0.0004, 899: 0.0004}
    for step, value in expected.items():
        assert s(step) == approx(value), step
    assert s(10_000) == s(899)


@pytest.mark.parametrize(
    ("kind", "milestones", "start", "expected"),
    [
        ("step", [30], 0.0, {0: 0.0, 1: 0.02, 10: 0.2, 20: 0.4, 21: 0.4}),
        ("cosine", [], 0.0, {0: 0.0, 1: 0.02, 10: 0.2, 20: 0.4}),
        # The warm-up ends at the schedule's value there, here after a milestone at epoch 3.
        ("step", [3], 0.25, {0: 0.1, 1: 0.097, 10: 0.07, 20: 0.04}),
    ],
)
def test_warmup(kind, milestones, start, expected):
    cfg = ScheduleConfig(
        kind=kind, epochs=30, milestones=milestones, warmup_epochs=5, warmup_start=start
    )
    s = build(cfg, 0.4, 4)
    for step, value in expected.items():
        assert s(step) == approx(value), step


def test_fractional_warmup_rounds_to_steps():
    s = build(ScheduleConfig(kind="constant", epochs=10, warmup_epochs=0.5), 1.0, 3)
    assert [s(i) for i in range(4)] == [0.0, 0.5, 1.0, 1.0]


def test_cosine_closed_form():
    lr, ef = 0.1, 0.01
    s = build(ScheduleConfig(kind="cosine", epochs=10, end_factor=ef), lr, 10)
    for k in (0, 1, 25, 50, 75, 99):
        closed = lr * (ef + (1 - ef) * (1 + math.cos(math.pi * k / 100)) / 2)
        assert s(k) == approx(closed), k
    assert s(0) == approx(0.1)
    assert s(50) == approx(0.0505)
    # The curve reaches end_factor * lr at the end of training (step 100), so the last step
    # still trains; past the end S holds its last value.
    assert s(99) == pytest.approx(ef * lr, abs=3e-5)
    assert s(99) > ef * lr
    assert s(100) == s(5000) == s(99)


def test_cosine_after_warmup():
    s = build(ScheduleConfig(kind="cosine", epochs=10, warmup_epochs=2, end_factor=0.0), 0.1, 10)
    assert s(10) == approx(0.05)
    assert s(20) == approx(0.1)
    assert s(60) == approx(0.05)
    assert s(99) == approx(0.05 * (1 + math.cos(math.pi * 79 / 80)))


def test_linear_closed_form():
    s = build(ScheduleConfig(kind="linear", epochs=10, end_factor=0.1), 0.1, 10)
    for k, value in {0: 0.1, 50: 0.055, 90: 0.019, 99: 0.0109, 150: 0.0109}.items():
        assert s(k) == approx(value), k
    w = build(ScheduleConfig(kind="linear", epochs=10, warmup_epochs=2, end_factor=0.1), 0.1, 10)
    assert w(20) == approx(0.1)
    assert w(60) == approx(0.055)


def test_constant():
    s = build(ScheduleConfig(kind="constant", epochs=5), 0.3, 7)
    assert {s(k) for k in (0, 17, 34, 99)} == {0.3}


@pytest.mark.parametrize(
    ("epochs", "spe", "pct", "div", "final_div"),
    [
        (10, 10, 0.3, 25.0, 1e4),  # turn at step 29
        (37, 1, 0.25, 100.0, 100.0),  # fractional turn (8.25)
        (5, 3, 0.1, 10.0, 10.0),  # turn at 0.5
        (7, 1, 0.1, 100.0, 100.0),  # negative turn: no rising step at all
        (4, 5, 1.0, 100.0, 100.0),  # rises over the whole schedule
    ],
)
def test_onecycle_matches_torch(epochs, spe, pct, div, final_div):
    cfg = ScheduleConfig(
        kind="onecycle", epochs=epochs, pct_start=pct, div_factor=div, final_div_factor=final_div
    )
    s = build(cfg, 0.8, spe)
    lrs, _ = torch_one_cycle(0.8, epochs * spe, pct, div, final_div)
    assert [s(k) for k in range(len(lrs))] == [approx(v) for v in lrs]
    assert s(len(lrs) + 10) == s(len(lrs) - 1)


@pytest.mark.parametrize(
    ("epochs", "spe", "momentum"),
    [(12, 10, (0.85, 0.95)), (3, 7, (0.8, 0.9)), (1, 5, (0.85, 0.95)), (20, 1, (0.9, 0.99))],
)
def test_clr_matches_torch(epochs, spe, momentum):
    cfg = ScheduleConfig(kind="cosine", epochs=30, warmup_epochs=1, end_factor=0.0)
    sched = retrain("clr", cfg, 0.2, epochs, spe, momentum_range=momentum)
    lrs, moms = torch_one_cycle(0.2, epochs * spe, 0.1, momentum=momentum)
    assert sched.total_steps == epochs * spe
    assert [sched.lr(k) for k in range(len(lrs))] == [approx(v) for v in lrs]
    assert [sched.momentum(k) for k in range(len(moms))] == [approx(v) for v in moms]
    assert sched.lr(len(lrs) + 3) == sched.lr(len(lrs) - 1)


def test_clr_peak_is_peak_of_s_and_momentum_optional():
    sched = retrain("clr", CIFAR, 0.1, 30, 20, cycle_momentum=False)
    assert sched.momentum is None
    assert sched.lr(0) == approx(0.001)
    assert sched.lr(59) == approx(0.1)
    assert sched.lr(599) == approx(1e-5)


def test_clr_zero_length_rise_starts_at_peak():
    # 10 steps put OneCycleLR's turn at step 0, where torch itself divides by zero.
    sched = retrain("clr", CIFAR, 0.1, 1, 10)
    assert sched.lr(0) == approx(0.1)
    assert sched.lr(9) == approx(1e-5)
    assert sched.momentum(0) == approx(0.85)


def test_lrr_cifar():
    sched = retrain("lrr", CIFAR, 0.1, 72, SPE)
    assert sched == StageSchedule(sched.lr, None, 72 * SPE)
    for step in (0, 1, 10 * SPE, 32 * SPE - 1):
        assert sched.lr(step) == approx(0.01), step
    for step in (32 * SPE, 50 * SPE, 72 * SPE - 1, 72 * SPE + 5):
        assert sched.lr(step) == approx(0.001), step


def test_wr_equals_lrr():
    lrr = retrain("lrr", CIFAR, 0.1, 72, SPE)
    wr = retrain("wr", CIFAR, 0.1, 72, SPE)
    assert wr.momentum is None
    assert [wr.lr(k) for k in range(0, 72 * SPE, 7)] == [lrr.lr(k) for k in range(0, 72 * SPE, 7)]


def test_ft_is_last_lr():
    ft = retrain("ft", CIFAR, 0.1, 40, SPE)
    assert (ft.total_steps, ft.momentum) == (40 * SPE, None)
    assert [ft.lr(k) for k in (0, 1000, 40 * SPE - 1)] == [approx(0.001)] * 3
    cos = ScheduleConfig(kind="cosine", epochs=10, end_factor=0.05)
    ft = retrain("ft", cos, 0.1, 3, 10)
    assert ft.lr(0) == ft.lr(29) == build(cos, 0.1, 10)(99)
    assert ft.lr(0) == pytest.approx(0.005, abs=1e-4)


def test_slr_cifar():
    sched = retrain("slr", CIFAR, 0.1, 72, SPE)
    steps = 72 * SPE
    warm = round(0.1 * steps)
    assert warm == 2815
    assert sched.momentum is None
    assert sched.lr(0) == approx(0.001)
    assert sched.lr(1000) == approx(0.001 + 0.099 * 1000 / 2815)
    assert sched.lr(warm - 1) < 0.1
    assert sched.lr(warm) == approx(0.1)
    # S compressed onto the remaining 90%: each milestone lands at its proportional step.
    for milestone, lr in ((80, 0.01), (120, 0.001)):
        at = warm + math.ceil(milestone / 160 * (steps - warm))
        assert sched.lr(at - 1) == approx(lr * 10), milestone
        assert sched.lr(at) == approx(lr), milestone
    assert sched.lr(steps - 1) == approx(0.001)
    assert sched.lr(steps + 100) == approx(0.001)


def test_slr_with_warmed_up_schedule():
    cfg = ScheduleConfig(kind="cosine", epochs=10, warmup_epochs=2, end_factor=0.0)
    s = build(cfg, 0.5, 10)
    sched = retrain("slr", cfg, 0.5, 10, 10)
    last = s(99)
    assert sched.lr(0) == last
    assert sched.lr(5) == approx(last + (0.5 - last) / 2)
    # Then S compressed from its start, its own warm-up included: S(0) at step 10, and the end
    # of S's warm-up (step 20 of 100) at step 10 + 20% of 90.
    assert sched.lr(10) == s(0) == 0.0
    assert sched.lr(28) == approx(0.5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_has_its_length(variant):
    sched = retrain(variant, CIFAR, 0.1, 7, 13)
    assert sched.total_steps == 91
    assert all(sched.lr(k) > 0 for k in range(91))


def test_errors():
    with pytest.raises(ValueError, match="unknown retraining variant 'lr'.*ft, lrr, wr, slr, clr"):
        retrain("lr", CIFAR, 0.1, 10, SPE)
    with pytest.raises(ValueError, match="unknown schedule kind 'exp'.*step, cosine"):
        build(ScheduleConfig(kind="exp"), 0.1, SPE)
    for variant in ("lrr", "wr"):
        with pytest.raises(ValueError, match=r"retraining epochs \(161\).*schedule.epochs"):
            retrain(variant, CIFAR, 0.1, 161, SPE)
    assert retrain("lrr", CIFAR, 0.1, 160, SPE).lr(0) == approx(0.1)
    assert retrain("slr", CIFAR, 0.1, 200, SPE).total_steps == 200 * SPE
    with pytest.raises(ValueError, match="warmup_epochs"):
        build(ScheduleConfig(kind="onecycle", warmup_epochs=1), 0.1, SPE)
    with pytest.raises(ValueError, match="retraining epochs must be >= 1"):
        retrain("ft", CIFAR, 0.1, 0, SPE)
