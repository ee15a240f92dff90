"""The engine's training step on CUDA: no host sync once warm (dense and masked, bf16 and fp16),
fp16 masked updates unscaled, masks stored in their weights' memory format. Run with -m gpu."""

from types import SimpleNamespace

import pytest
import torch

from engine import optim, prune, train
from engine.config import DataConfig, OptimConfig, PrecisionConfig
from engine.data import build_loaders
from engine.distributed import Dist
from engine.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = torch.device("cuda")


def _setup(amp: str, masked: bool, fused_masked: bool = True) -> SimpleNamespace:
    """A channels_last ResNet-20 on CUDA, built as the engine builds a run, and one batch."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).to(DEVICE, memory_format=torch.channels_last)
    masks = None
    if masked:
        masks = prune.unstructured_masks(model, "global_magnitude", 0.8)
        prune.apply_masks_(model, masks)
    precision = PrecisionConfig(amp=amp, channels_last=True, compile=False)
    opt = optim.build(model, OptimConfig(lr=0.05, fused_masked=fused_masked), masks)
    dtype = train.amp_dtype(precision)
    # A small initial scale: the first fp16 steps are applied, not skipped for overflow.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if dtype is torch.float16 else None
    dist = Dist(device=DEVICE)
    net = train.wrap(model, precision, dist)
    step = train.make_step(net, opt, scaler, 0.0, dtype, "cuda")
    data = DataConfig(backend="synthetic", steps_per_epoch=1, batch_size=32, image_size=32)
    loader, _ = build_loaders(data, dist=dist, seed=0, num_classes=10, channels_last=True)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    return SimpleNamespace(model=model, opt=opt, step=step, images=images, labels=labels)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_step_never_syncs(amp: str, masked: bool) -> None:
    """Steps after warm-up, with the LR set per step as fit does, make no host sync."""
    s = _setup(amp, masked)
    for _ in range(3):  # warm-up: cuDNN heuristics, Triton compilation, kernel tables uploaded
        s.step(s.images, s.labels)
    torch.cuda.synchronize()
    total = torch.zeros((), device=DEVICE)
    torch.cuda.set_sync_debug_mode("error")  # from here any host sync raises
    try:
        for _ in range(3):
            for group in s.opt.param_groups:
                group["lr"] = 0.04
            loss, bad = s.step(s.images, s.labels)
            total += loss + bad
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item()


def test_fp16_masked_update_is_unscaled() -> None:
    """The Triton path gets GradScaler's scale: one fp16 step equals the unfused path's."""
    weights = []
    for fused in (True, False):
        s = _setup("fp16", masked=True, fused_masked=fused)
        before = [p.detach().clone() for p in s.model.parameters()]
        s.step(s.images, s.labels)
        after = [p.detach() for p in s.model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        weights.append(after)
    for fused, unfused in zip(*weights, strict=True):
        torch.testing.assert_close(fused, unfused, rtol=1e-3, atol=1e-4)


def test_masks_share_their_weights_layout() -> None:
    """Each mask has its weight's strides: the Triton update reads weight, grad, buffer and mask
    in one storage order, and a mask in another memory format sends its weight through a
    contiguous copy and back on every step."""
    s = _setup("bf16", masked=True)
    for p, mask in s.opt.masks.items():
        assert mask.stride() == p.stride(), tuple(p.shape)
