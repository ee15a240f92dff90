"""The training step and the epoch loop of one stage.

Hot-path rule: no host sync inside a step. The loss accumulates on the device and is read only
on log steps (every `log.every_steps`), where the all-reduce and `.item()` below are the syncs.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from engine import optim
from engine.config import DDPConfig, PrecisionConfig
from engine.distributed import Dist
from engine.logging import progress
from engine.preemption import Interrupted

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_dtype(precision: PrecisionConfig) -> torch.dtype | None:
    return AMP_DTYPES[precision.amp]


def memory_format(precision: PrecisionConfig) -> torch.memory_format:
    return torch.channels_last if precision.channels_last else torch.preserve_format


def wrap(
    model: torch.nn.Module,
    precision: PrecisionConfig,
    dist: Dist,
    ddp: DDPConfig | None = None,
) -> torch.nn.Module:
    """The module the step calls: DDP across ranks (buckets of `ddp.bucket_mb`, default 25 MiB,
    as grad views: no copy), then torch.compile. `model` itself stays unwrapped for evaluation
    and checkpoints."""
    net = model
    if dist.active:
        cuda = dist.device.type == "cuda"
        net = DistributedDataParallel(
            net,
            device_ids=[dist.device.index] if cuda else None,
            gradient_as_bucket_view=True,
            bucket_cap_mb=(ddp or DDPConfig()).bucket_mb,
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
    """One optimizer step. Returns (loss, bad) as device tensors, no sync: `bad` is 1 when the
    step was skipped for a non-finite loss or gradient (the weights and momentum untouched)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    found_inf = torch.zeros(1, device=device)
    one = torch.ones(1, device=device)
    # Under DDP the grads are views of its all-reduce buckets: zero them in place, as new
    # tensors (set_to_none) would be copied into the buckets every step.
    to_none = not isinstance(getattr(net, "_orig_mod", net), DistributedDataParallel)

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(images), labels, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=to_none)
        bad = ~torch.isfinite(loss.detach())
        if scaler is not None:
            # fp16: GradScaler skips overflowing steps by itself (dynamic loss scaling; not
            # counted as faults). Fused optimizers take its found_inf on the device; others
            # make it read the flag on the host (a sync, on the CPU only).
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss.detach(), bad.float()
        loss.backward()
        # bf16/fp32: one multi-tensor pass flags non-finite gradients on the device.
        found_inf.zero_()
        grads = [p.grad for p in params if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)
        optim.step_unless(opt, found_inf)
        return loss.detach(), torch.maximum(found_inf[0], bad.float())

    return step


