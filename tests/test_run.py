"""End-to-end runs on the CPU: learning, the metrics contract, checkpoints, resume, load."""

import json
from pathlib import Path

import pytest
import torch
import torchvision

from engine import checkpoint, load_model
from engine.errors import UserError
from engine.models import build_model
from engine.run import main
from tests.conftest import tiny_recipe


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trains_above_chance_and_writes_the_run_folder(tmp_path, demo_root, capsys):
    recipe = tiny_recipe(
        tmp_path / "r.yaml", demo_root, data={"steps_per_epoch": 0}, schedule={"epochs": 4}
    )
    assert main([str(recipe)]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "run folder: " + str(run) in out and "top1 %" in out

    summary = json.loads((run / "summary.json").read_text())
    top1 = summary["stages"][0]["top1"]
    assert top1 > 40.0, f"4 classes, chance is 25%, got {top1}"
    dense = sum(p.numel() for p in build_model("resnet20", 4).parameters())
    assert summary["stages"][0]["params"] == dense and f"{dense:,}" in out  # closing table
    assert (run / "config.yaml").is_file()
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "stage0-train.pt"}
    for ckpt in (run / "checkpoints").iterdir():  # plain torch.load: weights_only=True
        assert {"model", "masks", "arch", "optimizer", "rng"} <= torch.load(ckpt).keys()

    lines = rows(run)
    for row in lines:
        assert {"kind", "stage", "epoch", "step", "time"} <= row.keys()
        assert isinstance(row["step"], int) and isinstance(row["epoch"], float)
    kinds = [r["kind"] for r in lines]
    assert kinds[0] == "stage" and kinds[-1] == "stage"
    train = [r for r in lines if r["kind"] == "train"]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(4, 121, 4))  # 30 steps/epoch
    for r in train:
        assert r["lr"] > 0 and r["loss"] > 0 and r["img_per_s"] > 0
    assert [r["step"] for r in evals] == [30, 60, 90, 120]
    for r in evals:
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["loss"] > 0
    assert evals[-1]["top1"] == top1


def test_resume_equals_straight_through(tmp_path, demo_root):
    straight = tiny_recipe(tmp_path / "a" / "r.yaml", demo_root, data={"workers": 2})
    assert main([str(straight)]) == 0
    parts = tiny_recipe(tmp_path / "b" / "r.yaml", demo_root, data={"workers": 2})
    assert main([str(parts), "run.stop_after_epochs=1"]) == 0
    assert not (tmp_path / "b" / "run" / "summary.json").exists()
    assert main([str(parts), "run.stop_after_epochs=1", "run.resume=auto"]) == 0
    assert not (tmp_path / "b" / "run" / "summary.json").exists()
    assert main([str(parts), "run.resume=auto"]) == 0

    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # the log of the interrupted run has the same steps as the straight one, none twice
    steps_a = [(r["kind"], r["step"]) for r in rows(tmp_path / "a" / "run")]
    steps_b = [(r["kind"], r["step"]) for r in rows(tmp_path / "b" / "run")]
    assert steps_a == steps_b


def test_load_model_round_trip_and_load_stage(tmp_path, demo_root):
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, schedule={"epochs": 1})
    assert main([str(recipe)]) == 0
    path = tmp_path / "run" / "checkpoints" / "stage0-train.pt"
    model = load_model(path)
    assert not model.training
    saved = torch.load(path, weights_only=False)
    assert saved["arch"]["name"] == "resnet20"
    contract = {"model", "masks", "arch", "optimizer", "stage", "epoch", "step", "config", "rng"}
    assert contract <= saved.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][key])

    # a load stage takes the bare state dict too, and evaluation gives the same accuracy
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    again = tiny_recipe(
        tmp_path / "again.yaml",
        demo_root,
        schedule={"epochs": 1},
        run={"dir": str(tmp_path / "run2")},
        stages=[{"load": {"checkpoint": str(bare)}}],
    )
    assert main([str(again)]) == 0
    loaded = load_model(tmp_path / "run2" / "checkpoints" / "stage0-load.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"][0]["top1"]
    load = json.loads((tmp_path / "run2" / "summary.json").read_text())["stages"][0]
    assert load["top1"] == trained  # the loaded weights evaluated: the closing table shows it


def test_load_stage_rejects_another_architecture(tmp_path, demo_root, capsys):
    bare = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), bare)
    recipe = tiny_recipe(
        tmp_path / "r.yaml", demo_root, stages=[{"load": {"checkpoint": str(bare)}}]
    )
    assert main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages.0.load.checkpoint" in err[0] and "resnet20" in err[0]


def test_garbage_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoint.read(bad)


def test_tensorboard_events(tmp_path, demo_root):
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, schedule={"epochs": 1},
                         log={"tensorboard": True})  # fmt: skip
    assert main([str(recipe)]) == 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
