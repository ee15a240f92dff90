"""Choosing what to resume, and refusing resumes that cannot continue the run: another recipe's
folder, a foreign checkpoint, a mid-stage change of the data split; a missing GPU."""

import concurrent.futures
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

import engine.checkpoint
from engine import checkpoint, distributed
from engine.errors import UserError
from engine.models import build_model
from engine.run import main
from tests.conftest import tiny_recipe


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)


def one_error_line(capsys) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_auto_resume_finds_only_this_recipes_runs(tmp_path):
    for name in ("tiny-20250101T000000Z", "tiny-b-20250102T000000Z", "tiny-old"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "last.pt").write_bytes(b"")
    assert checkpoint.find_resume(tmp_path, "tiny") == tmp_path / "tiny-20250101T000000Z"
    assert checkpoint.find_resume(tmp_path, "tiny-b") == tmp_path / "tiny-b-20250102T000000Z"
    assert checkpoint.new_run_dir(tmp_path, "t").name.startswith("t-20")


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    """Seeds launched together: each run makes its folder alone, the later one a second on."""
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        made = list(pool.map(lambda _: checkpoint.new_run_dir(tmp_path, "t"), range(3)))
    assert len(set(made)) == 3 and all(d.is_dir() for d in made)
    assert checkpoint.find_resume(tmp_path, "t") is None  # none has a last.pt yet


def test_auto_resume_of_a_run_killed_before_its_first_checkpoint_starts_afresh(
    tmp_path, demo_root, monkeypatch, capsys
):
    straight = tiny_recipe(tmp_path / "a" / "r.yaml", demo_root, schedule={"epochs": 1})
    assert main([str(straight)]) == 0

    recipe = tiny_recipe(tmp_path / "b" / "r.yaml", demo_root, schedule={"epochs": 1})
    run = tmp_path / "b" / "run"

    def killed(obj, path):
        raise RuntimeError("killed before the first checkpoint")

    with monkeypatch.context() as m:
        m.setattr(engine.checkpoint, "save", killed)
        with pytest.raises(RuntimeError, match="killed"):
            main([str(recipe)])
    assert rows(run) and not (run / "checkpoints" / "last.pt").exists()
    capsys.readouterr()
    assert main([str(recipe)]) == 2  # without resume=auto the folder is still protected
    assert "already holds a run; add run.resume=auto" in one_error_line(capsys)

    (run / "tensorboard").mkdir(exist_ok=True)
    (run / "tensorboard" / "events.stale").write_text("")  # the killed start's events
    assert main([str(recipe), "run.resume=auto"]) == 0
    assert not (run / "tensorboard" / "events.stale").exists()
    steps = [(r["kind"], r["step"]) for r in rows(run)]
    assert steps == [(r["kind"], r["step"]) for r in rows(tmp_path / "a" / "run")]
    for key, value in last(tmp_path / "a" / "run")["model"].items():
        assert torch.equal(value, last(run)["model"][key]), key


def test_resume_from_a_bare_state_dict_is_a_user_error(tmp_path, demo_root, capsys):
    bare = tmp_path / "x" / "y" / "bare.pt"
    bare.parent.mkdir(parents=True)
    torch.save(build_model("resnet20", 4).state_dict(), bare)
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root)
    assert main([str(recipe), f"run.resume={bare}"]) == 2
    line = one_error_line(capsys)
    assert "recipe key 'run.resume'" in line and str(bare) in line and "elapsed" in line
    # nothing was written where it would have resumed (run.dir = the checkpoint's grandparent)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y"]
    assert not (tmp_path / "run").exists()


def test_mid_stage_resume_refuses_another_batch_or_world_size(tmp_path, demo_root, capsys):
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root)
    run = tmp_path / "run"
    assert main([str(recipe), "run.stop_after_epochs=1"]) == 0
    assert not last(run)["stage_done"]
    capsys.readouterr()
    assert main([str(recipe), "run.resume=auto", "data.batch_size=8"]) == 2
    line = one_error_line(capsys)
    assert "recipe key 'run.resume'" in line and "data.batch_size 16 -> 8" in line

    ckpt = last(run)
    torch.save({**ckpt, "world_size": 2, "steps_per_epoch": 6}, run / "checkpoints" / "last.pt")
    assert main([str(recipe), "run.resume=auto"]) == 2
    line = one_error_line(capsys)
    assert "processes 2 -> 1" in line and "data.batch_size" not in line

    torch.save({**ckpt, "world_size": 1, "steps_per_epoch": 6}, run / "checkpoints" / "last.pt")
    assert main([str(recipe), "run.resume=auto"]) == 0
    assert [r["step"] for r in rows(run) if r["kind"] == "eval"] == [6, 12, 18]


