"""Checkpoints (DESIGN.md "Checkpoints"): atomic writes, finding what to resume, and
`load_model`, which rebuilds a model from any checkpoint the engine wrote."""

from __future__ import annotations

import os
import pickle
import random
import re
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import UserError
from engine.models import build_model

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# What resuming reads from a last.pt (run.py, stages.run_all, train.fit).
RESUME_KEYS = ("model", "optimizer", "stage", "step", "stage_done", "rng", "elapsed")


def save(obj: dict, path: Path) -> None:
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`.
    A crash at any moment leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # A full disk surfaces as OSError, or as torch's zip writer's RuntimeError.
        if isinstance(e, RuntimeError) and "inline_container" not in str(e):
            raise
        why = e.strerror if isinstance(e, OSError) else "write failed; is the disk full?"
        raise UserError(
            f"cannot write checkpoint {path} ({why}); the previous one is intact"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def read(path: str | os.PathLike) -> dict:
    """Load a checkpoint or state-dict file on the CPU; a broken file is a user error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(
            f"checkpoint {path}: not a readable checkpoint ({type(e).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def read_resume(path: Path) -> dict:
    """A last.pt to resume from; a file without what resuming needs (a bare state dict, a
    stage checkpoint of another tool) is a user error naming run.resume and the file."""
    ckpt = read(path)
    if missing := [k for k in RESUME_KEYS if k not in ckpt]:
        raise UserError(
            f"recipe key 'run.resume': {path} is not a last.pt of this engine (it lacks "
            f"{', '.join(missing)}); name a run folder or its checkpoints/last.pt"
        )
    if path.name != "last.pt":  # a stage's checkpoint: the run would be rewritten from it on
        raise UserError(
            f"recipe key 'run.resume': {path} is not a last.pt; name a run folder or its "
            "checkpoints/last.pt (to start from a stage's checkpoint, load it in a new run)"
        )
    return ckpt


def state_dict_of(obj: dict) -> dict[str, torch.Tensor]:
    """The model weights of an engine checkpoint or of a bare (torchvision-format) state dict,
    with DDP / torch.compile prefixes removed."""
    sd = obj["model"] if "model" in obj and isinstance(obj["model"], dict) else obj
    out = {}
    for key, value in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def rng_state() -> dict:
    """The host RNGs and this process's CUDA device's (not every visible device's: a rank that
    resumes may see fewer GPUs than rank 0 did)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # as a tensor and plain numbers, not numpy's array: a checkpoint then loads with
        # torch.load's default weights_only=True
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]  # keys: a tensor, or (older checkpoints) an array
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, list):  # checkpoints before 2026-11-27 hold every visible device's
        device = torch.cuda.current_device()
        cuda = cuda[device] if device < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def new_run_dir(run_root: Path, name: str) -> Path:
    """Make a fresh run folder, `<name>-<UTC timestamp>` (the names find_resume looks for), and
    make it alone: a run started in the same second as another (seeds launched together) waits
    for the next second rather than share the other's folder."""
    for _ in range(100):
        now = datetime.now(timezone.utc)
        path = run_root / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            time.sleep(1.0 - now.microsecond / 1e6)
        except OSError as e:
            raise UserError(f"recipe key 'run.dir': cannot make {path} ({e.strerror})") from None
    raise UserError(f"recipe key 'run.dir': no free run folder name under {run_root} in 100 s")


def find_resume(run_root: Path, name: str) -> Path | None:
    """The newest run folder of recipe `name` under `run_root` that has checkpoints/last.pt
    and no summary.json (that is, did not finish). Only folders named as new_run_dir names
    them count: recipe `tiny` must not pick up a run of recipe `tiny-b`."""
    if not run_root.is_dir():
        return None
    pattern = re.compile(rf"{re.escape(name)}-\d{{8}}T\d{{6}}Z")
    candidates = sorted(
        (d for d in run_root.iterdir() if d.is_dir() and pattern.fullmatch(d.name)),
        key=lambda d: d.name,
        reverse=True,
    )
    for d in candidates:
        if (d / "checkpoints" / "last.pt").is_file() and not (d / "summary.json").exists():
            return d
    return None


def load_model(path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the model stored in an engine checkpoint, on the CPU, in eval mode: the same
    architecture (at its pruned widths where structurally pruned) and weights."""
    ckpt = read(path)
    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise UserError(f"checkpoint {path}: no 'arch' entry (not written by this engine)")
    model = build_model(arch["name"], arch["num_classes"])
    apply_arch(model, arch)
    model.load_state_dict(state_dict_of(ckpt))
    return model.eval()


def arch_of(model: torch.nn.Module, name: str, num_classes: int) -> dict[str, Any]:
    """What rebuilds `model`: its architecture name, classes, and every conv/linear/BN shape
    that differs from the dense model (structured pruning changes them)."""
    dense = build_model(name, num_classes).state_dict()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if dense[k].shape != v.shape}
    return {"name": name, "num_classes": num_classes, "shapes": shapes}


def apply_arch(model: torch.nn.Module, arch: dict[str, Any]) -> None:
    """Resize modules of a freshly built dense model to the shapes in `arch`."""
    if arch.get("shapes"):
        from engine.prune.surgery import resize_to

        resize_to(model, arch["shapes"])
