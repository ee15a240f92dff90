"""The stage runner: a recipe's stages run in order over one shared context (model, data, run
folder). Each stage kind is a function registered in RUNNERS; new kinds slot in there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import checkpoint, config, optim, prune, schedules
from engine.config import LoadStage, PruneStage, Recipe, RetrainStage, TrainStage, to_dict
from engine.data import EPOCH_KEY_STRIDE, epoch_seed
from engine.distributed import Dist
from engine.errors import UserError
from engine.evaluate import evaluate
from engine.logging import MetricsLog
from engine.preemption import Interrupted, StopRequest
from engine.train import StagePlan, amp_dtype, fit, memory_format, stop_code


@dataclass
class Context:
    """Everything stages share. `model` is the bare module on the device (never wrapped)."""

    recipe: Recipe
    dist: Dist
    run_dir: Path
    log: MetricsLog
    model: torch.nn.Module
    arch: dict
    train_loader: object
    val_loader: object | None
    stop: StopRequest
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)
    epochs_run: int = 0  # by this process, for run.stop_after_epochs
    stage_began: float = 0.0  # the run's elapsed seconds when the current stage began
    code_version: str | None = None  # git commit of the engine, recorded in checkpoints

    @property
    def show_progress(self) -> bool:
        return self.dist.is_main and self.recipe.log.progress

    def say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    def epoch_key(self, stage: int, epoch: int) -> int:
        """The data-order key of an epoch: distinct per stage, identical on resume."""
        return stage * EPOCH_KEY_STRIDE + epoch

    @property
    def lr(self) -> float:
        """The peak LR of the original schedule, linearly scaled when optim.reference_batch
        is set."""
        o = self.recipe.optim
        if not o.reference_batch:
            return o.lr
        return o.lr * self.recipe.data.batch_size * self.dist.world_size / o.reference_batch

    def build_optimizer(self) -> torch.optim.Optimizer:
        return optim.build(self.model, self.recipe.optim, self.masks)

    def adopt(self, obj: dict, where: str, strict: bool = True) -> None:
        """Take the model of a checkpoint or bare state dict: an engine checkpoint's pruned
        widths (arch) and masks come along. `where` names the source in user errors."""
        arch = obj.get("arch")
        if isinstance(arch, dict):
            if arch.get("name") != self.arch["name"]:
                raise UserError(
                    f"{where} holds a {arch.get('name')}, but model.arch is {self.arch['name']}"
                )
            checkpoint.apply_arch(self.model, arch)
            self.arch = arch
            self.masks = {k: v.to(self.dist.device) for k, v in obj.get("masks", {}).items()}
        try:
            self.model.load_state_dict(checkpoint.state_dict_of(obj), strict=strict)
        except RuntimeError as e:
            raise UserError(
                f"{where}: weights do not fit model.arch={self.arch['name']} ({_mismatch(e)})"
            ) from None
        if self.masks:  # a bare state dict after pruning: its pruned weights start at zero
            prune.apply_masks_(self.model, self.masks)
        self.model.to(self.dist.device, memory_format=memory_format(self.recipe.precision))

    def save_rewind(self, epoch: int) -> None:
        """checkpoints/rewind-epoch<e>.pt: the weights after epoch e, for `wr` retraining."""
        if self.dist.is_main:
            path = self.run_dir / "checkpoints" / f"rewind-epoch{epoch}.pt"
            checkpoint.save({"model": self.model.state_dict(), "arch": self.arch}, path)

    def evaluate(self, stage: int, step: int, epoch: float) -> dict:
        """Evaluate the bare model now and log an `eval` line ({} without a val set)."""
        if self.val_loader is None:
            return {}
        # Each rank's training forward updated its own BN statistics; DDP keeps rank 0's (it
        # broadcasts them each forward) and so does the checkpoint: evaluate with those.
        self.dist.broadcast_(self.model.buffers())
        metrics = evaluate(self.model, self.val_loader, self.dist, amp_dtype(self.recipe.precision))
        self.log.write("eval", stage, epoch, step, **metrics)
        return metrics

    def stop_requested(self, sync_point: bool) -> bool:
        """A signal arrived. One process: checked every step. Several: agreed on at log steps
        only (an all-reduce), so every rank stops after the same step."""
        if not self.dist.active:
            return self.stop.requested
        if not sync_point:
            return False
        flag = torch.tensor([float(self.stop.requested)], device=self.dist.device)
        return bool(self.dist.all_reduce_sum(flag).item())

    def stop_message(self, stage: int, step: int) -> str:
        return (
            f"stopped at stage {stage} step {step}; last.pt saved in {self.run_dir}. Resume "
            f"with the same command plus run.resume=auto (or run.dir={self.run_dir} "
            "run.resume=auto)"
        )

    def state(self, stage: int, step: int, done: bool, opt=None, scaler=None) -> dict:
        """A checkpoint dict in DESIGN.md's format (optimizer None between stages: each
        training stage starts a fresh one)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "arch": self.arch,
            "stage": stage,
            "step": step,
            "epoch": step / len(self.train_loader),
            "stage_done": done,
            "config": to_dict(self.recipe),
            "code_version": self.code_version,
            "rng": checkpoint.rng_state(),
            "elapsed": self.log.elapsed(),
            "results": self.results,
            "stage_began": self.stage_began,
            "world_size": self.dist.world_size,  # a stage resumes only with the same split
            "steps_per_epoch": len(self.train_loader),
        }

    def save_last(self, stage: int, step: int, opt=None, scaler=None, done: bool = False) -> None:
        """Write checkpoints/last.pt (rank 0 only; every rank holds the same weights)."""
        if not self.dist.is_main:
            return
        state = self.state(stage, step, done, opt, scaler)
        checkpoint.save(state, self.run_dir / "checkpoints" / "last.pt")


