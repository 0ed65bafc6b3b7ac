"""The plan (runner/plan.py): the one-line errors for batch sizes that do not divide."""
from __future__ import annotations

from tests.util import error_line


def test_global_batch_that_does_not_divide(train_main):
    result = train_main(["--config", "digits", "train.global_batch_size=100", "train.micro_batch_size=32"])
    line = error_line(result)
    assert "train.global_batch_size=100" in line and "train.micro_batch_size=32" in line
    lower = 100 // 32 * 32
    assert f"{lower} or {lower + 32}" in line  # the nearest valid global batches: 96 or 128
    divisors = [m for m in range(1, 101) if 100 % m == 0]
    assert str(divisors[-4:]) in line          # micro batches that do divide 100
    assert not result.run_root.exists()


def test_accumulation_that_contradicts_the_global_batch(train_main):
    line = error_line(train_main(["--config", "digits", "train.global_batch_size=64",
                                  "train.micro_batch_size=16", "train.gradient_accumulation_steps=2"]))
    assert "train.gradient_accumulation_steps=2" in line and "4" in line
