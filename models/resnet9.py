"""A ResNet-9 in the style of the fast CIFAR-10 records: conv-BN-ReLU blocks, two residual stages."""
import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, in_shape=(3, 32, 32), num_classes=10, width: int = 64, logit_scale: float = 0.125):
        super().__init__()
        c = in_shape[0]
        self.net = nn.Sequential(
            conv_bn(c, width),
            conv_bn(width, 2 * width, pool=True), Residual(2 * width),
            conv_bn(2 * width, 4 * width, pool=True),
            conv_bn(4 * width, 8 * width, pool=True), Residual(8 * width),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(8 * width, num_classes, bias=False),
        )
        # Scaling the logits down keeps early training stable at the high learning rates these nets use.
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.logit_scale
