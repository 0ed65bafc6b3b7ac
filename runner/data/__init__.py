"""Data: what a run trains and evaluates on, and how it reaches the device.

- splits.py: the `data` config section, the splits and the run's data card (data.json)
- order.py: which samples each step sees
- batches.py: the two paths that bring a step's samples to the device
- datasets.py: reading and checking dataset files
- folder.py: a folder of the user's own images and its cache
- identity.py: the data's identity, part of a run's fingerprint

Nothing is imported here: the config check imports splits.DataConfig, and must not import torch.
"""
