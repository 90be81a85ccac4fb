"""Temporary re-exports for actors/offline.py until it imports actors/training/ itself (issue 17, item 2)."""

from actors.training.engine import TrainEngine, build_engine, save_hf
from actors.training.update import accumulate_update, mean_metrics
from pipeline.batches import to_device

__all__ = ["TrainEngine", "accumulate_update", "build_engine", "mean_metrics", "save_hf", "to_device"]
