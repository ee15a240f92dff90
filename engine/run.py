"""Entry point: `python -m engine.run RECIPE.yaml [dotted.key=value ...]`, also under torchrun.

Parse, build, run the stages, close. User errors end with one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint, config, distributed
from engine.config import Recipe
from engine.data import build_loaders
from engine.distributed import Dist
from engine.errors import UserError
from engine.logging import MetricsLog, environment, write_atomic, write_config, write_env
from engine.models import build_model
from engine.preemption import Interrupted, StopRequest
from engine.stages import Context, run_all
from engine.train import amp_dtype, memory_format

USAGE = "usage: python -m engine.run RECIPE.yaml [dotted.key=value ...]   (--help lists the keys)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if argv:
            print("\n".join(config.describe()))
        return 0 if argv else 2
    try:
        recipe = config.load(argv[0], argv[1:])
    except UserError as e:
        # Every process reads the same recipe (files and variables may differ between nodes):
        # said once per node.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    dist = None
    try:
        dist = distributed.init(recipe.run.device)
        return train(recipe, dist)
    except UserError as e:
        if says_error(dist, e):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if dist is None or dist.is_main:
            print(str(e), file=sys.stderr)
        return e.exit_code
    finally:
        if dist is not None:
            distributed.close(dist)


def choose_run_dir(recipe: Recipe) -> tuple[Path, Path | None]:
    """The run folder and, when resuming, the last.pt to resume from (decided on rank 0)."""
    run = recipe.run
    if run.resume not in ("", "auto"):
        target = Path(run.resume)
        ckpt = target / "checkpoints" / "last.pt" if target.is_dir() else target
        if not ckpt.is_file():
            raise UserError(f"recipe key 'run.resume': no checkpoint at {ckpt}")
        return ckpt.parent.parent, ckpt
    auto = run.resume == "auto" or distributed.restart_count() > 0  # elastic restarts resume
    if run.dir:
        path = Path(run.dir)
        last = path / "checkpoints" / "last.pt"
        if auto and last.is_file():
            return path, last
        if not auto and began(path):
            raise UserError(
                f"recipe key 'run.dir': {path} already holds a run; add run.resume=auto to "
                "continue it, or choose another folder"
            )
        return path, None  # with auto and no last.pt: it stopped before one, start afresh
    if auto:
        found = checkpoint.find_resume(Path("runs"), recipe.name)
        if found is not None:
            return found, found / "checkpoints" / "last.pt"
    return checkpoint.new_run_dir(Path("runs"), recipe.name), None


def began(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that did some work: a metrics line other than a stage's
    start. A start that failed at once (a load stage's checkpoint that does not fit) does not
    count, so the same command, corrected, may run there."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    with path.open() as f:
        for line in f:
            try:
                if json.loads(line).get("kind") != "stage":
                    return True
            except ValueError:  # a torn line: something was being written
                return True
    return False


def says_error(dist: Dist | None, error: UserError) -> bool:
    """Whether this process prints `error`, so that it is said once: before the process group
    (a GPU missing for this rank) by whoever found it, rank 0's own decisions by rank 0, what
    every rank finds once per node."""
    if dist is None:
        return True
    return dist.is_main if getattr(error, "from_main", False) else dist.local_rank == 0


def on_main(dist: Dist, decide: Callable[[], Any]) -> Any:
    """`decide()` on rank 0, its result on every rank; a UserError it raises is raised on every
    rank (printed by rank 0 only), so that no rank waits in a collective for one that quit."""
    outcome = None
    if dist.is_main:
        try:
            outcome = decide()
        except UserError as e:
            e.from_main = True
            outcome = e
    outcome = dist.broadcast_object(outcome)
    if isinstance(outcome, UserError):
        raise outcome
    return outcome


def prepare_run_dir(run_dir: Path, recipe: Recipe, env: dict, resumed: bool) -> None:
    """Check that run_dir is writable; on a fresh start write config.yaml and env.json (a
    resume records itself once its checkpoint is accepted: `record_resume`)."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"recipe key 'run.dir': cannot write to {run_dir} ({e.strerror})") from None
    if not resumed:  # a fresh start, maybe over a run that stopped before last.pt
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        write_config(run_dir, config.to_dict(recipe))
        write_env(run_dir, env)


def train(recipe: Recipe, dist: Dist) -> int:
    # The model and the data first: what they find wrong (a batch larger than the data) is
    # said before a run folder is made.
    set_determinism(recipe.run.deterministic, dist.device)
    torch.manual_seed(recipe.seed)  # identical initial weights on every rank
    m = recipe.model
    model = build_model(m.arch, m.num_classes, m.zero_init_residual)
    arch = {"name": m.arch, "num_classes": m.num_classes, "shapes": {}}
    model.to(dist.device, memory_format=memory_format(recipe.precision))
    train_loader, val_loader = build_loaders(
        recipe.data,
        dist=dist,
        seed=recipe.seed,
        num_classes=m.num_classes,
        channels_last=recipe.precision.channels_last,
        dtype=amp_dtype(recipe.precision),
    )
    run_dir, resume_path = on_main(dist, lambda: choose_run_dir(recipe))
    if (run_dir / "summary.json").exists():
        if dist.is_main:
            print(f"{run_dir} has finished already (summary.json); nothing to do")
        return 0
    resume = checkpoint.read_resume(resume_path) if resume_path is not None else None
    env = environment(dist.world_size, dist.device)
    on_main(dist, lambda: prepare_run_dir(run_dir, recipe, env, resumed=resume is not None))
    log = MetricsLog(
        run_dir, dist.is_main, recipe.log.tensorboard, resume["elapsed"] if resume else 0.0
    )
    stop = StopRequest()
    stop.install()
    ctx = Context(recipe, dist, run_dir, log, model, arch, train_loader, val_loader, stop)
    ctx.code_version = env["git_commit"]
    if resume is not None:
        changed = restore(ctx, resume)
        on_main(dist, lambda: record_resume(run_dir, recipe, env, changed))
    results = run_all(ctx, resume)
    log.close()
    if dist.is_main:
        summary = {"run_dir": str(run_dir), "stages": results, "seconds": round(log.elapsed(), 1)}
        # summary.json marks the run finished: written whole
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(format_summary(recipe, summary))
    return 0


