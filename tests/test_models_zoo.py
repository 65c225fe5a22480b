"""The reference models of models.py and their layers (nn/extra.py): structure and the
docs/networks.md counts taken from built modules, output shapes, a whole-model float64 gradient check
against central finite differences for a tiny version of every model, the C3 connection mask,
SGD steps that lower the loss, and input-shape errors."""
from __future__ import annotations

import numpy as np
import pytest

import cnn_numba as cn
from cnn_numba import models, nn, optim

import reference as ref


def conv_weights(*modules):
    """Conv weight entries (no bias, no BN) in the given module trees."""
    return sum(m.weight.size for top in modules for m in top.modules() if isinstance(m, nn.Conv2d))


def images(shape, seed=0, dtype=np.float32):
    return cn.tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


# ----------------------------------------------------------------------------- structure and counts

def test_lenet5_classic_c3_connection_table_is_lecuns():
    sizes = [len(s) for s in nn.LENET5_C3_TABLE]
    assert sizes == [3] * 6 + [4] * 9 + [6]
    adjacent = [all((s[i] + 1) % 6 == s[i + 1] for i in range(len(s) - 1)) for s in nn.LENET5_C3_TABLE]
    assert adjacent[:12] == [True] * 12 and adjacent[12:15] == [False] * 3  # 6 + 6 adjacent, 3 not
    # Every S2 map feeds 10 of the 16 C3 maps (the rows of LeCun's Table I).
    assert [sum(i in s for s in nn.LENET5_C3_TABLE) for i in range(6)] == [10] * 6
    cn.manual_seed(0)
    c3 = models.lenet5(classic=True).c3
    mask = c3.weight_mask.numpy()[:, :, 0, 0]
    assert mask.sum() == 60 and mask.shape == (16, 6)
    w = c3.weight.numpy()
    assert np.all(w[mask == 0] == 0) and np.all(w[mask == 1] != 0)
    assert c3.bias.size == 16 and int(mask.sum()) * 25 + 16 == 1516


def test_lenet5_default_is_still_the_modern_one():
    m = models.lenet5()
    assert [k for k, _ in m.named_children()][:3] == ["conv1", "relu1", "pool1"]
    assert sum(p.size for p in m.parameters()) == 61706


def test_inception_3a_conv_weights_from_built_modules():
    # docs/networks.md: the three conv branches, no bias, pool branch not counted.
    with_red = nn.InceptionBlock(192, 64, 96, 128, 16, 32, 32, bias=False)
    without = nn.InceptionBlock(192, 64, None, 128, None, 32, 32, bias=False)
    assert conv_weights(with_red.branch1, with_red.branch2, with_red.branch3) == 157184
    assert conv_weights(without.branch1, without.branch2, without.branch3) == 387072
    assert with_red.out_channels == 256 and without.out_channels == 256
    y = with_red(images((1, 192, 3, 3)))
    assert y.shape == (1, 256, 3, 3)


def test_resnet_block_conv_weights_from_built_modules():
    assert conv_weights(nn.BasicBlock(64, 64)) == 73728
    assert conv_weights(nn.BasicBlock(256, 256)) == 1179648
    bottleneck = nn.Bottleneck(256, 64)
    assert bottleneck.downsample is None and conv_weights(bottleneck) == 69632
    # Shape changes bring a 1x1 strided projection + BN; the convs carry no bias (BN follows).
    down = nn.BasicBlock(16, 32, stride=2)
    assert isinstance(down.downsample[0], nn.Conv2d) and down.downsample[0].kernel_size == (1, 1)
    assert all(m.bias is None for m in down.modules() if isinstance(m, nn.Conv2d))
    assert down(images((2, 16, 7, 7))).shape == (2, 32, 4, 4)
    assert nn.Bottleneck(16, 8, stride=2)(images((2, 16, 8, 8))).shape == (2, 32, 4, 4)


