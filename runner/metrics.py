"""Evaluation with torchmetrics, reduced across ranks exactly.

Each rank evaluates a disjoint contiguous shard of the split (shards may differ in size by one sample), so
no padded duplicate is ever fed to a metric. torchmetrics then sums its count states across ranks once, at
compute(): the result equals a single-process evaluation. Loss is summed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from runner.config import setting

MONITORABLE = ["accuracy", "loss", "top5_accuracy", "precision", "recall", "f1"]


@dataclass
class EvalConfig:
    every_epochs: int = setting(1, min=0)        # evaluate after every N epochs (0: only at the end)
    every_steps: int = setting(0, min=0)         # and/or every N optimizer steps
    batch_size: int = setting(256, min=1)        # per device
    monitor: str = setting("accuracy", choices=MONITORABLE)   # for the best checkpoint and early stopping
    patience: int = setting(0, min=0)            # early stopping after N evaluations without improvement
    min_delta: float = setting(0.0, min=0.0)

    @property
    def mode(self) -> str:
        return "min" if self.monitor == "loss" else "max"

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


class Evaluator:
    def __init__(self, num_classes: int, device, confusion: bool = False):
        top_k = min(5, num_classes)
        metrics = {
            "accuracy": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5_accuracy": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        if confusion:
            metrics["confusion_matrix"] = MulticlassConfusionMatrix(num_classes)
        # compute_groups would merge top-1 and top-5 accuracy into one state whenever their first updates
        # agree, and then report top-1 as top-5.
        self.metrics = MetricCollection(metrics, compute_groups=False).to(device)
        self.loss = MeanMetric().to(device).set_dtype(torch.float64)
        self.count = SumMetric().to(device).set_dtype(torch.float64)

    @torch.no_grad()
    def run(self, model, batches, autocast) -> dict:
        """`model` must be the unwrapped module: a DDP forward could issue collectives, and shards differ
        in length. Every rank must call this, since compute() sums the states across ranks."""
        was_training = model.training
        model.eval()
        self.metrics.reset()
        self.loss.reset()
        self.count.reset()
        for x, y in batches:
            with autocast():
                logits = model(x)
            logits = logits.float()
            self.loss.update(F.cross_entropy(logits, y, reduction="none"))
            self.metrics.update(logits, y)
            self.count.update(len(y))
        results = {k: v.tolist() if v.ndim else float(v) for k, v in self.metrics.compute().items()}
        results["loss"] = float(self.loss.compute())
        results["samples"] = int(self.count.compute())
        model.train(was_training)
        return results
