"""Masked SGD kernel vs the torch oracle and torch.optim.SGD; on CPU via the Triton interpreter."""

import pytest
import torch

import kernels
from kernels.reference import masked_sgd_reference_
from tests.interpret import INTERPRET, import_kernels, interpreted  # noqa: F401 (a fixture)

import_kernels("kernels.masked_sgd")  # kernels.masked_sgd_ dispatches to it
pytestmark = pytest.mark.usefixtures("interpreted")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Odd sizes, a whole chunk plus a partial one, channels_last 4-D weights, and one of exactly two
# whole chunks (whole chunks take the kernel's unbounded, vectorised path).
SHAPES = [(3,), (1,), (7, 5), (kernels.masked_sgd.CHUNK + 3,), (5, 3, 3, 3), (4, 6, 1, 1),
          (kernels.masked_sgd.CHUNK // 8, 4, 2, 2)]  # fmt: skip
CHANNELS_LAST = {4, 5, 6}
# (weight/buffer dtype, grad dtype, tolerance): values are O(1); fp32 allows a few ulps (a GPU may
# fuse multiply-adds), bf16 one or two bf16 ulps per step (the kernel asks for round-to-nearest-
# even, which the interpreter does as round-half-up; its order of operations is not torch's).
DTYPES = [
    (torch.float32, torch.float32, 2e-6),
    (torch.float32, torch.bfloat16, 2e-6),
    (torch.bfloat16, torch.bfloat16, 2**-6),
]


def _make(
    device: str, w_dtype: torch.dtype, g_dtype: torch.dtype, masked: bool, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """Random weights, grads, zero buffers and masks (one parameter left unmasked)."""
    gen = torch.Generator().manual_seed(seed)
    ws, gs, bs, ms = [], [], [], []
    for i, shape in enumerate(SHAPES):
        fmt = torch.channels_last if i in CHANNELS_LAST else torch.contiguous_format
        w = torch.randn(shape, generator=gen).to(device, w_dtype, memory_format=fmt)
        g = torch.randn(shape, generator=gen).to(device, g_dtype, memory_format=fmt)
        m = (torch.rand(shape, generator=gen) > 0.6).to(device, torch.uint8, memory_format=fmt)
        ws.append(w)
        gs.append(g)
        bs.append(torch.zeros_like(w))
        ms.append(m if masked and i != 2 else None)
    return ws, gs, bs, ms


def _clone(ts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Clones that keep each tensor's memory format."""
    return [None if t is None else t.clone() for t in ts]


def _new_grads(gs: list[torch.Tensor], seed: int) -> None:
    """Refill grads in place with fresh random values, as a new backward pass would."""
    gen = torch.Generator().manual_seed(seed)
    for g in gs:
        g.copy_(torch.randn(g.shape, generator=gen))


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float) -> None:
    """Elementwise closeness of O(1) values, as relative and absolute tolerance."""
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float().cpu(), e.float().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("w_dtype", "g_dtype", "tol"), DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(("weight_decay", "masked"), [(0.0, False), (1e-2, True), (0.0, True)])
def test_matches_reference(device, w_dtype, g_dtype, tol, nesterov, weight_decay, masked):
    ws, gs, bs, ms = _make(device, w_dtype, g_dtype, masked)
    ref_ws, ref_bs = _clone(ws), _clone(bs)
    lr = torch.tensor(0.1, device=device)
    for step in range(2):
        lr.fill_(0.1 / (step + 1))  # a device-tensor LR that changes between steps
        _new_grads(gs, seed=step)
        kw = dict(lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov)
        kernels.masked_sgd_(ws, gs, bs, ms, **kw)
        masked_sgd_reference_(ref_ws, gs, ref_bs, ms, **kw)
    _assert_close(ws + bs, ref_ws + ref_bs, tol)
    for w, b, m in zip(ws, bs, ms, strict=True):
        assert w.stride() == b.stride()  # layouts preserved (channels_last stays channels_last)
        if m is not None:
            assert (w[m == 0] == 0).all() and (b[m == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("all_ones", [False, True])
def test_matches_torch_sgd(device, nesterov, all_ones):
    """With masks of all ones (or None) and zero-initialised buffers we equal torch.optim.SGD."""
    ws, gs, bs, ms = _make(device, torch.float32, torch.float32, masked=all_ones)
    ms = [None if m is None else torch.ones_like(m) for m in ms]
    ref = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    for step in range(3):
        _new_grads(gs, seed=step)
        for p, g in zip(ref, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        kernels.masked_sgd_(
            ws, gs, bs, ms, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov
        )
    _assert_close(ws, [p.detach() for p in ref], 1e-5)
    _assert_close(bs, [opt.state[p]["momentum_buffer"] for p in ref], 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_masked_entries_stay_exactly_zero(device, w_dtype):
    """Just-pruned weights (nonzero under the mask) become and stay exact zeros over many steps."""
    ws, gs, bs, ms = _make(device, w_dtype, w_dtype, masked=True)
    ms = [None if m is None else m.bool() for m in ms]  # bool masks are accepted too
    for step in range(6):
        _new_grads(gs, seed=step)
        kernels.masked_sgd_(ws, gs, bs, ms, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
        for w, b, m in zip(ws, bs, ms, strict=True):
            if m is not None:
                assert torch.equal(w[m == 0], torch.zeros_like(w[m == 0]))
                assert torch.equal(b[m == 0], torch.zeros_like(b[m == 0]))
                assert (b[m != 0] != 0).all()  # kept entries are updated


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_step(device):
    ws, gs, bs, ms = _make(device, torch.float32, torch.float32, masked=True)
    for b in bs:
        b.normal_()
    gs[0][0] = float("inf")
    before = _clone(ws + bs)
    found_inf, scale = torch.ones((), device=device), torch.tensor(1024.0, device=device)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, grad_scale=scale)
    kernels.masked_sgd_(ws, gs, bs, ms, found_inf=found_inf, **kw)
    for a, e in zip(ws + bs, before, strict=True):
        assert torch.equal(a, e)
    gs[0][0] = 0.0
    found_inf.zero_()  # same tensors, flag cleared: the step now happens, grads divided by scale
    ref_ws, ref_bs = _clone(ws), _clone(bs)
    kernels.masked_sgd_(ws, gs, bs, ms, found_inf=found_inf, **kw)
    masked_sgd_reference_(ref_ws, [g / 1024 for g in gs], ref_bs, ms, **{**kw, "grad_scale": None})
    _assert_close(ws + bs, ref_ws + ref_bs, 2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_mismatched_or_strided_layouts_fall_back(device):
    """Grads in another memory format, or weights that are strided views, are still updated."""
    ws, gs, bs, ms = _make(device, torch.float32, torch.float32, masked=True)
    gs[4] = gs[4].contiguous()  # weight is channels_last, grad is not
    base = torch.randn(7, 10, device=device)
    ws[2] = base[:, ::2]  # non-dense view: only every other column may change
    untouched = base[:, 1::2].clone()
    ref_ws, ref_bs = _clone(ws), _clone(bs)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    kernels.masked_sgd_(ws, gs, bs, ms, **kw)
    masked_sgd_reference_(ref_ws, gs, ref_bs, ms, **kw)
    _assert_close(ws + bs, ref_ws + ref_bs, 2e-6)
    assert torch.equal(base[:, 1::2], untouched)


@pytest.mark.parametrize("device", DEVICES)
def test_plans_are_reused_until_an_address_changes(device, monkeypatch: pytest.MonkeyPatch):
    """Validation and tables are built once per tensor set; new LR values reuse them."""
    if device == "cpu" and not INTERPRET:
        pytest.skip("with a GPU present, CPU tensors take the foreach path")
    built = []
    plan = kernels.masked_sgd._plan
    monkeypatch.setattr(kernels.masked_sgd, "_PLANS", {})
    monkeypatch.setattr(kernels.masked_sgd, "_plan", lambda *a: built.append(1) or plan(*a))
    ws, gs, bs, ms = _make(device, torch.float32, torch.float32, masked=True)
    for lr in (0.1, 0.2, torch.tensor(0.3, device=device)):
        kernels.masked_sgd_(ws, gs, bs, ms, lr=lr, momentum=0.9, weight_decay=0.0)
    assert len(built) == 1
    gs[1] = gs[1].clone()  # a new grad tensor, as after zero_grad(set_to_none=True)
    ref_ws, ref_bs = _clone(ws), _clone(bs)
    kernels.masked_sgd_(ws, gs, bs, ms, lr=0.1, momentum=0.9, weight_decay=0.0)
    masked_sgd_reference_(ref_ws, gs, ref_bs, ms, lr=0.1, momentum=0.9, weight_decay=0.0)
    assert len(built) == 2
    _assert_close(ws + bs, ref_ws + ref_bs, 2e-6)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool])
def test_torch_path_matches_reference(w_dtype, nesterov, mask_dtype):
    ws, gs, bs, ms = _make("cpu", w_dtype, w_dtype, masked=True)
    ms = [None if m is None else m.to(mask_dtype) for m in ms]
    ref_ws, ref_bs = _clone(ws), _clone(bs)
    scale = torch.tensor(8.0)
    for step in range(2):
        _new_grads(gs, seed=step)
        kw = dict(lr=torch.tensor(0.1 / (step + 1)), momentum=0.9, weight_decay=1e-2)
        kernels.masked_sgd_torch_(ws, gs, bs, ms, nesterov=nesterov, grad_scale=scale, **kw)
        masked_sgd_reference_(ref_ws, gs, ref_bs, ms, nesterov=nesterov, grad_scale=scale, **kw)
    _assert_close(ws + bs, ref_ws + ref_bs, 2e-6 if w_dtype == torch.float32 else 2**-7)


def test_dispatch_rule(monkeypatch: pytest.MonkeyPatch):
    """CPU tensors use the foreach path unless TRITON_INTERPRET=1."""
    calls = []
    monkeypatch.setattr(kernels, "masked_sgd_torch_", lambda *a, **k: calls.append("torch"))
    monkeypatch.setattr(
        kernels.masked_sgd, "masked_sgd_triton_", lambda *a, **k: calls.append("triton")
    )
    args = ([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [None])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels.masked_sgd_(*args, lr=0.1, momentum=0.9, weight_decay=0.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.masked_sgd_(*args, lr=0.1, momentum=0.9, weight_decay=0.0)
    assert calls == ["torch", "triton"]


def test_rejects_bad_masks():
    w = torch.zeros(3)
    with pytest.raises(TypeError):
        kernels.masked_sgd_([w], [w], [w], [torch.ones(3)], lr=0.1, momentum=0.9, weight_decay=0)
    with pytest.raises(ValueError):
        kernels.masked_sgd_(
            [w], [w], [w], [torch.ones(4, dtype=torch.bool)], lr=0.1, momentum=0.9, weight_decay=0
        )


@pytest.mark.skipif(not INTERPRET, reason="the Triton path on CPU tensors needs TRITON_INTERPRET=1")
def test_a_smaller_weight_at_a_cached_address_gets_a_new_plan():
    """A weight shrunk by filter pruning may land at a freed weight's address: the plan cached
    for the larger one must not update past its end."""
    bases = [torch.zeros(6000) for _ in range(4)]  # weight, grad, buffer, mask
    bases[3] = bases[3].bool() | True
    for n in (5000, 100):
        w, g, b, m = (t[:n] for t in bases)
        g.fill_(1.0)
        kernels.masked_sgd_([w], [g], [b], [m], lr=0.1, momentum=0.0, weight_decay=0.0)
    assert torch.all(bases[0][100:5000] == -0.1)  # the first step's alone
    assert torch.all(bases[0][:100] == -0.2)