def record_resume(run_dir: Path, recipe: Recipe, env: dict, changed: dict) -> None:
    """An accepted resume: appended to env.json's `resumes` list (env.json describes the
    first start), with the recipe keys it changed, {key: [old, new]}; config.yaml becomes the
    recipe that runs from now on."""
    path = run_dir / "env.json"
    try:
        first = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or torn (versions before atomic writes)
        first = None
    if isinstance(first, dict):
        env = {**first, "resumes": [*first.get("resumes", []), {**env, "changed": changed}]}
    write_env(run_dir, env)
    if changed:
        write_config(run_dir, config.to_dict(recipe))


def set_determinism(on: bool, device: torch.device) -> None:
    """run.deterministic: deterministic kernels everywhere (cuDNN autotuning off, slower);
    otherwise let cuDNN pick the fastest convolution algorithms for the fixed input shapes."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# What the steps of a running stage depend on besides its stage entry: the LR curve and
# optimizer (schedule, optim) and the data order (seed); the data split is check_layout's.
RUNNING_STAGE_KEYS = ("schedule.", "optim.", "seed")


def check_changes(ctx: Context, ckpt: dict) -> dict[str, list]:
    """Resuming with an edited recipe: refuse changes that would corrupt the run (the model, a
    stage already run or running: masks and schedules depend on them, and inside a stage what
    its steps depend on); list the rest and return them, {key: [old, new]}."""
    old, new = config.flatten(ckpt.get("config", {})), config.flatten(config.to_dict(ctx.recipe))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    done = ckpt["stage"]
    inside = not ckpt["stage_done"]
    fatal = [
        k for k in changed
        if k.startswith("model.") or (k.startswith("stages.") and int(k.split(".")[1]) <= done)
        or (inside and k.startswith(RUNNING_STAGE_KEYS))
    ]  # fmt: skip
    if fatal:
        k = fatal[0]
        raise UserError(
            f"recipe key '{k}': changed from {old.get(k)!r} to {new.get(k)!r} since the run "
            f"began; resuming would corrupt it (start a new run instead)"
        )
    changed = [k for k in changed if not k.startswith("run.")]
    if changed:
        listed = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        ctx.say(f"warning: the recipe changed since the run began: {listed}")
    return {k: [old.get(k), new.get(k)] for k in changed}


def check_layout(ctx: Context, ckpt: dict) -> None:
    """Resuming inside a stage needs the same processes, per-process batch and epoch length:
    the saved step indexes the epoch, the data order and the schedule, so any other split
    would silently train on other data at another LR. Between stages they may change."""
    if ckpt["stage_done"]:
        return
    was = {
        "processes": ckpt.get("world_size"),  # absent in checkpoints of older versions
        "data.batch_size": config.flatten(ckpt.get("config", {})).get("data.batch_size"),
        "steps per epoch": ckpt.get("steps_per_epoch"),
    }
    now = {
        "processes": ctx.dist.world_size,
        "data.batch_size": ctx.recipe.data.batch_size,
        "steps per epoch": len(ctx.train_loader),
    }
    if differs := [f"{k} {was[k]} -> {now[k]}" for k in was if was[k] not in (None, now[k])]:
        raise UserError(
            f"recipe key 'run.resume': {ctx.run_dir} stopped inside stage {ckpt['stage']} "
            f"(step {ckpt['step']}), which cannot go on with another data split "
            f"({', '.join(differs)}); resume with the values it had"
        )


def restore(ctx: Context, ckpt: dict) -> dict[str, list]:
    """Put a last.pt back: architecture, weights, masks, RNG; trim the metrics log to it.
    Returns the recipe's accepted changes since the checkpoint (`check_changes`)."""
    check_layout(ctx, ckpt)
    changed = check_changes(ctx, ckpt)
    ctx.adopt(ckpt, f"recipe key 'model.arch': the run to resume ({ctx.run_dir})")
    checkpoint.set_rng_state(ckpt["rng"])
    stage, step = (ckpt["stage"] + 1, -1) if ckpt["stage_done"] else (ckpt["stage"], ckpt["step"])
    on_main(ctx.dist, lambda: ctx.log.truncate_after(stage, step))  # rank 0 writes the log
    ctx.say(f"resuming {ctx.run_dir} at stage {ckpt['stage']} step {ckpt['step']}")
    return changed


COLUMNS = (  # closing table: header, result key, format
    ("stage", "stage", "d"),
    ("kind", "kind", ""),
    ("epochs", "epochs", "d"),
    ("sparsity", "sparsity", ".3f"),
    ("params", "params", ","),  # nonzero: what filter pruning removes shows only here
    ("top1 %", "top1", ".2f"),
    ("top5 %", "top5", ".2f"),
    ("img/s", "img_per_s", ".0f"),
    ("seconds", "seconds", ".0f"),
)


def format_summary(recipe: Recipe, summary: dict) -> str:
    """The closing table: per stage, sparsity, accuracy and speed; then the run folder."""
    rows = [[h for h, _, _ in COLUMNS]]
    for result in summary["stages"]:
        rows.append([format(result[k], f) if k in result else "-" for _, k, f in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [f"\n{recipe.name}: finished in {summary['seconds']:.0f} s"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(f"run folder: {summary['run_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