def test_batch_size_may_change_between_stages(tmp_path, demo_root, capsys):
    stages = [{"train": {"epochs": 1}}, {"train": {"epochs": 1}}]
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, stages=stages)
    assert main([str(recipe), "run.stop_after_epochs=1"]) == 0
    assert last(tmp_path / "run")["stage_done"]
    assert main([str(recipe), "run.resume=auto", "data.batch_size=8"]) == 0
    assert "data.batch_size: 16 -> 8" in capsys.readouterr().out  # listed, not refused


def test_env_json_keeps_the_first_start_and_lists_resumes(tmp_path, demo_root, monkeypatch):
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root)
    for argv in (["first", "run.stop_after_epochs=1"], ["second", "run.resume=auto"]):
        monkeypatch.setattr(sys, "argv", ["engine.run", *argv])
        assert main([str(recipe), *argv[1:]]) == 0
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["argv"][1] == "first" and env["world_size"] == 1
    assert [e["argv"][1] for e in env["resumes"]] == ["second"]


def test_inside_a_stage_its_schedule_optimizer_and_seed_stay(tmp_path, demo_root, capsys):
    """A mid-stage resume refuses what the running stage's steps depend on (LR curve, update,
    data order), and records nothing; between stages the same change is listed, recorded in
    env.json, and config.yaml becomes the recipe that runs on."""
    stages = [{"train": {"epochs": 1}}, {"train": {"epochs": 2}}]
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, stages=stages)
    run = tmp_path / "run"
    assert main([str(recipe), "run.stop_after_epochs=2"]) == 0  # inside stage 1
    assert not last(run)["stage_done"]
    capsys.readouterr()
    for override, key in [("schedule.epochs=5", "schedule.epochs"), ("optim.lr=0.05", "optim.lr"),
                          ("seed=3", "seed")]:  # fmt: skip
        assert main([str(recipe), "run.resume=auto", override]) == 2
        assert f"recipe key '{key}': changed from" in one_error_line(capsys)
    assert "resumes" not in json.loads((run / "env.json").read_text())  # refused: not recorded

    between = tmp_path / "between"
    recipe = tiny_recipe(between / "r.yaml", demo_root, stages=stages)
    assert main([str(recipe), "run.stop_after_epochs=1"]) == 0  # at the end of stage 0
    assert last(between / "run")["stage_done"]
    assert main([str(recipe), "run.resume=auto", "optim.lr=0.05"]) == 0
    assert "optim.lr: 0.02 -> 0.05" in capsys.readouterr().out
    env = json.loads((between / "run" / "env.json").read_text())
    assert [e["changed"] for e in env["resumes"]] == [{"optim.lr": [0.02, 0.05]}]
    assert yaml.safe_load((between / "run" / "config.yaml").read_text())["optim"]["lr"] == 0.05


def test_unknown_arch_stops_before_the_run_folder(tmp_path, demo_root, capsys):
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root)
    assert main([str(recipe), "model.arch=resnet99"]) == 2
    assert "recipe key 'model.arch': unknown architecture 'resnet99'" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_is_a_user_error(tmp_path, demo_root, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root)
    assert main([str(recipe), "run.device=cuda"]) == 2
    assert "recipe key 'run.device': cuda, but torch sees no CUDA GPU" in one_error_line(capsys)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="'run.device': auto: local rank 1 needs a GPU of its own"):
        distributed.init("auto")


