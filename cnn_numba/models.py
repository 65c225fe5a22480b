"""Reference models built from cnn_numba.nn (docs/networks.md).

    lenet5()                  modern LeNet-5 (ReLU, max pooling), (N, 1, 28, 28)
    lenet5(classic=True)      LeCun 1998: trainable subsampling, C3 connection table, scaled tanh
    resnet8/14/20, resnet()   He et al.'s CIFAR ResNets (depth 6n+2), BasicBlock or Bottleneck
    mobilenet_small()         depthwise-separable convolutions
    inception_small()         two Inception modules

Every builder returns a ``Network``: a Sequential that checks its input's shape first, so a
wrong image size fails with the shape the model expects instead of deep inside a layer.
``cnn_numba.summary(model, (C, H, W))`` tabulates any of them.
"""
from __future__ import annotations

from collections import OrderedDict

from . import nn


class Network(nn.Sequential):
    """A Sequential for images (N, C, H, W) that checks its input against ``input_shape``
    (C, H, W), where None leaves a dimension free. Children, names and state_dict are those of
    the Sequential."""

    def __init__(self, layers: OrderedDict, input_shape: tuple, name: str = "model"):
        super().__init__(layers)
        self.input_shape, self.name = tuple(input_shape), name

    def expected_shape(self) -> str:
        names = ("C", "H", "W")
        return "(N, " + ", ".join(names[i] if v is None else str(v) for i, v in enumerate(self.input_shape)) + ")"

    def forward(self, x):
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 1 + len(self.input_shape) or any(
                v is not None and s != v for s, v in zip(shape[1:], self.input_shape)):
            raise ValueError(f"{self.name} expects input of shape {self.expected_shape()}, got {shape}")
        return super().forward(x)


def lenet5(num_classes: int = 10, classic: bool = False) -> Network:
    """The common modern LeNet-5 (docs/networks.md) for (N, 1, 28, 28) images: ReLU instead of
    sigmoid squashing, max pooling instead of trainable subsampling, C3 fully connected to S2,
    and logits for softmax instead of RBF units. 61,706 parameters with 10 classes.

        conv1  1 -> 6, 5x5, padding 2     (N, 6, 28, 28)     156
        pool1  max 2x2                    (N, 6, 14, 14)
        conv2  6 -> 16, 5x5               (N, 16, 10, 10)    2,416
        pool2  max 2x2                    (N, 16, 5, 5)
        fc1    400 -> 120                 (N, 120)           48,120   (C5 of the original)
        fc2    120 -> 84                  (N, 84)            10,164   (F6)
        fc3    84 -> num_classes          (N, num_classes)   850

    ``classic=True`` gives LeCun's original instead (``lenet5_classic``).
    """
    if classic:
        return lenet5_classic(num_classes)
    return Network(OrderedDict([
        ("conv1", nn.Conv2d(1, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 5 * 5, 120)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes)),
    ]), (1, 28, 28), "lenet5")



def lenet5_classic(num_classes: int = 10) -> Network:
    """LeNet-5 as LeCun et al. (1998) tabulate it (docs/networks.md), for (N, 1, 28, 28) MNIST
    images: C1 pads by 2, which is the paper's 32x32 input. Squashing after the S-layers
    (sigmoid, as the S-layers are described) and after C5 and F6 (LeCun's 1.7159 tanh(2x/3));
    a linear 10-way head replaces the RBF output units.

        layer           output         trainable params   connections
        c1  conv 5x5    (6, 28, 28)    156                122,304
        s2  subsample   (6, 14, 14)    12                 5,880
        c3  conv 5x5    (16, 10, 10)   1,516              151,600    (connection table: 60 of 96)
        s4  subsample   (16, 5, 5)     32                 2,000
        c5  conv 5x5    (120, 1, 1)    48,120             48,120
        f6  linear      (84,)          10,164             10,164
        output linear   (num_classes,) 850

    C3's masked weights are stored (as zeros, with zero gradients) but are not parameters.
    """
    return Network(OrderedDict([
        ("c1", nn.Conv2d(1, 6, 5, padding=2)),
        ("s2", nn.Subsampling2d(6, 2)), ("s2_act", nn.Sigmoid()),
        ("c3", nn.ConnectionTableConv2d(6, 16, 5, nn.LENET5_C3_TABLE)),
        ("s4", nn.Subsampling2d(16, 2)), ("s4_act", nn.Sigmoid()),
        ("c5", nn.Conv2d(16, 120, 5)), ("c5_act", nn.ScaledTanh()),
        ("flatten", nn.Flatten()),
        ("f6", nn.Linear(120, 84)), ("f6_act", nn.ScaledTanh()),
        ("output", nn.Linear(84, num_classes)),
    ]), (1, 28, 28), "lenet5(classic=True)")


# ----------------------------------------------------------------------------- ResNet (He et al. 2015, CIFAR design)

