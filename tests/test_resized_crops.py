"""The batched resized-crop kernel vs its torch reference; on CPU via the Triton interpreter."""

import pytest
import torch

from engine.data.decode import CropParams, Encoded, resized_crops
from engine.data.folder import MEAN, STD, DeviceBatcher
from tests.interpret import INTERPRET, import_kernels, interpreted  # noqa: F401 (a fixture)

resized_crops_triton = import_kernels("kernels.resized_crops").resized_crops_triton
pytestmark = pytest.mark.usefixtures("interpreted")
# The CPU runs the kernel only in the interpreter: on a CUDA machine, CUDA alone.
DEVICES = ["cpu"] * INTERPRET + [pytest.param("cuda", marks=pytest.mark.gpu)]
MEAN_255, STD_255 = [m * 255 for m in MEAN], [s * 255 for s in STD]
# (height, width, train): landscape and portrait crops, a strip, a 9x downscale (long filter
# spans), and val resizes that upscale a small image (every span clamped at the crop's edges).
CASES = [(37, 50, True), (50, 37, False), (20, 20, True), (150, 16, False), (16, 150, True),
         (144, 160, True), (12, 13, False), (9, 40, False)]  # fmt: skip


def _batch(device: str, size: int = 16, seed: int = 0):
    """Random images (some CHW views of HWC memory) with crop plans drawn as the train and val
    loaders draw them, every other one flipped."""
    gen = torch.Generator().manual_seed(seed)
    images, plans, flips = [], [], []
    for i, (h, w, train) in enumerate(CASES):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        if i % 3 == 2:  # a CHW view of HWC pixels, as PIL's come
            image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        crop = CropParams(train=train, size=size, resize=size + 2, min_scale=0.08)
        _, plan, _ = crop(Encoded(image, h, w), torch.Generator().manual_seed(seed + i))
        images.append(image.to(device))
        plans.append(plan)
        flips.append(i % 2 == 1)
    return images, torch.stack(plans), torch.tensor(flips)


def _reference(images, plans, flips, size):
    x = resized_crops(images, plans, flips, size)
    mean = torch.tensor(MEAN_255, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD_255, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_the_per_image_reference(device, channels_last, dtype):
    """Crop, antialiased resize, window, flip and normalisation as F.interpolate and the
    reference do them, in the asked dtype and memory format."""
    images, plans, flips = _batch(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = resized_crops_triton(images, plans, flips, 16, MEAN_255, STD_255, dtype, fmt)
    assert out.shape == (len(CASES), 3, 16, 16) and out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt) and out.device == images[0].device
    want = _reference(images, plans, flips, 16)
    # Filter weights normalised and summed in another order than F.interpolate's: on an H100
    # (CUDA's reference) up to 1.3e-5 apart, 1/1000 of a uint8 level (1/57 after normalising).
    atol = 5e-5
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=0, atol=atol)
    else:  # rounded (compiled) or truncated (interpreter) to the dtype: under one ulp
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
        torch.testing.assert_close(out.float(), want, rtol=ulp, atol=atol)


@pytest.mark.gpu
def test_kernel_makes_no_host_sync():
    """The table goes up pinned and non_blocking: the prefetch thread never waits on the
    device here."""
    images, plans, flips = _batch("cuda")
    args = (16, MEAN_255, STD_255, torch.bfloat16)
    resized_crops_triton(images, plans, flips, *args)  # compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # from here any host sync raises
    try:
        out = resized_crops_triton(images, plans, flips, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_flip_mirrors_the_window(device):
    images, plans, _ = _batch(device)
    args = (16, MEAN_255, STD_255, torch.float32)
    plain = resized_crops_triton(images, plans, torch.zeros(len(images), dtype=torch.bool), *args)
    mirrored = resized_crops_triton(images, plans, torch.ones(len(images), dtype=torch.bool), *args)
    assert torch.equal(plain.flip(-1), mirrored)


@pytest.mark.parametrize("device", DEVICES)
def test_batcher_crops_use_the_kernel_on_cuda_or_under_the_interpreter(device, monkeypatch):
    """DeviceBatcher.crops, which the gpu decode mode calls, gives the kernel's batch on CUDA
    (here: CPU tensors under the interpreter) and the reference's on the CPU."""
    images, plans, flips = _batch(device)
    got = DeviceBatcher(torch.device(device), channels_last=True, dtype=torch.bfloat16).crops(
        images, plans, flips, 16
    )
    want = resized_crops_triton(
        images, plans, flips, 16, MEAN_255, STD_255, torch.bfloat16, torch.channels_last
    )
    assert torch.equal(got, want)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = DeviceBatcher(torch.device("cpu"), channels_last=True, dtype=torch.bfloat16)
    reference = cpu.crops([x.cpu() for x in images], plans, flips, 16)
    assert reference.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(reference.float(), got.float().cpu(), rtol=2**-7, atol=1e-6)


def test_bad_images_and_plans_are_refused():
    images, plans, flips = _batch("cpu")
    args = (16, MEAN_255, STD_255, torch.float32)
    for bad in (images[0].float(), images[0][:2], images[0][None]):
        with pytest.raises(ValueError, match="resized_crops_triton: need"):
            resized_crops_triton([bad], plans[:1], flips[:1], *args)
    h, w = images[0].shape[1:]
    for plan in (
        [1, 0, h, w, 16, 16, 0, 0],
        [0, 0, h, w, 16, 15, 0, 0],
        [0, -1, 2, 2, 16, 16, 0, 0],
    ):
        with pytest.raises(ValueError, match="does not fit"):
            resized_crops_triton(images[:1], torch.tensor([plan]), flips[:1], *args)