def test_cuda_rng_state_is_this_devices(monkeypatch):
    """The CUDA RNG state saved and restored is the process's own device's; older checkpoints'
    per-device lists restore the matching entry, or nothing when that device is not there."""
    states = {"current": torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: states["current"])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: states.update(current=s))
    saved = checkpoint.rng_state()
    assert torch.equal(saved["cuda"], torch.tensor([1], dtype=torch.uint8))
    states["current"] = torch.tensor([9], dtype=torch.uint8)
    checkpoint.set_rng_state(saved)
    assert int(states["current"]) == 1
    old = [torch.tensor([k], dtype=torch.uint8) for k in (5, 6)]
    checkpoint.set_rng_state({**saved, "cuda": old})
    assert int(states["current"]) == 6
    checkpoint.set_rng_state({**saved, "cuda": old[:1]})  # rank 1's device was not saved
    assert int(states["current"]) == 6


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    """A crash mid-write (a full disk) leaves half a line at the end: resuming drops it; a
    damaged line before the end is a user error, not a traceback."""
    from engine.logging import MetricsLog

    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    log.write("train", 0, 0.5, 2, loss=1.0)
    log.write("train", 0, 1.0, 4, loss=0.9)
    good = log.path.read_text()
    log.path.write_text(good + '{"kind": "train", "sta')
    log.truncate_after(0, 4)
    assert log.path.read_text() == good
    log.path.write_text('{"kind": "tr\n' + good)
    with pytest.raises(UserError, match="line 1 is not JSON"):
        log.truncate_after(0, 4)


def test_tensorboard_missing_is_found_before_any_work(tmp_path, demo_root, monkeypatch, capsys):
    """Every rank validates the recipe, so a missing tensorboard package stops all of them
    with one line before the run folder is made."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, log={"tensorboard": True})
    assert main([str(recipe)]) == 2
    assert "recipe key 'log.tensorboard'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stage_seconds_count_every_process_of_a_resumed_stage(tmp_path, demo_root):
    """A stage stopped and resumed reports the time of both processes, as the run does."""
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root)
    assert main([str(recipe), "run.stop_after_epochs=2"]) == 0
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert main([str(recipe), "run.resume=auto"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"][0]["seconds"] >= round(first["elapsed"] - first["stage_began"], 1)


def test_a_start_that_failed_at_once_may_run_again_in_its_folder(tmp_path, demo_root, capsys):
    """A load stage whose checkpoint does not fit fails after the run folder is made; the same
    command with the right checkpoint runs there (nothing had run), a batch larger than the
    data stops before any folder is made, and a folder where steps ran stays protected."""
    wrong, right = tmp_path / "wrong.pt", tmp_path / "right.pt"
    torch.save(build_model("resnet20", 10).state_dict(), wrong)
    torch.save(build_model("resnet20", 4).state_dict(), right)
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, stages=[{"load": {"checkpoint": "x"}}])
    assert main([str(recipe), f"stages.0.load.checkpoint={wrong}"]) == 2
    assert "weights do not fit" in one_error_line(capsys)
    assert main([str(recipe), f"stages.0.load.checkpoint={right}"]) == 0
    assert [r["kind"] for r in rows(tmp_path / "run")] == ["stage", "eval", "stage"]

    other = tmp_path / "other"
    assert main([str(recipe), f"run.dir={other}", f"stages.0.load.checkpoint={right}",
                 "data.batch_size=5000"]) == 2  # fmt: skip
    assert "recipe key 'data.batch_size'" in one_error_line(capsys)
    assert not other.exists()


def test_resuming_from_a_stage_checkpoint_is_refused(tmp_path, demo_root, capsys):
    """Resuming rewrites the run from its checkpoint on: a stage's checkpoint would silently
    throw away the stages after it, so run.resume takes a run folder or its last.pt only."""
    recipe = tiny_recipe(
        tmp_path / "r.yaml", demo_root, schedule={"epochs": 1},
        stages=[{"train": {}}, {"prune": {"method": "global_magnitude", "sparsity": 0.5}}],
    )  # fmt: skip
    assert main([str(recipe), "run.stop_after_epochs=1"]) == 0
    capsys.readouterr()
    stage0 = tmp_path / "run" / "checkpoints" / "stage0-train.pt"
    assert main([str(recipe), f"run.resume={stage0}"]) == 2
    line = one_error_line(capsys)
    assert "recipe key 'run.resume'" in line and "is not a last.pt" in line
