"""Shared fixtures: a small generated dataset and a tiny-recipe writer for end-to-end runs."""

from pathlib import Path

import pytest
import torch
import yaml

from engine.data.demo import make_demo_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """4 classes of drawn textures, 120 train / 25 val images each, 32 px."""
    root = tmp_path_factory.mktemp("demo") / "data"
    return make_demo_dataset(root, classes=4, train_per_class=120, val_per_class=25, size=32)


def tiny_recipe(path: Path, data_root: Path, **sections) -> Path:
    """Write a small CPU recipe (resnet20 at 32 px, 3 epochs of 6 steps) with `sections`
    merged in."""
    body = {
        "name": "tiny",
        "seed": 0,
        "model": {"arch": "resnet20", "num_classes": 4},
        "data": {
            "backend": "torch",
            "root": str(data_root),
            "batch_size": 16,
            "image_size": 32,
            "val_resize": 32,
            "workers": 0,
            "steps_per_epoch": 6,
            "min_crop_scale": 0.35,
        },
        "precision": {"amp": "off", "channels_last": False, "compile": False},
        "optim": {"lr": 0.02, "momentum": 0.9, "weight_decay": 5.0e-4},
        "schedule": {"kind": "cosine", "epochs": 3},
        "log": {"every_steps": 4, "progress": False},
        "run": {"dir": str(path.parent / "run"), "device": "cpu"},
        "stages": [{"train": {}}],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path
