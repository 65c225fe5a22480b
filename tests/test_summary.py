"""cnn_numba.summary: the docs/networks.md oracles (LeNet-5's table, Inception 3a, ResNet
blocks) read off the summary of built modules, the counting rules of docs/convolution.md, receptive
fields through known stacks, and that summarising leaves the model as it was."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import cnn_numba as cn
from cnn_numba import models, nn


def rows_by_name(rows):
    return {r["name"]: r for r in rows}


def test_lenet5_classic_reproduces_lecuns_table(capsys):
    cn.manual_seed(0)
    rows, totals = cn.summary(models.lenet5(classic=True), (1, 28, 28))
    r = rows_by_name(rows)
    layers = ["c1", "s2", "c3", "s4", "c5", "f6"]
    assert [r[k]["params"] for k in layers] == [156, 12, 1516, 32, 48120, 10164]
    assert [r[k]["connections"] for k in layers] == [122304, 5880, 151600, 2000, 48120, 10164]
    assert [r[k]["output_shape"][1:] for k in layers] == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5),
                                                          (120, 1, 1), (84,)]
    assert r["c3"]["type"] == "ConnectionTableConv2d" and r["s2"]["type"] == "Subsampling2d"
    # MACs: K*K*(C_in/g)*C_out*oh*ow, bias excluded; C3 counts its 60 connected map pairs only.
    assert r["c1"]["macs"] == 25 * 6 * 28 * 28 and r["c3"]["macs"] == 60 * 25 * 10 * 10
    assert r["output"]["params"] == 850
    # The 900 masked C3 weights are stored but are not parameters.
    assert totals["params"] == totals["trainable_params"] == 156 + 12 + 1516 + 32 + 48120 + 10164 + 850
    assert sum(p.size for p in models.lenet5(classic=True).parameters()) == totals["params"] + 900
    assert totals["output_shape"] == (1, 10) and totals["input_shape"] == (1, 1, 28, 28)
    out = capsys.readouterr().out
    assert "c3 (ConnectionTableConv2d)" in out and "151,600" in out and "Total params: 60,850" in out
    # C5 sees the whole padded 32x32 input.
    assert r["c1"]["rf"] == (5, 5) and r["s2"]["rf"] == (6, 6) and r["c5"]["rf"] == (32, 32)
    assert r["c5"]["rf_jump"] == (4, 4)


def branch_conv_weights(block, input_shape):
    rows, _ = cn.summary(block, input_shape, verbose=False)
    convs = [r for r in rows if r["type"] == "Conv2d" and r["name"].split(".")[0] in ("branch1", "branch2", "branch3")]
    assert all(c["name"].split(".")[0] != "branch4" for c in convs)
    return sum(c["params"] for c in convs)


def test_inception_3a_weights_with_and_without_reductions():
    # docs/networks.md: three conv branches of GoogLeNet's 3a module, no bias, pool branch not counted.
    assert branch_conv_weights(nn.InceptionBlock(192, 64, 96, 128, 16, 32, 32, bias=False), (192, 2, 2)) == 157184
    assert branch_conv_weights(nn.InceptionBlock(192, 64, None, 128, None, 32, 32, bias=False), (192, 2, 2)) == 387072
    rows, totals = cn.summary(nn.InceptionBlock(192, 64, 96, 128, 16, 32, 32, bias=False), (192, 2, 2), verbose=False)
    assert totals["output_shape"] == (1, 256, 2, 2)
    assert totals["params"] == 157184 + 192 * 32                  # + the pool branch's projection


@pytest.mark.parametrize("block, shape, weights", [
    (lambda: nn.BasicBlock(64, 64), (64, 3, 3), 73728),
    (lambda: nn.BasicBlock(256, 256), (256, 2, 2), 1179648),
    (lambda: nn.Bottleneck(256, 64), (256, 2, 2), 69632),
])
def test_resnet_block_conv_weights(block, shape, weights):
    rows, totals = cn.summary(block(), shape, verbose=False)
    assert sum(r["params"] for r in rows if r["type"] == "Conv2d") == weights
    bn = sum(r["params"] for r in rows if r["type"] == "BatchNorm2d")
    assert totals["params"] == weights + bn and bn > 0


def test_conv_counting_rules_with_groups_stride_and_dilation():
    layer = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2)
    rows, totals = cn.summary(layer, (4, 9, 7), verbose=False)
    (r,) = rows
    oh, ow = (9 + 4 - 4 - 1) // 2 + 1, (7 + 4 - 4 - 1) // 2 + 1
    assert r["output_shape"] == (1, 8, oh, ow) and r["name"] == "Conv2d"
    assert r["params"] == 3 * 3 * 2 * 8 + 8
    assert r["macs"] == 3 * 3 * 2 * 8 * oh * ow
    assert r["connections"] == (3 * 3 * 2 + 1) * 8 * oh * ow
    assert r["rf"] == (5, 5) and r["rf_jump"] == (2, 2) and r["rf_start"] == (0.0, 0.0)  # 2 - pad 2
    # A batch of 3: costs scale with it; parameters do not.
    rows3, totals3 = cn.summary(layer, (3, 4, 9, 7), verbose=False)
    assert rows3[0]["macs"] == 3 * r["macs"] and totals3["params"] == totals["params"]
    up = cn.summary(nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1), (2, 5, 5), verbose=False)[0][0]
    assert up["output_shape"] == (1, 3, 10, 10) and up["params"] == 2 * 3 * 16 + 3
    assert up["macs"] == 2 * 3 * 16 * 25                       # every input pixel scatters a 4x4 kernel
    assert up["rf"] == (2, 2) and up["rf_jump"] == (0.5, 0.5)  # an output sees ceil(4/2) inputs a side
    ad = cn.summary(nn.AdaptiveAvgPool2d(3), (1, 5, 6), verbose=False)[0][0]
    assert ad["rf"] == (3, 2) and ad["rf_jump"] == (5 / 3, 2)  # rows [0,2) [1,4) [3,5); columns 2 wide
    lin = cn.summary(nn.Linear(5, 4, bias=False), (5,), verbose=False)[0][0]
    assert (lin["params"], lin["macs"], lin["connections"]) == (20, 20, 20)


@pytest.mark.parametrize("stack, rf, jump", [
    ([nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)], 5, 1),                                     # two 3x3: 5x5
    ([nn.Conv2d(1, 1, 3), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3)], 8, 2),                    # 3, +1, +2*2
    ([nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1)], 5, 1),   # padding: same field
    ([nn.Conv2d(1, 1, 3, dilation=2), nn.Conv2d(1, 1, 3)], 7, 1),                         # dilated 3x3 sees 5x5
    ([nn.Conv2d(1, 1, 3, stride=2), nn.Conv2d(1, 1, 3, stride=2), nn.AvgPool2d(2)], 11, 8),
])
def test_receptive_field_of_known_stacks(stack, rf, jump):
    rows, _ = cn.summary(nn.Sequential(*stack), (1, 20, 20), verbose=False)
    assert rows[-1]["rf"] == (rf, rf) and rows[-1]["rf_jump"] == (jump, jump)


def test_receptive_field_through_branches_takes_the_largest():
    rows, _ = cn.summary(nn.SpatiallySeparableConv2d(1, 1, 3), (1, 8, 8), verbose=False)
    assert [r["rf"] for r in rows] == [(3, 1), (3, 3)]
    block = nn.InceptionBlock(4, 2, 2, 2, 2, 2, 2)
    model = nn.Sequential(OrderedDict(block=block, after=nn.Conv2d(8, 1, 1)))
    r = rows_by_name(cn.summary(model, (4, 8, 8), verbose=False)[0])
    assert r["block.branch1.0"]["rf"] == (1, 1) and r["block.branch3.2"]["rf"] == (5, 5)
    assert r["after"]["rf"] == (5, 5)                            # the cat: max over the four branches
    res = rows_by_name(cn.summary(nn.Sequential(nn.BasicBlock(2, 2), nn.Conv2d(2, 2, 1)), (2, 8, 8),
                                  verbose=False)[0])
    assert res["0.conv2"]["rf"] == (5, 5) and res["1"]["rf"] == (5, 5)   # identity 1 vs residual 5
    res = rows_by_name(cn.summary(nn.Sequential(nn.BasicBlock(2, 4, stride=2), nn.Conv2d(4, 2, 3)), (2, 8, 8),
                                  verbose=False)[0])
    assert res["0.downsample.0"]["rf"] == (1, 1) and res["0.conv2"]["rf_jump"] == (2, 2)
    assert res["0.conv2"]["rf"] == (7, 7) and res["1"]["rf"] == (7 + 2 * 2, 7 + 2 * 2)


def test_summary_leaves_the_model_untouched():
    cn.manual_seed(1)
    model = models.resnet((1, 1, 1), in_channels=1, widths=(2, 2, 2))
    model.train()
    model.layer1.eval()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    rows, totals = cn.summary(model, (1, 8, 8), verbose=False)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)       # running stats not updated
    assert model.training and model.bn1.training and not model.layer1[0].bn1.training
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert totals["params"] == sum(p.size for p in model.parameters())
    model.fc.requires_grad_(False)
    with cn.no_grad():                                            # the residual sums are still traced
        rows2, totals = cn.summary(model, (1, 8, 8), verbose=False)
        assert not cn.is_grad_enabled()
    assert [r["rf"] for r in rows2] == [r["rf"] for r in rows]
    assert totals["trainable_params"] == totals["params"] - model.fc.weight.size - model.fc.bias.size


def test_summary_of_float64_models_and_shape_errors():
    model = models.mobilenet_small(num_classes=4).double()
    rows, totals = cn.summary(model, (1, 12, 12), dtype=np.float64, verbose=False)
    assert totals["output_shape"] == (1, 4) and rows[-1]["type"] == "Linear"
    assert totals["macs"] == sum(r["macs"] for r in rows) > 0
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        cn.summary(models.lenet5(classic=True), (1, 32, 32), verbose=False)
