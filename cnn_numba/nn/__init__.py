"""Neural-network modules with PyTorch's names: ``Module``, ``Parameter``, containers,
layers, losses, and ``nn.init``. ``nn.functional`` is ``cnn_numba.functional``.

    import cnn_numba as cn
    from cnn_numba import nn
    cn.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 14 * 14, 10))
    loss = nn.CrossEntropyLoss()(model(images), labels)
    loss.backward()
"""
from .. import functional
from . import init, utils
from .layers import (
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, ChannelShuffle, Conv2d, ConvTranspose2d,
    CrossEntropyLoss, Dropout, Flatten, Linear, MaxPool2d, MaxUnpool2d, MSELoss, ReLU, Sigmoid, Tanh,
)
from .module import Identity, Module, ModuleList, Parameter, Sequential

__all__ = [
    "functional", "init", "utils", "Module", "Parameter", "Sequential", "ModuleList", "Identity",
    "Conv2d", "ConvTranspose2d", "MaxPool2d", "MaxUnpool2d", "AvgPool2d", "AdaptiveAvgPool2d",
    "BatchNorm2d", "BatchNorm1d", "ReLU", "Sigmoid", "Tanh", "Linear", "Flatten", "Dropout",
    "ChannelShuffle", "CrossEntropyLoss", "MSELoss",
]
from .extra import (  # noqa: E402  (reference-model layers)
    LENET5_C3_TABLE, BasicBlock, Bottleneck, ConnectionTableConv2d, DepthwiseSeparableConv2d, InceptionBlock,
    ScaledTanh, SpatiallySeparableConv2d, Subsampling2d,
)

__all__ += [
    "Subsampling2d", "ConnectionTableConv2d", "ScaledTanh", "BasicBlock", "Bottleneck", "DepthwiseSeparableConv2d",
    "SpatiallySeparableConv2d", "InceptionBlock",
]