def run_load(ctx: Context, stage: LoadStage, index: int, resume: dict | None) -> dict:
    """Load weights from an engine checkpoint or a torchvision-format state dict; evaluate
    them (the accuracy before pruning, in recipes that start from a trained model)."""
    where = f"recipe key 'stages.{index}.load.checkpoint': {stage.checkpoint}"
    ctx.adopt(checkpoint.read(stage.checkpoint), where, stage.strict)
    ctx.say(f"stage {index} load: {stage.checkpoint}")
    return ctx.evaluate(index, 0, 0.0)


def run_train(ctx: Context, stage: TrainStage, index: int, resume: dict | None) -> dict:
    """Dense training with the recipe's original schedule."""
    r = ctx.recipe
    spe = len(ctx.train_loader)
    epochs = stage.epochs or r.schedule.epochs
    lr = schedules.build(r.schedule, ctx.lr, spe)
    plan = StagePlan(index, epochs * spe, lr, rewind_epochs=tuple(stage.rewind_epochs))
    result = fit(ctx, plan, resume)
    return {"epochs": epochs, **result}


def run_prune(ctx: Context, stage: PruneStage, index: int, resume: dict | None) -> dict:
    """Prune ctx.model in place: unstructured masks (identical on every rank, checked) or
    structured surgery; log sparsity, parameters, FLOPs and the per-layer table; evaluate."""
    r = ctx.recipe
    generator = torch.Generator().manual_seed(epoch_seed(r.seed, index, 0))  # same on all ranks
    key = f"recipe key 'stages.{index}.prune'"
    if stage.method in prune.UNSTRUCTURED:
        try:  # masks loaded from a checkpoint may not fit this stage's sparsity or layers
            ctx.masks = prune.unstructured_masks(
                ctx.model,
                stage.method,
                stage.sparsity,
                scope=stage.scope if stage.method == "random" else None,
                generator=generator,
                masks=ctx.masks or None,
                include_linear=stage.include_linear,
                exclude_first=stage.exclude_first,
                exclude_downsample=stage.exclude_downsample,
            )
        except ValueError as e:
            raise UserError(f"{key}: {e}") from None
        flat = torch.cat([m.flatten() for m in ctx.masks.values()]).to(torch.uint8)
        if not ctx.dist.all_equal(flat):
            raise RuntimeError("pruning masks differ between ranks")
        prune.apply_masks_(ctx.model, ctx.masks)
    else:
        if ctx.masks:
            raise UserError(
                f"{key}: {stage.method} removes filters, but the model holds unstructured masks "
                "(loaded with its checkpoint); filter pruning must come before them"
            )
        amount = stage.setting or stage.fraction
        try:
            prune.structured_prune_(
                ctx.model,
                ctx.arch["name"],
                stage.method,
                amount,
                generator=generator,
                round_to=stage.round_to,
            )
        except ValueError as e:
            raise UserError(f"{key}: {e}") from None
        ctx.arch = checkpoint.arch_of(ctx.model, ctx.arch["name"], ctx.arch["num_classes"])
    rep = prune.report(ctx.model, ctx.masks or None)
    dense, effective = prune.count_flops(ctx.model, r.data.image_size, ctx.masks or None)
    layers = [[name, list(shape), round(kept, 4)] for name, shape, kept in rep["layers"]]
    found = {"sparsity": rep["sparsity"], "params": rep["params"]}
    found |= {"flops": dense, "flops_effective": effective}
    ctx.log.write("prune", index, 0.0, 0, method=stage.method, **found, layers=layers)
    ctx.say(
        f"stage {index} prune ({stage.method}): sparsity {rep['sparsity']:.4f}, "
        f"{rep['params']:,} nonzero parameters, {dense / 1e6:.1f} MFLOPs dense, "
        f"{effective / 1e6:.1f} effective\n{prune.format_table(rep['layers'])}"
    )
    return {**found, **ctx.evaluate(index, 0, 0.0)}


