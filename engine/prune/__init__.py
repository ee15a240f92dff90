"""Pruning library (DESIGN.md "Pruning"): unstructured masks, structured filter pruning with
model surgery, FLOP counting and reports. The stage runner and optimizer call into it."""

from engine.prune.flops import count_flops
from engine.prune.masks import (
    UNSTRUCTURED,
    apply_masks_,
    prunable_weights,
    torch_reference_masks,
    unstructured_masks,
)
from engine.prune.report import format_table, report
from engine.prune.settings import SETTINGS
from engine.prune.structured import (
    STRUCTURED,
    remove_filters_,
    select_filters,
    structured_prune_,
)
from engine.prune.surgery import resize_to

__all__ = [
    "SETTINGS",
    "STRUCTURED",
    "UNSTRUCTURED",
    "apply_masks_",
    "count_flops",
    "format_table",
    "prunable_weights",
    "remove_filters_",
    "report",
    "resize_to",
    "select_filters",
    "structured_prune_",
    "torch_reference_masks",
    "unstructured_masks",
]
