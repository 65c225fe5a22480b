"""Reference models built from cnn_numba.nn."""
from __future__ import annotations

from collections import OrderedDict

from . import nn


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """The common modern LeNet-5 (SPEC.md section 4) for (N, 1, 28, 28) images: ReLU instead of
    sigmoid squashing, max pooling instead of trainable subsampling, C3 fully connected to S2,
    and logits for softmax instead of RBF units. 61,706 parameters with 10 classes.

        conv1  1 -> 6, 5x5, padding 2     (N, 6, 28, 28)     156
        pool1  max 2x2                    (N, 6, 14, 14)
        conv2  6 -> 16, 5x5               (N, 16, 10, 10)    2,416
        pool2  max 2x2                    (N, 16, 5, 5)
        fc1    400 -> 120                 (N, 120)           48,120   (C5 of the original)
        fc2    120 -> 84                  (N, 84)            10,164   (F6)
        fc3    84 -> num_classes          (N, num_classes)   850
    """
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 5 * 5, 120)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes)),
    ]))


__all__ = ["lenet5"]
