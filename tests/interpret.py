"""Triton kernels in tests: without a GPU they run on CPU tensors in Triton's interpreter."""

import importlib
import os
from types import ModuleType

import pytest
import torch

INTERPRET = not torch.cuda.is_available()


def import_kernels(name: str) -> ModuleType:
    """Import the kernel module `name` with the interpreter chosen, as it must be when its
    @triton.jit functions are made (no GPU only), then restore TRITON_INTERPRET so that other
    test modules keep the CPU paths of the engine's dispatchers."""
    saved = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(name)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET=1 while a test runs (no GPU only): the dispatchers send CPU tensors to
    the kernels. Use with `pytestmark = pytest.mark.usefixtures("interpreted")`."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
