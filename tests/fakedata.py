"""Tiny datasets in the real on-disk formats (the writers live in runner.sample_files)."""
from runner.sample_files import class_images, idx_bytes, write_cifar10, write_mnist  # noqa: F401