@pytest.mark.parametrize("depth, n", [(8, 1), (14, 2), (20, 3)])
def test_resnet_depths_have_6n_plus_2_weighted_layers(depth, n):
    m = getattr(models, f"resnet{depth}")(in_channels=3)
    convs = [k for k, v in m.named_modules() if isinstance(v, nn.Conv2d) and "downsample" not in k]
    assert len(convs) + 1 == depth                       # + the linear head
    assert [len(m.layer1), len(m.layer2), len(m.layer3)] == [n] * 3
    assert m.layer2[0].conv1.stride == 2 and m.layer3[0].conv1.stride == 2 and m.layer1[0].downsample is None
    if depth == 20:  # He et al.: 0.27M parameters
        assert sum(p.size for p in m.parameters()) == 272474
    with pytest.raises(ValueError, match="6n\\+2"):
        models.resnet(depth + 1)


def test_depthwise_separable_cost_ratio():
    ds = nn.DepthwiseSeparableConv2d(8, 16, 3)
    full = 3 * 3 * 8 * 16
    assert ds.depthwise.groups == 8 and conv_weights(ds) == 3 * 3 * 8 + 8 * 16
    assert conv_weights(ds) / full == pytest.approx(1 / 16 + 1 / 9)
    assert nn.DepthwiseSeparableConv2d(4, 6, 3, stride=2)(images((2, 4, 9, 9))).shape == (2, 6, 5, 5)


def test_spatially_separable_is_the_outer_product_kernel():
    layer = nn.SpatiallySeparableConv2d(1, 1, 3, bias=False).double()
    col, row = np.array([1.0, 2.0, 1.0]), np.array([1.0, 0.0, -1.0])      # Sobel
    nn.init._assign(layer.vertical.weight, col.reshape(1, 1, 3, 1))
    nn.init._assign(layer.horizontal.weight, row.reshape(1, 1, 1, 3))
    x = np.random.default_rng(1).standard_normal((2, 1, 7, 6))
    got = layer(cn.tensor(x)).numpy()
    np.testing.assert_allclose(got, ref.conv2d(x, np.outer(col, row).reshape(1, 1, 3, 3), padding=1), atol=1e-12)
    assert conv_weights(layer) == 6
    assert nn.SpatiallySeparableConv2d(3, 5, 5, stride=2)(images((1, 3, 9, 8))).shape == (1, 5, 5, 4)


def test_subsampling_and_connection_table_conv_match_their_definitions():
    r = np.random.default_rng(2)
    s = nn.Subsampling2d(3).double()
    nn.init._assign(s.weight, r.standard_normal(3))
    nn.init._assign(s.bias, r.standard_normal(3))
    x = r.standard_normal((2, 3, 6, 5))
    sums = x[:, :, :6, :4].reshape(2, 3, 3, 2, 2, 2).sum(axis=(3, 5))        # 2x2 windows, floor
    expect = sums * s.weight.numpy()[None, :, None, None] + s.bias.numpy()[None, :, None, None]
    np.testing.assert_allclose(s(cn.tensor(x)).numpy(), expect, atol=1e-12)

    table = [(0,), (1, 2), (0, 1, 2)]
    c = nn.ConnectionTableConv2d(3, 3, 3, table, padding=1).double()
    mask = np.zeros((3, 3, 1, 1))
    for o, ins in enumerate(table):
        mask[o, list(ins)] = 1
    w = c.weight.numpy()
    np.testing.assert_array_equal(w, w * mask)           # masked taps start at zero
    nn.init._assign(c.weight, r.standard_normal(w.shape))  # even a non-zero masked tap is ignored
    got = c(cn.tensor(x)).numpy()
    np.testing.assert_allclose(got, ref.conv2d(x, c.weight.numpy() * mask, c.bias.numpy(), padding=1), atol=1e-12)
    with pytest.raises(ValueError, match="table"):
        nn.ConnectionTableConv2d(3, 2, 3, table)


# ----------------------------------------------------------------------------- shapes and input errors

