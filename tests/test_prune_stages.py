"""Prune and retrain stages end to end, and the masked optimizer they train with."""

import json

import pytest
import torch

from engine import config, load_model, optim, schedules
from engine.config import OptimConfig
from engine.run import main
from tests.conftest import tiny_recipe

TRAIN_PRUNE_RETRAIN = [
    {"train": {}},
    {"prune": {"method": "global_magnitude", "sparsity": 0.8}},
    {"retrain": {"variant": "lrr", "epochs": 1}},
]


def rows(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_masked_sgd_keeps_pruned_entries_exactly_zero():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4)
    )
    model(torch.randn(2, 3, 8, 8))
    mask = torch.rand_like(model[0].weight) > 0.7
    with torch.no_grad():
        model[0].weight.mul_(mask)
    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt = optim.build(model, cfg, {"0.weight": mask})
    for _ in range(50):
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = model[0].weight
    assert torch.count_nonzero(w[~mask]) == 0
    assert torch.count_nonzero(opt.state[w]["momentum_buffer"][~mask]) == 0
    assert torch.count_nonzero(w[mask]) == mask.sum()


def test_masked_sgd_with_all_ones_equals_torch_sgd():
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 4)
    b = torch.nn.Linear(16, 4)
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-3)
    masked = optim.build(a, cfg, {"weight": torch.ones_like(a.weight, dtype=torch.bool)})
    plain = optim.build(b, cfg)
    assert type(masked).__name__ == "MaskedSGD" and type(plain) is torch.optim.SGD
    for _ in range(5):
        x = torch.randn(8, 16)
        for model, opt in ((a, masked), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert masked.state_dict()["state"].keys() == plain.state_dict()["state"].keys()


def test_train_prune_retrain(tmp_path, demo_root):
    recipe = tiny_recipe(
        tmp_path / "r.yaml", demo_root, schedule={"epochs": 2}, stages=TRAIN_PRUNE_RETRAIN
    )
    assert main([str(recipe)]) == 0
    run = tmp_path / "run"
    (line,) = rows(run, "prune")
    assert abs(line["sparsity"] - 0.8) < 1e-4
    assert 0 < line["flops_effective"] < line["flops"]
    assert line["params"] < sum(
        p.numel() for p in load_model(run / "checkpoints" / "stage0-train.pt").parameters()
    )
    assert {"layer1.0.conv1.weight", "conv1.weight"} <= {name for name, _, _ in line["layers"]}

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    model = load_model(run / "checkpoints" / "last.pt")
    params = dict(model.named_parameters())
    for name, mask in ckpt["masks"].items():
        assert torch.count_nonzero(params[name][~mask]) == 0, name
    kept = sum(int(m.sum()) for m in ckpt["masks"].values())
    total = sum(m.numel() for m in ckpt["masks"].values())
    assert kept == total - round(0.8 * total)
    summary = json.loads((run / "summary.json").read_text())
    assert [s["kind"] for s in summary["stages"]] == ["train", "prune", "retrain"]
    assert summary["stages"][2]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    # lrr replays the last epoch of the original schedule (2 epochs of 6 steps)
    original = schedules.build(config.load(recipe).schedule, 0.02, 6)
    retrain = [r for r in rows(run, "train") if r["stage"] == 2]
    assert retrain and all(r["lr"] == original(6 + r["step"] - 1) for r in retrain)


def test_structured_pruning_rebuilds_at_reduced_width(tmp_path, demo_root):
    """40% of filters removed, kept counts rounded to multiples of 8: 16/32/64 -> 9/19/38 ->
    8/16/40."""
    stages = [
        {"train": {"epochs": 1}},
        {"prune": {"method": "l1_filter", "fraction": 0.4, "round_to": 8}},
        {"retrain": {"variant": "clr", "epochs": 1}},
    ]
    recipe = tiny_recipe(
        tmp_path / "r.yaml",
        demo_root,
        schedule={"epochs": 2},
        stages=stages,
        log={"every_steps": 1},
        data={"steps_per_epoch": 20},
    )
    assert main([str(recipe)]) == 0
    dense = load_model(tmp_path / "run" / "checkpoints" / "stage0-train.pt")
    pruned = load_model(tmp_path / "run" / "checkpoints" / "stage2-retrain.pt")
    assert pruned.layer1[0].conv1.out_channels == 8 and pruned.layer1[0].conv2.in_channels == 8
    assert pruned.layer1[0].conv2.out_channels == 16  # the residual stream keeps its width
    assert pruned.layer2[1].conv1.out_channels == 16 and pruned.layer3[2].conv1.out_channels == 40
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    # clr: one-cycle momentum is applied per step; the LR rises then falls
    lrs = [r["lr"] for r in rows(tmp_path / "run", "train") if r["stage"] == 2]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)


def test_iterative_levels_expand_into_cycles(tmp_path, demo_root):
    stages = [
        {"train": {"epochs": 1}},
        {"prune": {"method": "random", "sparsity": [0.5, 0.8], "scope": "layer"}},
        {"retrain": {"variant": "ft", "epochs": 1}},
    ]
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, schedule={"epochs": 2}, stages=stages)
    r = config.load(recipe)
    assert [s.kind for s in r.stages] == ["train", "prune", "retrain", "prune", "retrain"]
    assert main([str(recipe), "data.steps_per_epoch=3"]) == 0
    assert [round(x["sparsity"], 3) for x in rows(tmp_path / "run", "prune")] == [0.5, 0.8]


