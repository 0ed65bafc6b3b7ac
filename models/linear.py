from torch import nn


class LinearClassifier(nn.Module):
    """The tutorial's one-layer net: flatten, then one Linear (784 -> 10 for MNIST)."""

    def __init__(self, in_shape=(1, 28, 28), num_classes=10, in_features: int | None = None):
        super().__init__()
        c, h, w = in_shape
        self.fc = nn.Linear(in_features or c * h * w, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