MODEL_BUILDERS = {
    "lenet5": lambda c: models.lenet5(),
    "lenet5_classic": lambda c: models.lenet5(classic=True),
    "resnet8": lambda c: models.resnet8(in_channels=c),
    "resnet14": lambda c: models.resnet14(in_channels=c),
    "resnet20": lambda c: models.resnet20(in_channels=c),
    "resnet_bottleneck": lambda c: models.resnet((1, 1, 1), nn.Bottleneck, in_channels=c, widths=(4, 8, 16)),
    "mobilenet_small": lambda c: models.mobilenet_small(in_channels=c),
    "inception_small": lambda c: models.inception_small(in_channels=c),
}


@pytest.mark.parametrize("name", list(MODEL_BUILDERS))
def test_every_model_maps_mnist_images_to_logits(name):
    cn.manual_seed(3)
    m = MODEL_BUILDERS[name](1)
    y = m(images((2, 1, 28, 28), 4))
    assert y.shape == (2, 10) and y.dtype == np.float32 and np.all(np.isfinite(y.numpy()))
    assert isinstance(m, models.Network)


@pytest.mark.parametrize("name", ["resnet8", "resnet14", "resnet20", "resnet_bottleneck", "mobilenet_small",
                                  "inception_small"])
def test_colour_models_take_32x32(name):
    cn.manual_seed(5)
    m = MODEL_BUILDERS[name](3)
    assert m(images((2, 3, 32, 32), 6)).shape == (2, 10)
    assert models.resnet8(3, num_classes=7)(images((1, 3, 32, 32))).shape == (1, 7)


