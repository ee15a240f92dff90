"""Data parallelism on the CPU: torchrun with 2 gloo processes equals one process with the same
global batch (a BN-free model, so per-rank batch statistics play no part), and DDP takes the
recipe's bucket size."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from engine import train
from engine.config import DDPConfig, PrecisionConfig
from engine.distributed import Dist
from engine.run import main
from tests.conftest import tiny_recipe


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, demo_root):
    common = {
        "model": {"arch": "convnet_tiny", "num_classes": 4},
        "data": {"augment": False, "steps_per_epoch": 4},
        "schedule": {"kind": "step", "epochs": 2, "milestones": [1]},
        "log": {"every_steps": 2, "progress": False},
        "stages": [  # random masks must come out identical on both ranks (checked in the run)
            {"train": {}},
            {"prune": {"method": "random", "sparsity": 0.5, "scope": "layer"}},
            {"retrain": {"variant": "lrr", "epochs": 1}},
        ],
    }
    one = tiny_recipe(
        tmp_path / "one.yaml", demo_root, **common, run={"dir": str(tmp_path / "one")}
    )
    assert main([str(one), "data.batch_size=16"]) == 0

    two = tiny_recipe(
        tmp_path / "two.yaml", demo_root, **common, run={"dir": str(tmp_path / "two")}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 2 KiB gradient buckets: several all-reduces per step, which must not change the result.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "engine.run", str(two), "data.batch_size=8", "ddp.bucket_mb=0.002"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    masks_a = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=False)["masks"]
    masks_b = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=False)["masks"]
    assert masks_a.keys() == masks_b.keys()
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)

    env_json = json.loads((tmp_path / "two" / "env.json").read_text())
    assert env_json["world_size"] == 2
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    steps = [(r["stage"], r["step"]) for r in train]
    assert steps == [(0, 2), (0, 4), (0, 6), (0, 8), (2, 2), (2, 4)]  # rank 0 alone writes
    one_lines = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    one_evals = [json.loads(x) for x in one_lines if '"eval"' in x]
    two_evals = [r for r in lines if r["kind"] == "eval"]
    for x, y in zip(one_evals, two_evals, strict=True):  # accuracy over all ranks, each image once
        assert abs(x["top1"] - y["top1"]) < 1e-6 and abs(x["loss"] - y["loss"]) < 1e-4


def test_ddp_takes_the_bucket_size():
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        dist = Dist(0, 1, 0, torch.device("cpu"), "gloo")
        net = train.wrap(
            torch.nn.Linear(4, 2), PrecisionConfig(amp="off"), dist, DDPConfig(bucket_mb=2.5)
        )
        assert isinstance(net, DistributedDataParallel)
        assert net.bucket_bytes_cap == int(2.5 * 2**20)
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.resume=", "run.dir"),
        ("optim.lrr=0.1", "unknown recipe key"),
        ("run.resume={bare}", "is not a last.pt"),
    ],
)
def test_a_user_error_stops_every_rank_at_once_said_once(tmp_path, demo_root, override, key):
    """Rank 0 alone decides the run folder: its user error reaches every rank (no rank left
    waiting in a collective, no traceback). Every rank finds a bad recipe key, or a resume file
    that is not a last.pt. Each is printed once."""
    bare = tmp_path / "bare" / "b" / "bare.pt"
    bare.parent.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1)}, bare)
    override = override.format(bare=bare)
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"kind": "train"}\n')  # a run was there
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "engine.run", str(recipe), override],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and key in errors[0], proc.stderr[-3000:]
    codes = re.findall(r"exitcode\s*:\s*(\d+)", proc.stderr)
    assert codes and set(codes) == {"2"}, proc.stderr[-3000:]  # rank 1 used to crash (exit 1)


def test_the_eval_line_is_the_saved_models_accuracy(tmp_path, demo_root):
    """Each rank's training forward updates its own BN running statistics, and DDP keeps rank
    0's (it broadcasts them each forward). The ranks evaluate with rank 0's too, so the eval
    line of a 2-process run is what its checkpoint scores in one process."""
    recipe = tiny_recipe(tmp_path / "r.yaml", demo_root, schedule={"epochs": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "engine.run", str(recipe), "data.batch_size=8", f"run.dir={tmp_path / 'two'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = tmp_path / "two" / "checkpoints" / "stage0-train.pt"
    assert (
        main(
            [
                str(recipe),
                f"run.dir={tmp_path / 'one'}",
                f"stages=[{{load: {{checkpoint: {saved}}}}}]",
            ]
        )
        == 0
    )

    def eval_line(run: str) -> dict:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if '"eval"' in x][-1]

    two, one = eval_line("two"), eval_line("one")
    assert abs(two["top1"] - one["top1"]) < 1e-6 and abs(two["loss"] - one["loss"]) < 1e-5
