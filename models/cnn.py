from torch import nn


class SimpleCNN(nn.Module):
    """The tutorial's SimpleCNN, corrected.

    Two conv+pool stages halve the image twice, so fc1 takes 64 * (H/4) * (W/4) features: 64*8*8 for
    CIFAR's 32x32 (the tutorial's 64*6*6 was wrong) and 64*7*7 for MNIST's 28x28.
    """

    def __init__(self, in_shape=(3, 32, 32), num_classes=10, width: int = 32, hidden: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(2 * width * (h // 4) * (w // 4), hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.fc2(self.dropout(self.fc1(x).relu()))
