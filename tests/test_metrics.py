"""Evaluation metrics (runner/metrics.py). Exactness across ranks is tested in tests/test_distributed.py.
"""
from __future__ import annotations

import torch

from runner.metrics import Evaluator


def test_top5_accuracy_is_not_merged_with_top1():
    """A first batch that is all correct must not tie top-5 to top-1 for the rest of the evaluation."""
    import contextlib

    logits = torch.tensor([[9.0, 1, 0, 0, 0, 0, 0, 0, 0, 0]] * 4 + [[0.0, 9, 8, 7, 6, 5, 0, 0, 0, 0]] * 4)
    labels = torch.tensor([0] * 4 + [3] * 4)  # second half: top-1 wrong, top-5 right
    model = torch.nn.Identity()
    batches = [(logits[:4], labels[:4]), (logits[4:], labels[4:])]
    results = Evaluator(10, "cpu").run(model, batches, contextlib.nullcontext)
    assert results["accuracy"] == 0.5 and results["top5_accuracy"] == 1.0 and results["samples"] == 8