def test_weight_rewinding_needs_its_rewind_point(tmp_path, demo_root, capsys):
    stages = [
        {"train": {"rewind_epochs": [1]}},
        {"prune": {"method": "global_magnitude", "sparsity": 0.5}},
        {"retrain": {"variant": "wr", "epochs": 1}},
    ]
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, schedule={"epochs": 2}, stages=stages)
    assert main([str(recipe), "data.steps_per_epoch=3"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "rewind-epoch1.pt").is_file()

    capsys.readouterr()
    assert main([str(recipe), "stages.0.train.rewind_epochs=[0]"]) == 2
    err = capsys.readouterr().err
    assert "wr needs the weights of epoch 1" in err and "rewind_epochs: [1]" in err


def test_resume_inside_a_retrain_stage_continues_its_schedule(tmp_path, demo_root):
    stages = TRAIN_PRUNE_RETRAIN[:2] + [{"retrain": {"variant": "clr", "epochs": 2}}]
    common = {"schedule": {"epochs": 2}, "stages": stages, "data": {"steps_per_epoch": 4}}
    straight = tiny_recipe(tmp_path / "a" / "r.yaml", demo_root, **common)
    assert main([str(straight)]) == 0
    parts = tiny_recipe(tmp_path / "b" / "r.yaml", demo_root, **common)
    assert main([str(parts), "run.stop_after_epochs=3"]) == 0  # 2 dense + 1 retrain epoch
    assert main([str(parts), "run.resume=auto"]) == 0
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lr_a = [r["lr"] for r in rows(tmp_path / "a" / "run", "train")]
    lr_b = [r["lr"] for r in rows(tmp_path / "b" / "run", "train")]
    assert lr_a == lr_b


def test_a_load_stage_keeps_pruned_widths_and_masks(tmp_path, demo_root):
    structured = [
        {"train": {"epochs": 1}},
        {"prune": {"method": "l1_filter", "fraction": 0.5}},
    ]
    first = tiny_recipe(tmp_path / "a.yaml", demo_root, schedule={"epochs": 2}, stages=structured)
    assert main([str(first), "run.dir=" + str(tmp_path / "a")]) == 0
    unstructured = structured[:1] + [{"prune": {"method": "global_magnitude", "sparsity": 0.7}}]
    second = tiny_recipe(
        tmp_path / "b.yaml", demo_root, schedule={"epochs": 2}, stages=unstructured
    )
    assert main([str(second), "run.dir=" + str(tmp_path / "b")]) == 0

    for name in ("a", "b"):
        again = tiny_recipe(
            tmp_path / f"{name}2.yaml",
            demo_root,
            schedule={"epochs": 2},
            run={"dir": str(tmp_path / f"{name}2")},
            stages=[
                {"load": {"checkpoint": str(tmp_path / name / "checkpoints" / "last.pt")}},
                {"retrain": {"variant": "ft", "epochs": 1}},
            ],
        )
        assert main([str(again)]) == 0
    widths = load_model(tmp_path / "a2" / "checkpoints" / "last.pt")
    assert widths.layer1[0].conv1.out_channels == 8
    kept = torch.load(tmp_path / "b2" / "checkpoints" / "last.pt", weights_only=False)
    before = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["masks"]
    assert all(torch.equal(before[k], kept["masks"][k]) for k in before)
    for name, mask in kept["masks"].items():
        assert torch.count_nonzero(kept["model"][name][~mask]) == 0, name


def test_pruning_what_a_loaded_checkpoint_cannot_take_is_a_user_error(tmp_path, demo_root, capsys):
    """Masks loaded with a checkpoint stop a lower sparsity and filter pruning (one line, exit
    2, no traceback); wr after filter pruning is refused before any work even with a rewind
    file; a rewind file of another shape is a user error too."""
    masked = [{"train": {"epochs": 1}}, {"prune": {"method": "global_magnitude", "sparsity": 0.8}}]
    first = tiny_recipe(tmp_path / "a.yaml", demo_root, schedule={"epochs": 2}, stages=masked)
    assert main([str(first), "run.dir=" + str(tmp_path / "a")]) == 0
    last = str(tmp_path / "a" / "checkpoints" / "last.pt")
    capsys.readouterr()
    for n, (prune, says) in enumerate(
        [
            ({"method": "global_magnitude", "sparsity": 0.5}, "below the existing 0.8000"),
            ({"method": "l1_filter", "fraction": 0.5}, "holds unstructured masks"),
        ]
    ):
        stages = [{"load": {"checkpoint": last}}, {"prune": prune}]
        again = tiny_recipe(tmp_path / f"b{n}.yaml", demo_root, stages=stages)
        assert main([str(again), f"run.dir={tmp_path / f'b{n}'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: recipe key 'stages.1.prune'") and says in err, err
        assert len(err.strip().splitlines()) == 1

    wr = [
        {"train": {"epochs": 1}},
        {"prune": {"method": "l1_filter", "fraction": 0.5}},
        {"retrain": {"variant": "wr", "epochs": 1, "rewind_checkpoint": last}},
    ]
    recipe = tiny_recipe(tmp_path / "c.yaml", demo_root, schedule={"epochs": 2}, stages=wr)
    assert main([str(recipe), f"run.dir={tmp_path / 'c'}"]) == 2
    assert "wr supports unstructured pruning only" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()

    other = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    wr = masked + [{"retrain": {"variant": "wr", "epochs": 1, "rewind_checkpoint": str(other)}}]
    recipe = tiny_recipe(tmp_path / "d.yaml", demo_root, schedule={"epochs": 2}, stages=wr)
    assert main([str(recipe), f"run.dir={tmp_path / 'd'}"]) == 2
    assert "the rewind weights" in capsys.readouterr().err