class StatsGuard:
    """BN running statistics as of the last sync point, put back when a step since then was
    skipped: a skipped step must not leave its (possibly non-finite) batch statistics behind.
    Costs one copy of the (small) buffers per log interval, none per step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.buffers = list(model.buffers())
        self.saved = [b.clone() for b in self.buffers]
        self.skipped = 0

    def sync(self, skipped: int) -> None:
        if not self.buffers:
            return
        if skipped > self.skipped:
            torch._foreach_copy_(self.buffers, self.saved)
            self.skipped = skipped
        else:
            torch._foreach_copy_(self.saved, self.buffers)


def fit(ctx, plan: StagePlan, resume: dict | None) -> dict:
    """Run `plan` on ctx.model from step 0 (or from a checkpoint's step), evaluating and
    checkpointing at epoch ends. Returns the stage's final eval metrics and images/s."""
    r, dist, loader = ctx.recipe, ctx.dist, ctx.train_loader
    model = ctx.model
    net = wrap(model, r.precision, dist, r.ddp)
    opt = ctx.build_optimizer()
    dtype = amp_dtype(r.precision)
    scaler = torch.amp.GradScaler(dist.device.type) if dtype is torch.float16 else None
    step = 0
    if resume is not None:
        optim.load_state(opt, resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step = resume["step"]
    train_step = make_step(net, opt, scaler, r.optim.label_smoothing, dtype, dist.device.type)
    spe = len(loader)
    epochs = -(-plan.total_steps // spe)
    every = r.log.every_steps
    global_batch = r.data.batch_size * dist.world_size
    result: dict = {}
    # Device-side counters, read on log steps: loss sum and steps of the window, steps skipped
    # for non-finite values (in all, and in a row).
    window = torch.zeros(4, device=dist.device)  # loss sum, good steps, skipped, skipped in a row
    guard = StatsGuard(model)
    stopping = False  # a stop request at an epoch's end waits for the epoch's eval and saves

    def save_and_stop(message: str, code: int) -> None:
        guard.sync(int(window[2].item()))  # host sync (a save is one): no skipped step's BN stats
        ctx.save_last(plan.index, step, opt, scaler)
        # Every rank waits for rank 0's last.pt: under torchrun, the first rank to exit gets
        # the others killed.
        dist.barrier()
        raise Interrupted(message, code)

    if step == 0 and 0 in plan.rewind_epochs:
        ctx.save_rewind(0)
    while step < plan.total_steps:
        epoch = step // spe
        skip = step - epoch * spe  # mid-epoch resume: the epoch's batches from this one on
        loader.set_epoch(ctx.epoch_key(plan.index, epoch), start=skip)
        desc = f"stage {plan.index} epoch {epoch + 1}/{epochs}"
        bar = progress(spe, desc, ctx.show_progress, skip)
        window[:2].zero_()  # a log window never spans an epoch end (eval and saving lie there)
        last_step, last_time = step, time.perf_counter()
        epoch_time, epoch_steps = time.perf_counter(), 0
        for images, labels in loader:
            if skip:  # a resumed epoch: reaching its first batch (DALI replays) counts in no img/s
                last_time = epoch_time = time.perf_counter()
                skip = 0
            if step >= plan.total_steps:
                break
            lr = plan.lr(step)
            for group in opt.param_groups:
                group["lr"] = lr
                if plan.momentum is not None:
                    group["momentum"] = plan.momentum(step)
            loss, bad = train_step(images, labels)
            window += torch.stack([torch.where(bad > 0, 0.0, loss.float()), 1 - bad, bad, bad])
            window[3] *= bad  # the run of skipped steps ends at a good step
            step += 1
            epoch_steps += 1
            bar.update()
            if step % every == 0:
                n = step - last_step
                bad_files = window.new_tensor([getattr(loader, "bad_files", 0)])
                # loss, good steps, files replaced: all ranks; skips agree across ranks
                sums = dist.all_reduce_sum(torch.cat([window[:2], bad_files]))
                worst = dist.all_reduce_max(window[2:].clone())
                # host sync: once per log interval
                (loss_sum, good, bad_files), (skipped, streak) = sums.tolist(), worst.tolist()
                guard.sync(int(skipped))
                loss = loss_sum / good if good else None  # every step of the window skipped
                now = time.perf_counter()
                img_s = n * global_batch / (now - last_time)
                ctx.log.write(
                    "train", plan.index, step / spe, step, lr=lr, loss=loss, img_per_s=img_s,
                    skipped=int(skipped), bad_files=int(bad_files),
                )  # fmt: skip
                bar.set_postfix(loss=loss, lr=f"{lr:.4g}", img_s=f"{img_s:.0f}")
                window[:2].zero_()
                last_step, last_time = step, now
                if streak >= r.run.max_skipped_steps:
                    save_and_stop(
                        f"stopped: {int(streak)} steps in a row had a non-finite loss or "
                        f"gradient and were skipped (run.max_skipped_steps); last.pt holds the "
                        f"last good weights (step {step}, nothing was applied since)",
                        3,
                    )
            epoch_end = step % spe == 0 or step >= plan.total_steps  # its saves come below
            if r.checkpoint.every_steps and step % r.checkpoint.every_steps == 0 and not epoch_end:
                guard.sync(int(window[2].item()))  # host sync (a save is one anyway)
                ctx.save_last(plan.index, step, opt, scaler)
            if ctx.stop_requested(sync_point=step % every == 0):
                if not epoch_end:
                    save_and_stop(ctx.stop_message(plan.index, step), stop_code(ctx))
                stopping = True  # after this epoch's eval, rewind point and checkpoint
        bar.close()
        guard.sync(int(window[2].item()))  # host sync: once per epoch, before eval and saving
        if epoch_steps:
            if dist.device.type == "cuda":
                torch.cuda.synchronize()  # host sync: once per epoch, for an honest img/s
            result["img_per_s"] = epoch_steps * global_batch / (time.perf_counter() - epoch_time)
        done_epoch = step // spe
        final = step >= plan.total_steps
        if final or done_epoch % r.eval.every_epochs == 0:
            metrics = ctx.evaluate(plan.index, step, step / spe)
            if metrics:
                ctx.say(
                    f"stage {plan.index} epoch {done_epoch}: top1 {metrics['top1']:.2f}% "
                    f"top5 {metrics['top5']:.2f}% loss {metrics['loss']:.4f}"
                )
            result.update(metrics)
        ctx.epochs_run += 1
        if done_epoch in plan.rewind_epochs and step % spe == 0:
            ctx.save_rewind(done_epoch)
        if final:  # the stage's checkpoints (and a stop requested now) are run_all's
            break
        if stopping:
            save_and_stop(ctx.stop_message(plan.index, step), stop_code(ctx))
        if r.run.stop_after_epochs and ctx.epochs_run >= r.run.stop_after_epochs:
            save_and_stop(ctx.stop_message(plan.index, step), 0)
        if done_epoch % r.checkpoint.every_epochs == 0:
            ctx.save_last(plan.index, step, opt, scaler)
    return result


def stop_code(ctx) -> int:
    """The exit code of a signal stop: 128 + the signal (SIGTERM on a rank that got none and
    stops because another did)."""
    return 128 + (ctx.stop.signal or signal.SIGTERM)