def resnet(depth, block=nn.BasicBlock, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64),
           name: str | None = None) -> Network:
    """A CIFAR-style ResNet: 3x3 stem conv to ``widths[0]`` + BN + ReLU, one stage of blocks per
    width (stride 2 at the first block of every stage after the first, where a 1x1 strided
    projection + BN makes the shortcut), global average pooling, a linear head.

    ``depth``: an int, 6n+2 for BasicBlock (n blocks per stage; 8, 14, 20, 32, ...) or 9n+2 for
    Bottleneck, or a sequence of blocks per stage such as (1, 1, 1). A Bottleneck stage of width
    w outputs 4w channels. Any H, W; (N, in_channels, H, W) -> (N, num_classes).
    """
    widths = tuple(int(w) for w in widths)
    layers_per_block = 2 if block.expansion == 1 else 3
    if isinstance(depth, int):
        per_stage = layers_per_block * len(widths)
        if depth < per_stage + 2 or (depth - 2) % per_stage:
            raise ValueError(f"resnet: depth={depth} with {block.__name__} must be {per_stage}n+2 "
                             f"(n >= 1 blocks per stage), e.g. {per_stage + 2}, {2 * per_stage + 2}")
        blocks = ((depth - 2) // per_stage,) * len(widths)
    else:
        blocks = tuple(int(b) for b in depth)
        if len(blocks) != len(widths) or min(blocks) < 1:
            raise ValueError(f"resnet: blocks={tuple(depth)} needs one count >= 1 per stage of widths={widths}")
    layers = OrderedDict([
        ("conv1", nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(widths[0])), ("relu", nn.ReLU()),
    ])
    planes = widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
        stage = []
        for j in range(n):
            stage.append(block(planes, w, 2 if i > 0 and j == 0 else 1))
            planes = w * block.expansion
        layers[f"layer{i + 1}"] = nn.Sequential(*stage)
    layers.update([("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                   ("fc", nn.Linear(planes, num_classes))])
    model = Network(layers, (in_channels, None, None),
                    name or f"resnet{2 + layers_per_block * sum(blocks)}")
    for m in model.modules():  # He initialisation, as torchvision does
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def resnet8(in_channels: int = 1, num_classes: int = 10) -> Network:
    """ResNet-8: one BasicBlock per stage, 78,042 parameters with 10 classes and 3 channels."""
    return resnet(8, nn.BasicBlock, in_channels, num_classes)


def resnet14(in_channels: int = 1, num_classes: int = 10) -> Network:
    """ResNet-14: two BasicBlocks per stage."""
    return resnet(14, nn.BasicBlock, in_channels, num_classes)


def resnet20(in_channels: int = 1, num_classes: int = 10) -> Network:
    """ResNet-20: three BasicBlocks per stage, 272,474 parameters with 10 classes and 3 channels
    (He et al.: 0.27M)."""
    return resnet(20, nn.BasicBlock, in_channels, num_classes)


# ----------------------------------------------------------------------------- MobileNet- and Inception-style

def mobilenet_small(in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64, 128)) -> Network:
    """A small MobileNet: a 3x3 stem conv to widths[0] + BN + ReLU, then depthwise-separable
    units to each further width, stride 2 at every other unit (28 -> 14 -> 7), global average
    pooling, a linear head. Any H, W."""
    layers = OrderedDict([
        ("conv1", nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(widths[0])), ("relu", nn.ReLU()),
    ])
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers[f"ds{i + 1}"] = nn.DepthwiseSeparableConv2d(a, b, 3, stride=2 if i % 2 else 1)
    layers.update([("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                   ("fc", nn.Linear(widths[-1], num_classes))])
    return Network(layers, (in_channels, None, None), "mobilenet_small")


def inception_small(in_channels: int = 1, num_classes: int = 10, width: int = 8) -> Network:
    """Two Inception modules: a 3x3 stem conv to 2w + ReLU, 2x2 max pool, Inception to 5w
    channels, 2x2 max pool, Inception to 8w channels, global average pooling, a linear head
    (w = ``width``, even). Any H, W of at least 4."""
    w, h = width, max(width // 2, 1)
    layers = OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 2 * w, 3, padding=1)), ("relu", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("inception1", nn.InceptionBlock(2 * w, w, w, 2 * w, h, w, w)),          # -> 5w
        ("pool2", nn.MaxPool2d(2)),
        ("inception2", nn.InceptionBlock(5 * w, 2 * w, 2 * w, 3 * w, h, 2 * w, w)),  # -> 8w
        ("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(8 * w, num_classes)),
    ])
    return Network(layers, (in_channels, None, None), "inception_small")


# Builders by name, for command lines and configuration files.
MODELS = {
    "lenet5": lenet5, "lenet5_classic": lenet5_classic, "resnet8": resnet8, "resnet14": resnet14,
    "resnet20": resnet20, "mobilenet_small": mobilenet_small, "inception_small": inception_small,
}

__all__ = ["Network", "lenet5", "lenet5_classic", "resnet", "resnet8", "resnet14", "resnet20", "mobilenet_small",
           "inception_small", "MODELS"]
