"""Stops at awkward moments (an epoch's last step, a stage's last step) keep the epoch's work,
and the optimizer survives a skipped first step and a checkpoint from another implementation."""

import json
import signal
from pathlib import Path

import pytest
import torch

import engine.preemption
import engine.run
import engine.train
from engine import optim
from engine.config import OptimConfig
from engine.preemption import StopRequest
from engine.run import main
from tests.conftest import tiny_recipe


class _Stop(StopRequest):
    """A StopRequest that installs no handler (pytest keeps its own) and is set by the step."""

    latest: "_Stop | None" = None

    def install(self) -> None:
        _Stop.latest = self


def stop_after(monkeypatch, steps: int) -> None:
    """Make the run see a SIGTERM right after its `steps`-th training step."""
    monkeypatch.setattr(engine.run, "StopRequest", _Stop)
    real = engine.train.make_step
    calls = [0]

    def make_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def counted(images, labels):
            calls[0] += 1
            if calls[0] == steps:
                _Stop.latest.signal = signal.SIGTERM
            return step(images, labels)

        return counted

    monkeypatch.setattr(engine.train, "make_step", make_step)


def lines(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["stage"], r["step"]) for r in rows]


STAGES = [
    {"train": {"rewind_epochs": [1]}},
    {"prune": {"method": "global_magnitude", "sparsity": 0.5}},
    {"retrain": {"variant": "wr", "epochs": 2}},
]


@pytest.mark.parametrize("at", [6, 18], ids=["epoch-end", "stage-end"])
def test_stop_at_an_epoch_end_keeps_the_epoch_and_resumes_whole(
    tmp_path, demo_root, monkeypatch, at
):
    """6 steps per epoch, 3 epochs of dense training: a stop after step 6 still evaluates epoch
    1 and saves its rewind point; one after step 18 ends the stage first. Resuming gives the
    weights and metric lines of a run never stopped."""
    straight = tiny_recipe(tmp_path / "a" / "r.yaml", demo_root, stages=STAGES)
    assert main([str(straight)]) == 0

    parts = tiny_recipe(tmp_path / "b" / "r.yaml", demo_root, stages=STAGES)
    with monkeypatch.context() as m:
        stop_after(m, at)
        assert main([str(parts)]) == 128 + signal.SIGTERM
    run = tmp_path / "b" / "run"
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert (stopped["stage"], stopped["step"], stopped["stage_done"]) == (0, at, at == 18)
    assert (run / "checkpoints" / "rewind-epoch1.pt").is_file()
    assert ("eval", 0, at) in lines(run)
    assert (run / "checkpoints" / "stage0-train.pt").is_file() == (at == 18)

    assert main([str(parts), "run.resume=auto"]) == 0
    assert lines(run) == lines(tmp_path / "a" / "run")
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.pt", weights_only=False)
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, final["model"][key]), key


def test_a_repeated_signal_soon_after_counts_once(monkeypatch):
    """Under torchrun a stop often arrives twice (the shell's and the agent's): within the
    window the second is the same request; otherwise, or later, it exits at once."""
    exits = []
    monkeypatch.setattr(engine.preemption.os, "_exit", exits.append)
    patient = StopRequest(same_within_s=60)
    patient._handle(signal.SIGINT, None)
    patient._handle(signal.SIGTERM, None)
    assert patient.signal == signal.SIGINT and exits == []
    eager = StopRequest(same_within_s=0)
    eager._handle(signal.SIGTERM, None)
    eager._handle(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert StopRequest().same_within_s > 0
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert StopRequest().same_within_s == 0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def _grads(model: torch.nn.Module, scale: float = 1.0) -> None:
    for k, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, scale * (k + 1))


def test_fused_sgd_survives_a_skipped_first_step():
    """torch's fused SGD makes momentum buffers with empty_like at its first step and keeps
    them when found_inf skips it; the engine gives zero buffers up front, so a skipped first
    step then a good one equals one good step."""
    results = []
    for skip_first in (False, True):
        model = _model()
        opt = optim.with_momentum_buffers(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        )
        for found in ([1.0], [0.0]) if skip_first else ([0.0],):
            _grads(model)
            opt.grad_scale, opt.found_inf = None, torch.tensor(found)
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        assert all(torch.isfinite(opt.state[p]["momentum_buffer"]).all() for p in opt.state)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_optimizer_state_keeps_this_optimizers_implementation():
    """A state dict saved by a fused optimizer loads into a foreach one (and vice versa)
    without its flags: the loaded optimizer steps as it was built to."""
    fused_model, model = _model(), _model()
    fused = torch.optim.SGD(fused_model.parameters(), lr=0.1, momentum=0.9, fused=True)
    _grads(fused_model)
    fused.step()
    opt = optim.build(model, OptimConfig(lr=0.1, momentum=0.9))  # CPU: foreach
    optim.load_state(opt, fused.state_dict())
    assert all(g["foreach"] and not g["fused"] for g in opt.param_groups)
    _grads(model)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_a_mid_epoch_resume_with_other_workers_equals_straight(tmp_path, demo_root, monkeypatch):
    """Stopped mid-epoch and resumed with another data.workers: the resumed epoch starts at its
    next batch, without reading the finished ones, and the run ends as one never stopped."""
    straight = tiny_recipe(tmp_path / "a" / "r.yaml", demo_root)
    assert main([str(straight)]) == 0
    parts = tiny_recipe(tmp_path / "b" / "r.yaml", demo_root)
    with monkeypatch.context() as m:
        stop_after(m, 8)  # 6 steps per epoch: inside epoch 2
        assert main([str(parts)]) == 128 + signal.SIGTERM
    assert main([str(parts), "run.resume=auto", "data.workers=2"]) == 0
    run = tmp_path / "b" / "run"
    assert lines(run) == lines(tmp_path / "a" / "run")
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.pt", weights_only=False)
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, final["model"][key]), key
