"""Data: what a run trains and evaluates on, and how it reaches the device.

- splits.py: the `data` config section, the splits and the run's data card (data.json)
- order.py: which samples each step sees
- batches.py: the two paths that bring a step's samples to the device
- datasets.py: reading and checking dataset files
- folder.py: a folder of the user's own images as splits: scanned, then loaded from its cache
- folder_scan.py: the folder's class folders and image files
- images.py: image files decoded to pixels
- folder_cache.py: the folder's decoded pixels and decisions, cached and checked when read back
- identity.py: the data's identity, part of a run's fingerprint

Nothing is imported here: the config check imports splits.DataConfig, and must not import torch.
"""