def test_wrong_input_shape_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        models.lenet5(classic=True)(images((2, 1, 32, 32)))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        models.lenet5()(images((2, 28, 28)))
    with pytest.raises(ValueError, match=r"resnet8 expects input of shape \(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        models.resnet8(in_channels=3)(images((2, 1, 32, 32)))
    with pytest.raises(ValueError, match=r"mobilenet_small .*\(N, 1, H, W\)"):
        models.mobilenet_small()(images((2, 3, 28, 28)))
    with pytest.raises(ValueError, match=r"inception_small .*\(N, 1, H, W\)"):
        models.inception_small()(images((1, 28, 28)))


# ----------------------------------------------------------------------------- gradients and training

class TinySeparable(nn.Module):
    """The spatially separable conv and the depthwise-separable unit, with a residual sum."""

    def __init__(self):
        super().__init__()
        self.sep = nn.SpatiallySeparableConv2d(2, 3, 3)
        self.ds = nn.DepthwiseSeparableConv2d(3, 3, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = nn.functional.tanh(self.sep(x))
        h = self.ds(h) + h
        return self.fc(nn.functional.flatten(self.pool(h)))


TINY = {  # (builder, input shape): every model kind at a size a float64 check can afford
    "lenet5_classic": (lambda: models.lenet5(classic=True), (2, 1, 28, 28)),
    "resnet_basic": (lambda: models.resnet((1, 1, 1), nn.BasicBlock, in_channels=2, num_classes=3,
                                           widths=(2, 3, 4)), (2, 2, 8, 8)),
    "resnet_bottleneck": (lambda: models.resnet((1, 1), nn.Bottleneck, in_channels=1, num_classes=3,
                                                widths=(1, 2)), (2, 1, 6, 6)),
    "mobilenet": (lambda: models.mobilenet_small(in_channels=2, num_classes=3, widths=(2, 3, 4)), (2, 2, 8, 8)),
    "inception": (lambda: models.inception_small(in_channels=1, num_classes=3, width=2), (2, 1, 8, 8)),
    "separable": (TinySeparable, (2, 2, 5, 5)),
}


@pytest.mark.parametrize("name", list(TINY))
def test_whole_model_gradient_matches_finite_differences(name):
    build, shape = TINY[name]
    cn.manual_seed(7)
    model = build().double()                 # train mode: batch-norm uses the batch statistics
    r = np.random.default_rng(8)
    x = cn.tensor(r.standard_normal(shape), requires_grad=True)
    target = r.integers(0, 3, shape[0])
    loss_fn = nn.CrossEntropyLoss()

    def loss_value():
        with cn.no_grad():
            return loss_fn(model(x), target).item()

    loss_fn(model(x), target).backward()
    eps = 1e-6
    checked = []
    for pname, p in list(model.named_parameters()) + [("input", x)]:
        flat = p.data.reshape(-1)            # a view: perturbs p in place
        grad = p.grad.numpy().reshape(-1)
        picks = r.choice(flat.size, size=min(2, flat.size), replace=False)
        if pname == "c3.weight":             # unmasked taps only (masked ones: the next test)
            live = np.flatnonzero(np.broadcast_to(model.c3.weight_mask.numpy(), p.shape).reshape(-1))
            picks = r.choice(live, size=3, replace=False)
        for i in picks:
            old = flat[i]
            flat[i] = old + eps
            up = loss_value()
            flat[i] = old - eps
            down = loss_value()
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            assert grad[i] == pytest.approx(numeric, rel=1e-5, abs=1e-9), f"{name}: {pname}[{i}]"
            checked.append(pname)
    assert set(checked) == {k for k, _ in model.named_parameters()} | {"input"}


def test_c3_masked_weights_get_zero_gradient_and_stay_zero():
    cn.manual_seed(9)
    model = models.lenet5(classic=True)
    r = np.random.default_rng(10)
    x, y = images((4, 1, 28, 28), 11), r.integers(0, 10, 4)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    mask = np.broadcast_to(model.c3.weight_mask.numpy(), model.c3.weight.shape)
    for _ in range(3):
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        g = model.c3.weight.grad.numpy()
        assert np.all(g[mask == 0] == 0) and np.count_nonzero(g[mask == 1]) > 0.9 * 1500
        opt.step()
    assert np.all(model.c3.weight.numpy()[mask == 0] == 0)


TRAINABLE = {
    "lenet5_classic": (lambda: models.lenet5(classic=True), (8, 1, 28, 28), 0.1),
    "resnet8_tiny": (lambda: models.resnet(8, in_channels=1, widths=(4, 8, 8)), (8, 1, 12, 12), 0.05),
    "mobilenet_small": (lambda: models.mobilenet_small(), (8, 1, 12, 12), 0.05),
    "inception_small": (lambda: models.inception_small(), (8, 1, 12, 12), 0.05),
}


@pytest.mark.parametrize("name", list(TRAINABLE))
def test_sgd_steps_reduce_the_loss(name):
    build, shape, lr = TRAINABLE[name]
    cn.manual_seed(12)
    model = build()
    r = np.random.default_rng(13)
    x, y = images(shape, 14), r.integers(0, 10, shape[0])
    opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


def test_resnet_block_matches_torch():
    torch = pytest.importorskip("torch")
    cn.manual_seed(15)
    ours = nn.BasicBlock(3, 4, stride=2).double()
    tb = torch.nn.Module()
    tb.conv1 = torch.nn.Conv2d(3, 4, 3, 2, 1, bias=False)
    tb.bn1 = torch.nn.BatchNorm2d(4)
    tb.conv2 = torch.nn.Conv2d(4, 4, 3, 1, 1, bias=False)
    tb.bn2 = torch.nn.BatchNorm2d(4)
    tb.downsample = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, 2, bias=False), torch.nn.BatchNorm2d(4))
    tb.double()
    tb.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})

    def torch_forward(x):
        out = torch.relu(tb.bn1(tb.conv1(x)))
        return torch.relu(tb.bn2(tb.conv2(out)) + tb.downsample(x))

    x = np.random.default_rng(16).standard_normal((2, 3, 7, 7))
    gy = np.random.default_rng(17).standard_normal((2, 4, 4, 4))
    xo, xt = cn.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    yo, yt = ours(xo), torch_forward(xt)
    np.testing.assert_allclose(yo.numpy(), yt.detach().numpy(), atol=1e-10)
    yo.backward(gy)
    yt.backward(torch.tensor(gy))
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), atol=1e-10)
    for (k, p), tp in zip(ours.named_parameters(), [dict(tb.named_parameters())[k] for k, _ in
                                                     ours.named_parameters()]):
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), atol=1e-10, err_msg=k)
