"""The model zoo: the built-in models, by name.

Every built-in model takes the data's `in_shape` (C, H, W) and `num_classes` and sizes itself; a kwarg
such as `in_features` pins a size so that a mismatched dataset is caught before training.

A built-in name stands for where its class lives, written as a user's own model is (`module:Class`): the
config check reads these names without importing torch, and runner/model.py imports and builds the class.
"""

REGISTRY: dict[str, str] = {
    "linear": "models.linear:LinearClassifier",
    "simple_cnn": "models.cnn:SimpleCNN",
    "resnet9": "models.resnet9:ResNet9",
}
