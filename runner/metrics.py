"""Evaluation with torchmetrics, reduced across ranks exactly.

Each rank evaluates a disjoint contiguous shard of the split (shards may differ in size by one sample), so
no padded duplicate is ever fed to a metric. torchmetrics then sums its count states across ranks once, at
compute(): the result equals a single-process evaluation. Loss is summed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

from runner.config import setting
from runner.errors import ConfigError, UserError, shown
from runner.state import due

METRICS = ["accuracy", "loss", "top5_accuracy", "precision", "recall", "f1"]
# ema_*: the same metrics of the weights' moving average (train.ema_decay > 0), evaluated beside the weights.
MONITORABLE = METRICS + [f"ema_{name}" for name in METRICS]
AUTO = "auto"
AUTO_START = 1024  # eval.batch_size=auto starts here (no gradients are held) and halves when memory runs out


@dataclass
class EvalConfig:
    every_epochs: int = setting(1, min=0)        # evaluate after every N epochs (0: only at the end)
    every_steps: int = setting(0, min=0)         # and/or every N optimizer steps
    batch_size: int | str = setting(256)         # per device (auto: starts at 1024, halves on out-of-memory)
    monitor: str = setting("accuracy", choices=MONITORABLE)   # for the best checkpoint and early stopping
    patience: int = setting(0, min=0)            # early stopping after N evaluations without improvement
    min_delta: float = setting(0.0, min=0.0)

    @property
    def mode(self) -> str:
        return "min" if self.monitor.endswith("loss") else "max"

    @property
    def start_batch(self) -> int:
        return AUTO_START if self.batch_size == AUTO else self.batch_size

    def validate(self):
        size = self.batch_size
        if (isinstance(size, str) and size != AUTO) or (isinstance(size, int) and size < 1):
            raise ConfigError(f"eval.batch_size={shown(size)}: expected an integer >= 1 or {AUTO}")


@dataclass
class EvalBatch:
    """The evaluation batch as it stands: under eval.batch_size=auto it halves when memory runs out and
    stays halved for later evaluations (results do not depend on it: each rank's shard is the same)."""
    size: int
    auto: bool = False

    @classmethod
    def of(cls, cfg: EvalConfig) -> "EvalBatch":
        return cls(cfg.start_batch, cfg.batch_size == AUTO)


class Validation:
    """Evaluation of a run: on the held-out split when it is due, and on any split at the end. The
    torchmetrics evaluator is built at the first evaluation: torchmetrics takes seconds to import."""

    def __init__(self, cfg: EvalConfig, ctx, batches, splits, ema):
        self.cfg, self.acc, self.plan, self.batches, self.ema = cfg, ctx.acc, ctx.plan, batches, ema
        self.split, self.split_name = splits.eval, splits.eval_split
        self.num_classes, self.class_names = splits.num_classes, splits.class_names
        self.evaluator: Evaluator | None = None
        self.batch = EvalBatch.of(cfg)
        self.log = ctx.log
        self.last: dict = {}
        self.last_step = -1

    def due(self, step: int, epoch: int, epoch_done: bool) -> bool:
        return due(self.cfg.every_steps, self.cfg.every_epochs, step, epoch, epoch_done)

    def held_out(self, model, step: int) -> dict:
        """The held-out split at this step (remembered: the final evaluation reuses it)."""
        self.last, self.last_step = self.evaluate(model, self.split), step
        return self.last

    def evaluate(self, model, split) -> dict:
        """The model's metrics on `split`; with an EMA, those of the average too, as ema_<metric>."""
        if self.evaluator is None:
            self.evaluator = Evaluator(self.num_classes, self.acc.device)
        metrics = self.evaluate_weights(model, split)
        if self.ema.enabled:
            averaged = self.evaluate_weights(self.ema.module, split)
            metrics.update({f"ema_{name}": averaged[name] for name in METRICS})
        return metrics

    def evaluate_weights(self, model, split) -> dict:
        tried = self.batch.size
        metrics = evaluate_split(self.evaluator, model, self.batches, split, self.acc, self.batch,
                                 self.plan.eval_samples(len(split)))
        if self.batch.size != tried:
            self.log.info(f"out of memory evaluating at batch {tried}: eval batch {self.batch.size} from now on")
        metrics["per_class"] = per_class(metrics, self.class_names)
        return metrics


class Evaluator:
    def __init__(self, num_classes: int, device, confusion: bool = False):
        # Imported here: torchmetrics pulls in scipy and torch._dynamo, seconds that --help should not pay.
        import torch
        from torchmetrics import MeanMetric, MetricCollection, SumMetric
        from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix,
                                                 MulticlassF1Score, MulticlassPrecision, MulticlassRecall)

        top_k = min(5, num_classes)
        metrics = {
            "accuracy": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5_accuracy": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "per_class_recall": MulticlassRecall(num_classes, average=None),
            "per_class_precision": MulticlassPrecision(num_classes, average=None),
        }
        if confusion:
            metrics["confusion_matrix"] = MulticlassConfusionMatrix(num_classes)
        # compute_groups would merge top-1 and top-5 accuracy into one state whenever their first updates
        # agree, and then report top-1 as top-5.
        self.metrics = MetricCollection(metrics, compute_groups=False).to(device)
        self.loss = MeanMetric().to(device).set_dtype(torch.float64)
        self.count = SumMetric().to(device).set_dtype(torch.float64)

    def run(self, model, batches, autocast) -> dict:
        """`model` must be the unwrapped module: a DDP forward could issue collectives, and shards differ
        in length. Every rank must call this, since compute() sums the states across ranks."""
        import torch
        import torch.nn.functional as F

        was_training = model.training
        model.eval()
        for metric in (self.metrics, self.loss, self.count):
            metric.reset()
        try:
            with torch.no_grad():
                for x, y in batches:
                    with autocast():
                        logits = model(x)
                    logits = logits.float()
                    self.loss.update(F.cross_entropy(logits, y, reduction="none"))
                    self.metrics.update(logits, y)
                    self.count.update(len(y))
        finally:  # an out-of-memory error in a batch must not leave a training model in eval mode
            model.train(was_training)
        results = {k: v.tolist() if v.ndim else float(v) for k, v in self.metrics.compute().items()}
        results["loss"] = float(self.loss.compute())
        results["samples"] = int(self.count.compute())
        return results


