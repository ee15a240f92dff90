"""Fault injection: signals, killed ranks, broken checkpoints, full disks, NaNs, edited recipes.
Every test asserts what was kept: steps, weights, masks, metrics without duplicates or gaps."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import engine.checkpoint
import engine.train
from engine.run import main
from tests.conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    for key, value in a.items():
        same = torch.equal(value, b[key]) if exact else torch.allclose(value, b[key], atol=1e-6)
        assert same, key


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until metrics.jsonl has a train line at `step` or later."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and any(r["kind"] == "train" and r["step"] >= step for r in rows(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no train line at step {step} within {timeout} s")


def test_sigterm_mid_epoch_then_resume_equals_straight(tmp_path, demo_root):
    """The SIGTERM goes to the whole process group, loader workers included, as torchrun,
    `timeout` and Slurm send it: the workers leave the stop to the main process."""
    common = {"data": {"steps_per_epoch": 0, "workers": 2}, "schedule": {"epochs": 2}}
    straight = tiny_recipe(tmp_path / "a" / "r.yaml", demo_root, **common)
    assert main([str(straight)]) == 0

    parts = tiny_recipe(tmp_path / "b" / "r.yaml", demo_root, **common)
    run = tmp_path / "b" / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.run", str(parts)], start_new_session=True,
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_step(run, 8, proc)  # 30 steps per epoch: mid-epoch 1
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "last.pt saved" in err and "run.resume=auto" in err
    assert err.count("SIGTERM: finishing this step") == 1, err
    assert "stopped at stage 0 step" in err
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert 8 <= stopped["step"] < 60 and not stopped["stage_done"]

    assert main([str(parts), "run.resume=auto"]) == 0
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(run))
    steps = [(r["kind"], r["step"]) for r in rows(run) if r["kind"] != "stage"]
    assert steps == [(r["kind"], r["step"]) for r in rows(tmp_path / "a" / "run")
                     if r["kind"] != "stage"]  # fmt: skip


def worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_elastic_restart_after_a_rank_is_killed(tmp_path, demo_root):
    common = {
        "model": {"arch": "convnet_tiny", "num_classes": 4},
        "data": {"augment": False, "steps_per_epoch": 8},
        "schedule": {"kind": "step", "epochs": 3, "milestones": [2]},
        "log": {"every_steps": 1, "progress": False},
        "checkpoint": {"every_steps": 2},
    }
    one = tiny_recipe(tmp_path / "one.yaml", demo_root, **common, run={"dir": str(tmp_path / "1")})
    assert main([str(one), "data.batch_size=16"]) == 0

    two = tiny_recipe(tmp_path / "two.yaml", demo_root, **common, run={"dir": str(tmp_path / "2")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", "-m", "engine.run", str(two), "data.batch_size=8"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_step(tmp_path / "2", random.randint(3, 14), proc)
    victims = worker_pids(proc.pid)
    assert len(victims) == 2
    os.kill(random.choice(victims), signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]

    lines = rows(tmp_path / "2")
    train_steps = [r["step"] for r in lines if r["kind"] == "train"]
    assert train_steps == list(range(1, 25))  # every step once: nothing lost, nothing twice
    assert json.loads((tmp_path / "2" / "summary.json").read_text())["stages"][0]["epochs"] == 3
    assert_same_weights(weights(tmp_path / "1"), weights(tmp_path / "2"), exact=False)


def test_truncated_and_garbage_checkpoints_are_user_errors(tmp_path, demo_root, capsys):
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, schedule={"epochs": 1})
    assert main([str(recipe)]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    data = last.read_bytes()
    for name, blob in (("truncated.pt", data[: len(data) // 2]), ("garbage.pt", os.urandom(999))):
        bad = tmp_path / name
        bad.write_bytes(blob)
        capsys.readouterr()
        assert main([str(recipe), f"run.resume={bad}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "not a readable checkpoint" in err[0]
        load = tiny_recipe(
            tmp_path / "l.yaml", demo_root, run={"dir": str(tmp_path / name)},
            stages=[{"load": {"checkpoint": str(bad)}}],
        )  # fmt: skip
        assert main([str(load)]) == 2


def test_full_disk_during_a_save_keeps_the_old_checkpoint(tmp_path, demo_root, monkeypatch, capsys):
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root)
    real_save = torch.save
    saves = []

    def failing_save(obj, f, *args, **kwargs):  # the second save finds the disk full
        saves.append(1)
        if len(saves) == 2:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(engine.checkpoint.torch, "save", failing_save)
    assert main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write checkpoint {tmp_path}/run/checkpoints/last.pt "
                   "(No space left on device); the previous one is intact"]  # fmt: skip
    kept = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert kept["step"] == 6  # epoch 2's save failed; epoch 1's is whole
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))


def test_tiny_filesystem_fills_up(tmp_path, demo_root, capsys):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, run={"dir": str(mount / "run")})
        assert main([str(recipe)]) == 2  # ResNet-20 checkpoints are ~1 MB each
        assert "is the disk full?" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def nan_loss(bad_calls: set[int]):
    """A stand-in for torch.nn.functional whose cross_entropy returns NaN on chosen calls."""
    calls = []

    def cross_entropy(*args, **kwargs):
        calls.append(1)
        loss = F.cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) in bad_calls else loss

    return SimpleNamespace(cross_entropy=cross_entropy)


def test_nan_steps_are_skipped_and_counted(tmp_path, demo_root, monkeypatch):
    monkeypatch.setattr(engine.train, "F", nan_loss({3, 4, 5}))
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, log={"every_steps": 2})
    assert main([str(recipe)]) == 0
    train = [r for r in rows(tmp_path / "run") if r["kind"] == "train"]
    assert [r["skipped"] for r in train][:4] == [0, 2, 3, 3]
    # skipped steps do not poison the mean; a window of skipped steps has no loss
    assert [r["loss"] is None for r in train][:4] == [False, True, False, False]
    assert all(r["loss"] is None or r["loss"] > 0 for r in train)
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())


def test_nan_streak_stops_with_the_last_good_state(tmp_path, demo_root, monkeypatch, capsys):
    monkeypatch.setattr(engine.train, "F", nan_loss(set(range(5, 100))))  # steps 5.. are NaN
    saved = {}
    real = engine.checkpoint.save
    monkeypatch.setattr(engine.checkpoint, "save", lambda obj, p: (saved.update(
        {obj["step"]: {k: v.clone() for k, v in obj["model"].items()}}), real(obj, p)))  # fmt: skip
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, log={"every_steps": 2},
                         run={"max_skipped_steps": 4}, checkpoint={"every_steps": 4})  # fmt: skip
    assert main([str(recipe)]) == 3
    assert "4 steps in a row had a non-finite loss" in capsys.readouterr().err
    stopped = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert stopped["step"] == 8 and sorted(saved) == [4, 6, 8]
    assert_same_weights(saved[4], stopped["model"])  # nothing applied after the last good step


def test_unwritable_run_folder(tmp_path, demo_root, capsys):
    (tmp_path / "file").write_text("")
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, run={"dir": str(tmp_path / "file" / "x")})
    assert main([str(recipe)]) == 2
    assert "recipe key 'run.dir': cannot write to" in capsys.readouterr().err


def test_resume_refuses_model_changes_and_lists_others(tmp_path, demo_root, capsys):
    stages = [{"train": {}}, {"prune": {"method": "global_magnitude", "sparsity": 0.5}},
              {"retrain": {"variant": "ft", "epochs": 2}}]  # fmt: skip
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, stages=stages)
    assert main([str(recipe), "run.stop_after_epochs=4"]) == 0  # inside the retrain stage
    masks = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["masks"]
    capsys.readouterr()
    for override, key in [("model.zero_init_residual=true", "model.zero_init_residual"),
                          ("stages.1.prune.sparsity=0.7", "stages.1.prune.sparsity")]:  # fmt: skip
        assert main([str(recipe), "run.resume=auto", override]) == 2
        assert f"recipe key '{key}': changed from" in capsys.readouterr().err
    assert main([str(recipe), "run.resume=auto", "log.every_steps=3"]) == 0
    assert "log.every_steps: 4 -> 3" in capsys.readouterr().out
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.equal(masks[k], final["masks"][k]) for k in masks)  # masks unchanged


def test_deterministic_runs_are_bitwise_repeatable(tmp_path, demo_root):
    for name in ("a", "b"):
        recipe = tiny_recipe(tmp_path / name / "r.yaml", demo_root, data={"workers": 2},
                             run={"deterministic": True})  # fmt: skip
        assert main([str(recipe)]) == 0
    torch.use_deterministic_algorithms(False)
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run"))


def test_checkpoint_every_steps(tmp_path, demo_root, monkeypatch):
    saved = []
    real = engine.checkpoint.save
    monkeypatch.setattr(engine.checkpoint, "save", lambda obj, p: (saved.append(
        (p.name, obj["step"])), real(obj, p)))  # fmt: skip
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, checkpoint={"every_steps": 4})
    assert main([str(recipe)]) == 0
    assert [s for name, s in saved if name == "last.pt"] == [4, 6, 8, 12, 16, 18]