def run_retrain(ctx: Context, stage: RetrainStage, index: int, resume: dict | None) -> dict:
    """Retrain the pruned model with a variant's schedule derived from the original one."""
    r = ctx.recipe
    spe = len(ctx.train_loader)
    plan = schedules.retrain(
        stage.variant,
        r.schedule,
        ctx.lr,
        stage.epochs,
        spe,
        cycle_momentum=stage.cycle_momentum,
        momentum_range=tuple(stage.momentum_range),
    )
    if stage.variant == "wr" and resume is None:
        rewind(ctx, stage, index)
    result = fit(ctx, StagePlan(index, plan.total_steps, plan.lr, plan.momentum), resume)
    rep = prune.report(ctx.model, ctx.masks or None)
    found = {"sparsity": rep["sparsity"], "params": rep["params"]}
    return {"epochs": stage.epochs, "variant": stage.variant, **found, **result}


def rewind(ctx: Context, stage: RetrainStage, index: int) -> None:
    """Weight rewinding: the dense weights of epoch T - E, with the current masks applied."""
    source = config.rewind_source(ctx.recipe, stage, index)
    if isinstance(source, int):
        source = ctx.run_dir / "checkpoints" / f"rewind-epoch{source}.pt"
    try:
        ctx.model.load_state_dict(checkpoint.state_dict_of(checkpoint.read(source)))
    except RuntimeError as e:
        raise UserError(
            f"recipe key 'stages.{index}.retrain': the rewind weights {source} do not fit the "
            f"model ({_mismatch(e)})"
        ) from None
    prune.apply_masks_(ctx.model, ctx.masks)
    ctx.say(f"stage {index} wr: weights rewound to {source}")


def _mismatch(error: RuntimeError) -> str:
    """The first mismatch load_state_dict names (its message's second line), for one line."""
    lines = str(error).splitlines()
    return lines[1].strip() if len(lines) > 1 else str(error)


RUNNERS: dict[str, Callable[[Context, object, int, dict | None], dict]] = {
    "load": run_load,
    "train": run_train,
    "prune": run_prune,
    "retrain": run_retrain,
}


def run_all(ctx: Context, resume: dict | None) -> list[dict]:
    """Run the recipe's stages from the start, or from where `resume` (a last.pt) stopped."""
    start = 0
    if resume is not None:
        ctx.results = list(resume.get("results", []))
        start = resume["stage"] + 1 if resume["stage_done"] else resume["stage"]
    for index, stage in enumerate(ctx.recipe.stages):
        if index < start:
            continue
        mid_stage = resume if resume is not None and index == resume["stage"] else None
        if mid_stage is None:
            ctx.stage_began = ctx.log.elapsed()
            ctx.log.write("stage", index, 0.0, 0, event="start", name=stage.kind)
        else:  # the stage's time counts its earlier processes too
            ctx.stage_began = mid_stage.get("stage_began", ctx.log.elapsed())
        result = RUNNERS[stage.kind](ctx, stage, index, mid_stage)
        if "params" not in result:  # nonzero parameters after every stage (a host sync)
            result["params"] = prune.report(ctx.model, ctx.masks or None)["params"]
        result["seconds"] = round(ctx.log.elapsed() - ctx.stage_began, 1)
        ctx.results.append({"stage": index, "kind": stage.kind, **result})
        steps = len(ctx.train_loader) * result.get("epochs", 0)
        ctx.log.write(
            "stage",
            index,
            float(result.get("epochs", 0)),
            steps,
            event="end",
            name=stage.kind,
            **result,
        )
        if ctx.dist.is_main:
            path = ctx.run_dir / "checkpoints" / f"stage{index}-{stage.kind}.pt"
            checkpoint.save(ctx.state(index, steps, done=True), path)
            ctx.save_last(index, steps, done=True)
        if index + 1 == len(ctx.recipe.stages):
            break
        stop_after = ctx.recipe.run.stop_after_epochs
        code = 0 if stop_after and ctx.epochs_run >= stop_after else None
        if ctx.stop_requested(sync_point=True):  # all ranks: a signal during the stage's end
            code = stop_code(ctx)
        if code is not None:
            ctx.dist.barrier()  # every rank exits after rank 0 has saved
            raise Interrupted(ctx.stop_message(index, steps), code)
    return ctx.results