def evaluate_split(evaluator: Evaluator, model, batches, split, acc, batch: EvalBatch, samples: int) -> dict:
    """This rank's disjoint shard of the first `samples` of `split`; metrics come back reduced. Under
    eval.batch_size=auto a rank that runs out of memory evaluates its shard again at half the batch: no
    collective runs before compute(), so the other ranks simply wait for it there."""
    import torch

    from runner.data.order import shard_range
    from runner.memory import is_out_of_memory, release_cached_memory

    shard = shard_range(samples, acc.num_processes, acc.process_index)
    index = torch.arange(shard.start, shard.stop)
    while True:
        try:
            return evaluator.run(acc.unwrap_model(model), batches.eval_batches(split, index, batch.size),
                                 acc.autocast)
        except RuntimeError as e:
            if not (batch.auto and is_out_of_memory(e)):
                raise
            if batch.size == 1:
                raise UserError(f"out of memory evaluating one sample at a time on rank {acc.process_index} "
                                f"(eval.batch_size=auto): the model does not fit for evaluation") from None
        release_cached_memory(acc.device)  # outside the except block: its traceback held the activations
        batch.size //= 2


def per_class(results: dict, class_names: list[str]) -> dict:
    """Move the per-class lists out of `results` into {class name: {recall, precision}} (per-class
    accuracy is the per-class recall)."""
    recall, precision = results.pop("per_class_recall"), results.pop("per_class_precision")
    return {name: {"recall": r, "precision": p} for name, r, p in zip(class_names, recall, precision)}
