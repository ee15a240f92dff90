"""What a run writes about itself: metrics.jsonl, config.yaml, env.json, TensorBoard events,
and the progress bar. Only rank 0 writes; on other ranks every method is a no-op."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from engine.errors import UserError


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (DESIGN.md "Metrics log")."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, elapsed: float = 0.0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.start = time.time() - elapsed
        self.tb = None
        if enabled and tensorboard:  # config.validate checked that tensorboard is installed
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def elapsed(self) -> float:
        return time.time() - self.start

    def write(self, kind: str, stage: int, epoch: float, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "stage": stage, "epoch": round(epoch, 4), "step": step}
        row["time"] = round(self.elapsed(), 3)
        row.update(fields)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for name, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"stage{stage}/{kind}/{name}", value, step)

    def truncate_after(self, stage: int, step: int) -> None:
        """Drop lines a crashed run wrote after the checkpoint it resumes from, so the log
        has neither duplicates nor gaps."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        lines = self.path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                if n == len(lines):  # torn by the crash (a full disk, a kill mid-write)
                    break
                raise UserError(
                    f"{self.path}: line {n} is not JSON; the metrics log is damaged"
                ) from None
            before = row["stage"] < stage or (row["stage"] == stage and row["step"] <= step)
            ended = row["stage"] == stage and row.get("event") == "end"
            if before and not ended:
                keep.append(line)
        write_atomic(self.path, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    """A per-epoch progress bar on rank 0 (disabled elsewhere)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
        file=sys.stderr,
    )


def write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temp file, then a rename): a kill or a full disk
    mid-write leaves the previous version."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_config(run_dir: Path, config: dict) -> None:
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def git_commit() -> str | None:
    """The code version: the commit of the checkout this package runs from, '+dirty' if it has
    edits or new files git does not ignore; None outside a git checkout with commits."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    if sha is None or status is None:
        return None
    return sha + ("+dirty" if status else "")


def environment(world_size: int, device: torch.device) -> dict:
    """Versions, devices, code version and world size: what env.json records."""
    import torchvision

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "world_size": world_size,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "cwd": os.getcwd(),  # relative paths in the recipe and argv are from here
        "executable": sys.executable,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version()))
        if torch.cuda.is_available()
        else None,
        "git_commit": git_commit(),
    }
    for name in ("triton", "nvidia.dali"):
        try:
            env[name] = __import__(name, fromlist=["__version__"]).__version__
        except ImportError:
            env[name] = None
    return env


def write_env(run_dir: Path, env: dict) -> None:
    write_atomic(run_dir / "env.json", json.dumps(env, indent=2) + "\n")
