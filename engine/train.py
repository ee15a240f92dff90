"""The training step and the epoch loop of one stage.

Hot-path rule: no host sync inside a step. The loss accumulates on the device and is read only
on log steps (every `log.every_steps`), where the all-reduce and `.item()` below are the syncs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from engine.config import PrecisionConfig
from engine.evaluate import evaluate
from engine.logging import progress
from engine.preemption import Interrupted

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_dtype(precision: PrecisionConfig) -> torch.dtype | None:
    return AMP_DTYPES[precision.amp]


def wrap(model: torch.nn.Module, precision: PrecisionConfig, ctx) -> torch.nn.Module:
    """The module the step calls: DDP across ranks (buckets as grad views, no copy), then
    torch.compile. `model` itself stays unwrapped for evaluation and checkpoints."""
    net = model
    if ctx.dist.active:
        cuda = ctx.dist.device.type == "cuda"
        net = DistributedDataParallel(
            net, device_ids=[ctx.dist.device.index] if cuda else None, gradient_as_bucket_view=True
        )
    if precision.compile:
        mode = None if precision.compile_mode == "default" else precision.compile_mode
        net = torch.compile(net, mode=mode)
    return net


@dataclass
class StagePlan:
    """What one training stage does: how many steps, and LR (and momentum) per step."""

    index: int
    total_steps: int
    lr: Callable[[int], float]
    momentum: Callable[[int], float] | None = None
    rewind_epochs: tuple[int, ...] = ()  # save the weights after these epochs (wr retraining)


def make_step(net, opt, scaler, label_smoothing: float, dtype: torch.dtype | None, device: str):
    """One optimizer step; returns the loss as a device tensor (no sync)."""

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(images), labels, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            # fp16: the fused CUDA optimizer checks found_inf on the device; foreach/CPU
            # optimizers make GradScaler read it on the host (one sync per step).
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss.detach()

    return step


def fit(ctx, plan: StagePlan, resume: dict | None) -> dict:
    """Run `plan` on ctx.model from step 0 (or from a checkpoint's step), evaluating and
    checkpointing at epoch ends. Returns the stage's final eval metrics and images/s."""
    r, dist, loader = ctx.recipe, ctx.dist, ctx.train_loader
    model = ctx.model
    net = wrap(model, r.precision, ctx)
    opt = ctx.build_optimizer()
    dtype = amp_dtype(r.precision)
    scaler = torch.amp.GradScaler(dist.device.type) if dtype is torch.float16 else None
    step = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step = resume["step"]
    train_step = make_step(net, opt, scaler, r.optim.label_smoothing, dtype, dist.device.type)
    spe = len(loader)
    epochs = -(-plan.total_steps // spe)
    every = r.log.every_steps
    global_batch = r.data.batch_size * dist.world_size
    result: dict = {}
    loss_sum = torch.zeros((), device=dist.device)

    if step == 0 and 0 in plan.rewind_epochs:
        ctx.save_rewind(0)
    while step < plan.total_steps:
        epoch = step // spe
        skip = step - epoch * spe  # mid-epoch resume: replay the epoch's order, skip done steps
        loader.set_epoch(ctx.epoch_key(plan.index, epoch))
        desc = f"stage {plan.index} epoch {epoch + 1}/{epochs}"
        bar = progress(spe, desc, ctx.show_progress, skip)
        loss_sum.zero_()  # a log window never spans an epoch end (eval and saving lie there)
        last_step, last_time = step, time.perf_counter()
        epoch_time, epoch_steps = time.perf_counter(), 0
        for i, (images, labels) in enumerate(loader):
            if i < skip:
                continue
            if step >= plan.total_steps:
                break
            lr = plan.lr(step)
            for group in opt.param_groups:
                group["lr"] = lr
                if plan.momentum is not None:
                    group["momentum"] = plan.momentum(step)
            loss_sum += train_step(images, labels)
            step += 1
            epoch_steps += 1
            bar.update()
            if step % every == 0:
                n = step - last_step
                stats = dist.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(n)]))
                loss = stats[0].item() / stats[1].item()  # host sync: once per log interval
                now = time.perf_counter()
                img_s = n * global_batch / (now - last_time)
                ctx.log.write(
                    "train", plan.index, step / spe, step, lr=lr, loss=loss, img_per_s=img_s
                )
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4g}", img_s=f"{img_s:.0f}")
                loss_sum.zero_()
                last_step, last_time = step, now
            if ctx.stop_requested(sync_point=step % every == 0):
                ctx.save_last(plan.index, step, opt, scaler)
                raise Interrupted(ctx.stop_message(step), 128 + ctx.stop.signal)
        bar.close()
        if epoch_steps:
            if dist.device.type == "cuda":
                torch.cuda.synchronize()  # host sync: once per epoch, for an honest img/s
            result["img_per_s"] = epoch_steps * global_batch / (time.perf_counter() - epoch_time)
        done_epoch = step // spe
        final = step >= plan.total_steps
        if ctx.val_loader is not None and (final or done_epoch % r.eval.every_epochs == 0):
            metrics = evaluate(model, ctx.val_loader, dist, dtype)
            ctx.log.write("eval", plan.index, step / spe, step, **metrics)
            ctx.say(
                f"stage {plan.index} epoch {done_epoch}: top1 {metrics['top1']:.2f}% "
                f"top5 {metrics['top5']:.2f}% loss {metrics['loss']:.4f}"
            )
            result.update(metrics)
        ctx.epochs_run += 1
        if done_epoch in plan.rewind_epochs and step % spe == 0:
            ctx.save_rewind(done_epoch)
        if not final and done_epoch % r.checkpoint.every_epochs == 0:
            ctx.save_last(plan.index, step, opt, scaler)
        if not final and r.run.stop_after_epochs and ctx.epochs_run >= r.run.stop_after_epochs:
            ctx.save_last(plan.index, step, opt, scaler)
            raise Interrupted(ctx.stop_message(step), 0)
    return result
