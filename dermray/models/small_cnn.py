"""A plain small CNN for low-resolution inputs (DermaMNIST's 28 px), where ImageNet backbones waste their depth:
four blocks of two 3x3 conv + BatchNorm + ReLU, max-pooling between blocks, global average pooling, dropout and
a linear classifier (``fc``, replaced for N classes like every registry head). No ImageNet weights exist for it."""

from __future__ import annotations

from torch import nn


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 1000, width: int = 32, dropout: float = 0.3):
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        channels = 3
        for i, out in enumerate(widths):
            layers.append(_block(channels, out))
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))  # 28 -> 14 -> 7 -> 3
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))
