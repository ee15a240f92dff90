"""Prune ImageNet ResNet-50 (and smaller CNNs) and retrain it with the schedules the pruning
literature compares. Entry point: `python -m engine.run RECIPE.yaml`."""

from engine.checkpoint import load_model

__all__ = ["load_model"]
