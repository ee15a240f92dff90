"""Top-1 / top-5 accuracy and loss over the validation set, summed across ranks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from engine.distributed import Dist


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    dist: Dist,
    amp_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Every val image counts once over all ranks (the loader shards without padding).
    Counts accumulate on the device; the one host sync is the final read."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    for images, labels in batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        totals[:3] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), loss]).to(totals)
        totals[3] += labels.numel()
    dist.all_reduce_sum(totals)
    model.train(was_training)
    top1, top5, loss_sum, count = totals.tolist()  # host sync: once per evaluation
    count = max(count, 1.0)
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss_sum / count}
