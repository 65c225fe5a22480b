"""ONNX export and import, with ONNX Runtime as the independent judge.

Export: every reference model (after a train-mode pass, so batch-norm statistics are not 0/1) is
traced at batch 2 and run by ONNX Runtime at batch 3; so is each layer with its corner cases.
Import: the exported file loaded back runs equal; hand-built graphs of what other exporters emit
run equal to ONNX Runtime on the same graph; PyTorch's own exports equal PyTorch's outputs and
fine-tune; bad files fail with one line.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'cnn_numba[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'cnn_numba[onnx]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import cnn_numba as cn  # noqa: E402
from cnn_numba import functional as F  # noqa: E402
from cnn_numba import models, nn  # noqa: E402
from cnn_numba.onnx import export, load  # noqa: E402
from cnn_numba.onnx._export import ExportError  # noqa: E402

RTOL = 1e-5


def _run_ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _eval(model, x):
    model.eval()
    with cn.no_grad():
        return model(cn.tensor(x)).numpy()


def _close(got, ref, rtol=RTOL):
    assert got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    assert float(np.abs(got - ref).max()) <= rtol * scale, (float(np.abs(got - ref).max()), scale)


def _roundtrip(model, shape, tmp_path, rng, train_pass=True):
    """Export at batch 2, run ORT and the re-imported model at batch 3, against eval outputs."""
    if train_pass:
        model.train()
        model(cn.tensor(rng.standard_normal((4,) + shape).astype(np.float32)))  # BN statistics move
    path = tmp_path / "m.onnx"
    export(model, rng.standard_normal((2,) + shape).astype(np.float32), path)
    x = rng.standard_normal((3,) + shape).astype(np.float32)
    ref = _eval(model, x)
    _close(_run_ort(path, x), ref)
    loaded = load(path)
    _close(_eval(loaded, x), ref)
    return path, loaded


REFERENCE = {
    "lenet5": (lambda: models.lenet5(), (1, 28, 28)),
    "lenet5_classic": (lambda: models.lenet5(classic=True), (1, 28, 28)),
    "resnet8": (lambda: models.resnet8(), (1, 12, 12)),
    "resnet20": (lambda: models.resnet20(), (1, 8, 8)),
    "mobilenet_small": (lambda: models.mobilenet_small(), (1, 12, 12)),
    "inception_small": (lambda: models.inception_small(), (1, 12, 12)),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_models(name, tmp_path):
    cn.manual_seed(0)
    build, shape = REFERENCE[name]
    model = build()
    _, loaded = _roundtrip(model, shape, tmp_path, np.random.default_rng(1))
    n_params = sum(p.size for p in model.parameters())
    assert sum(p.size for p in loaded.parameters()) == n_params


class _PoolUnpool(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True, **kw)
        self.unpool = nn.MaxUnpool2d(2)

    def forward(self, x):
        y, idx = self.pool(x)
        return self.unpool(y, idx, output_size=(x.shape[2] + 1, x.shape[3]))


class _Linear3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(F.reshape(x, (x.shape[0], 3, 5))) * 0.5 - 1.0


LAYERS = {
    "conv_groups_dilation_stride": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (4, 9, 8)),
    "conv_same_even_kernel": (lambda: nn.Conv2d(2, 3, (4, 2), padding="same", dilation=(1, 3)), (2, 7, 9)),
    "conv_rect_no_bias": (lambda: nn.Conv2d(3, 2, (1, 3), stride=(2, 1), padding=(0, 1), bias=False), (3, 5, 6)),
    "conv_transpose_output_padding": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                                 groups=2), (4, 5, 4)),
    "conv_transpose_dilation": (lambda: nn.ConvTranspose2d(2, 3, (3, 2), stride=(1, 3), dilation=2), (2, 4, 3)),
    "maxpool_ceil_dilation_pad": (lambda: nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True), (2, 10, 9)),
    "maxpool_unpool": (lambda: _PoolUnpool(), (3, 6, 6)),
    "avgpool_ceil_exclude_pad": (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (2, 8, 7)),
    "avgpool_include_pad": (lambda: nn.AvgPool2d((2, 3), (1, 2), (1, 1)), (2, 5, 6)),
    "avgpool_divisor_override_ceil": (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, divisor_override=5), (2, 8, 7)),
    "adaptive_avgpool_divides": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 4, 6)),
    "batchnorm1d_2d_input": (lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12)), (3, 2, 2)),
    "batchnorm2d_no_affine": (lambda: nn.BatchNorm2d(3, affine=False, momentum=None), (3, 4, 4)),
    "linear_3d_input_scalars": (lambda: _Linear3d(), (15,)),
    "channel_shuffle_dropout": (lambda: nn.Sequential(nn.ChannelShuffle(3), nn.Dropout(0.3), nn.Sigmoid(),
                                                      nn.Tanh()), (6, 3, 2)),
    "spatially_separable": (lambda: nn.SpatiallySeparableConv2d(2, 3, 5, stride=(2, 1)), (2, 9, 8)),
    "bottleneck": (lambda: nn.Bottleneck(8, 4, stride=2), (8, 6, 6)),
    "subsampling_scaled_tanh": (lambda: nn.Sequential(nn.Subsampling2d(3, 2), nn.ScaledTanh()), (3, 6, 4)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers(name, tmp_path):
    cn.manual_seed(0)
    build, shape = LAYERS[name]
    _roundtrip(build(), shape, tmp_path, np.random.default_rng(2))


def test_static_batch_and_opset(tmp_path):
    cn.manual_seed(0)
    model = models.lenet5()
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    proto = export(model, x, tmp_path / "m.onnx", opset=13, dynamic_batch=False)
    assert proto.opset_import[0].version == 13
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    _close(_run_ort(tmp_path / "m.onnx", x), _eval(model, x))
    with pytest.raises(ValueError, match="opset"):
        export(model, x, tmp_path / "m.onnx", opset=7)


class _SumOfSquares(nn.Module):
    def forward(self, x):
        return F.mean(F.mul(x, x)) + F.sum(x)


def test_reductions_with_static_batch(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    with pytest.raises(ExportError, match="sum over the batch dimension"):
        export(_SumOfSquares(), x, tmp_path / "m.onnx")
    export(_SumOfSquares(), x, tmp_path / "m.onnx", dynamic_batch=False)
    _close(_run_ort(tmp_path / "m.onnx", x).reshape(-1), _eval(_SumOfSquares(), x).reshape(-1))
    _close(_eval(load(tmp_path / "m.onnx"), x), _eval(_SumOfSquares(), x))


def test_max_pool_indices_as_outputs_match_onnxruntime(tmp_path):
    """Our indices are h*W + w within each plane, ONNX's flat over (N, C, H, W): the export
    converts, ONNX Runtime must agree on every argmax (padding and dilation included)."""
    pool = nn.MaxPool2d(3, 2, 1, dilation=2, return_indices=True, ceil_mode=True)
    x = np.random.default_rng(7).standard_normal((2, 3, 9, 8)).astype(np.float32)
    export(pool, x, tmp_path / "m.onnx")
    x3 = np.random.default_rng(8).standard_normal((3, 3, 9, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    y, idx = sess.run(None, {"input": x3})
    ref_y, ref_idx = pool(cn.tensor(x3))
    np.testing.assert_array_equal(y, ref_y.numpy())
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    got_y, got_idx = load(tmp_path / "m.onnx")(x3)
    np.testing.assert_array_equal(got_y.numpy(), ref_y.numpy())
    np.testing.assert_array_equal(got_idx.numpy(), ref_idx.numpy())


def test_export_restores_training_mode_and_names_params(tmp_path):
    model = models.resnet8()
    model.train()
    proto = export(model, np.zeros((2, 1, 8, 8), np.float32), tmp_path / "m.onnx")
    assert model.training and all(m.training for m in model.modules())
    names = {t.name for t in proto.graph.initializer}
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight", "fc.bias"} <= names


class _Loss(nn.Module):
    def forward(self, x):
        return F.cross_entropy(F.flatten(x), np.zeros(x.shape[0], np.int64))


class _MergeBatch(nn.Module):
    def forward(self, x):
        return F.reshape(x, (-1,))


@pytest.mark.parametrize("module, message", [
    (nn.Sequential(OrderedDict([("head", _Loss())])), r"op CrossEntropy has no ONNX form \(in module head \(_Loss\)\)"),
    (nn.Sequential(OrderedDict([("pool", nn.AdaptiveAvgPool2d(3))])), r"adaptive_avg_pool2d.*in module pool"),
    (_MergeBatch(), "changes the batch dimension; export with dynamic_batch=False"),
])
def test_export_errors_name_the_module(module, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export(module, np.zeros((2, 2, 4, 4), np.float32), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _fine_tune(model, x, loss_fn, steps=5, lr=0.05):
    """A few SGD steps in train mode: every parameter gets a gradient and the loss falls."""
    model.train()
    params = list(model.parameters())
    assert params and all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
    opt = cn.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(cn.tensor(x)))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and np.abs(p.grad.numpy()).sum() > 0 for p in params)
    assert losses[-1] < losses[0], losses


def test_loaded_model_fine_tunes(tmp_path):
    cn.manual_seed(0)
    rng = np.random.default_rng(3)
    model = models.resnet8()
    path, _ = _roundtrip(model, (1, 8, 8), tmp_path, rng)
    loaded = load(path)
    _fine_tune(loaded, rng.standard_normal((4, 1, 8, 8)).astype(np.float32),
               lambda out: F.cross_entropy(out, np.array([0, 1, 2, 3])))
    before = loaded.bn1_running_mean.numpy().copy()  # train mode moved the BN statistics, as in PyTorch
    assert not np.allclose(before, np.asarray(model.bn1.running_mean.numpy()))


# ----------------------------------------------------------------------------- graphs other exporters emit

def _graph(nodes, inits, in_shape, out_name="y", opset=17, in_name="x"):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N"] + in_shape[1:])],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _w(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _foreign_graphs():
    rng = np.random.default_rng(4)
    c = lambda name, arr: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr)))  # noqa: E731
    return {
        "conv_auto_pad_same_upper": ([helper.make_node("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER",
                                                       strides=[2, 2])],
                                     {"w": _w(rng, 3, 2, 4, 3), "b": _w(rng, 3)}, [2, 2, 7, 6]),
        "conv_asymmetric_pads": ([helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 2, 1, 0], dilations=[2, 1])],
                                 {"w": _w(rng, 3, 2, 3, 3)}, [2, 2, 7, 6]),
        "conv_transpose_asymmetric": ([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2],
                                                        pads=[1, 0, 0, 1], output_padding=[1, 0])],
                                      {"w": _w(rng, 2, 3, 3, 3), "b": _w(rng, 3)}, [2, 2, 4, 5]),
        "gemm_transA_alpha_beta": ([helper.make_node("Flatten", ["x"], ["f"]),
                                    helper.make_node("Transpose", ["f"], ["ft"]),
                                    helper.make_node("Gemm", ["ft", "w", "c"], ["y"], transA=1, alpha=0.5, beta=2.0)],
                                   {"w": _w(rng, 12, 5), "c": _w(rng, 5)}, [3, 3, 2, 2]),
        "matmul_add_softmax": ([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["m"]),
                                helper.make_node("Add", ["m", "b"], ["z"]), helper.make_node("Softmax", ["z"], ["y"])],
                               {"w": _w(rng, 12, 5), "b": _w(rng, 5)}, [3, 3, 2, 2]),
        "reshape_squeeze_logsoftmax": ([helper.make_node("GlobalAveragePool", ["x"], ["g"]),
                                        helper.make_node("Squeeze", ["g", "axes"], ["s"]),
                                        helper.make_node("Unsqueeze", ["s", "ax1"], ["u"]),
                                        helper.make_node("Reshape", ["u", "shape"], ["r"]),
                                        helper.make_node("LogSoftmax", ["r"], ["y"], axis=1)],
                                       {"axes": np.array([2, 3]), "ax1": np.array([-1]), "shape": np.array([0, -1])},
                                       [2, 3, 4, 4]),
        "pad_clip_div_sub": ([c("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1])), c("v", np.float32(0.5)),
                              helper.make_node("Pad", ["x", "pads", "v"], ["p"]),
                              c("lo", np.float32(0.0)), c("hi", np.float32(6.0)),
                              c("d", np.float32(4.0)), c("s", _w(rng, 1, 2, 1, 1)),
                              helper.make_node("Div", ["p", "d"], ["q"]), helper.make_node("Sub", ["q", "s"], ["t"]),
                              helper.make_node("Mul", ["t", "k"], ["u"]),
                              helper.make_node("Clip", ["u", "lo", "hi"], ["y"])],
                             {"k": np.float32(9.0)}, [2, 2, 3, 3]),
        "bn_identity_concat_maxpool": ([helper.make_node("BatchNormalization", ["x", "sc", "bi", "mu", "var"], ["n"],
                                                         epsilon=1e-3),
                                        helper.make_node("Identity", ["n"], ["i"]),
                                        helper.make_node("MaxPool", ["i"], ["mp"], kernel_shape=[2, 2], strides=[1, 1],
                                                         pads=[1, 1, 1, 1]),
                                        helper.make_node("AveragePool", ["i"], ["ap"], kernel_shape=[3, 3],
                                                         pads=[1, 1, 1, 1], count_include_pad=1),
                                        helper.make_node("Concat", ["ap", "i"], ["y"], axis=1)],
                                       {"sc": _w(rng, 2), "bi": _w(rng, 2), "mu": _w(rng, 2),
                                        "var": np.abs(_w(rng, 2)) + 0.5}, [2, 2, 5, 4]),
        "reduce_mean_sum": ([helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=1),
                             helper.make_node("ReduceSum", ["x", "ax"], ["s"], keepdims=0),
                             helper.make_node("Unsqueeze", ["s", "ax"], ["u"]),
                             helper.make_node("Add", ["m", "u"], ["y"])],
                            {"ax": np.array([1])}, [2, 3, 4, 5]),
        "shape_gather_concat_reshape": ([helper.make_node("Shape", ["x"], ["sh"]),
                                         helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
                                         helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
                                         helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
                                         helper.make_node("Reshape", ["x", "shape"], ["y"])],
                                        {"zero": np.array(0), "zero1": np.array([0]), "minus1": np.array([-1])},
                                        [2, 3, 2, 2]),
    }


FOREIGN = _foreign_graphs()


@pytest.mark.parametrize("name", list(FOREIGN))
def test_import_matches_onnxruntime(name, tmp_path):
    nodes, inits, shape = FOREIGN[name]
    path = tmp_path / "g.onnx"
    onnx.save(_graph(nodes, inits, shape), path)
    x = np.random.default_rng(5).standard_normal([3] + shape[1:]).astype(np.float32)
    _close(_eval(load(path), x), _run_ort(path, x))


# ----------------------------------------------------------------------------- bad files

def _bad(tmp_path, data: bytes | None = None, model=None) -> str:
    path = tmp_path / "bad.onnx"
    path.write_bytes(data if data is not None else model.SerializeToString())
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _small_model():
    return _graph([helper.make_node("Relu", ["x"], ["y"])], {}, [1, 1, 2, 2])


def test_bad_files(tmp_path):
    good = _small_model().SerializeToString()
    assert "not an ONNX model" in _bad(tmp_path, good[: len(good) // 2])            # truncated
    assert "not an ONNX model" in _bad(tmp_path, b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert "zip" in _bad(tmp_path, b"PK\x03\x04" + b"\x00" * 64)                     # an .npz, say
    assert "empty" in _bad(tmp_path, b"")

    huge = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10 ** 6, 10 ** 6], raw_data=b"\x00" * 16)
    m = _graph([helper.make_node("Add", ["x", "w"], ["y"])], {}, [1, 1, 2, 2])
    m.graph.initializer.append(huge)
    assert "claims 1000000000000 elements" in _bad(tmp_path, model=m)
    short = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], raw_data=b"\x00" * 8)
    m.graph.initializer[0].CopyFrom(short)
    assert "holds 2 elements, expected 4" in _bad(tmp_path, model=m)

    cycle = _graph([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                    helper.make_node("Relu", ["a"], ["y"])], {}, [1, 1, 2, 2])
    assert "cycle" in _bad(tmp_path, model=cycle)
    undefined = _graph([helper.make_node("Add", ["x", "nowhere"], ["y"])], {}, [1, 1, 2, 2])
    assert "'nowhere', which nothing defines" in _bad(tmp_path, model=undefined)

    unknown = _graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Foo", ["a"], ["b"], name="foo1"),
                      helper.make_node("Erf", ["b"], ["c"], name="erf1"),
                      helper.make_node("Conv", ["c", "w"], ["y"], name="conv3d")],
                     {"w": np.zeros((1, 1, 1, 1, 1), np.float32)}, [1, 1, 2, 2, 2])
    msg = _bad(tmp_path, model=unknown)
    assert "Foo 'foo1'" in msg and "Erf 'erf1'" in msg and "conv3d" in msg and "3-D kernel" in msg
    arity = _graph([helper.make_node("Conv", ["x"], ["y"], name="lonely")], {}, [1, 1, 2, 2])
    assert "Conv 'lonely': 1 inputs (expected 2 to 3)" in _bad(tmp_path, model=arity)
    dyn = _graph([helper.make_node("Relu", ["x"], ["y"])], {}, [1, "C", 2, 2])
    assert "dynamic dims [1]" in _bad(tmp_path, model=dyn)
    old = _graph([helper.make_node("Relu", ["x"], ["y"])], {}, [1, 1, 2, 2], opset=9)
    assert "opset 9" in _bad(tmp_path, model=old)
    external = _graph([helper.make_node("Add", ["x", "w"], ["y"])], {"w": np.zeros(4, np.float32)}, [1, 4])
    external.graph.initializer[0].data_location = TensorProto.EXTERNAL
    assert "external file" in _bad(tmp_path, model=external)


# ----------------------------------------------------------------------------- models PyTorch exported

def _torch_models():
    import torch
    from torch import nn as tnn

    class Block(tnn.Module):  # CIFAR BasicBlock with a 1x1 strided projection + BN shortcut
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False), tnn.BatchNorm2d(cout)
            self.conv2, self.bn2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout)
            self.short = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    class ViewHead(tnn.Module):  # x.view(x.size(0), -1): Shape, Gather, Unsqueeze, Concat, Reshape
        def forward(self, x):
            return x.view(x.size(0), -1)

    def ds(cin, cout, stride):
        return [tnn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), tnn.BatchNorm2d(cin), tnn.ReLU6(),
                tnn.Conv2d(cin, cout, 1, bias=False), tnn.BatchNorm2d(cout), tnn.ReLU()]

    return {
        "lenet5": (lambda: tnn.Sequential(
            tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(6, 16, 5), tnn.ReLU(),
            tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(400, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(),
            tnn.Linear(84, 10)), (1, 28, 28)),
        "cifar_resnet": (lambda: tnn.Sequential(
            tnn.Conv2d(3, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8), tnn.ReLU(), Block(8, 8, 1),
            Block(8, 16, 2), tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(16, 10)), (3, 8, 8)),
        "depthwise_separable": (lambda: tnn.Sequential(
            tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8), tnn.ReLU6(), *ds(8, 16, 2), *ds(16, 16, 1),
            tnn.AvgPool2d(2), ViewHead(), tnn.Linear(16 * 2 * 2, 10), tnn.LogSoftmax(1)), (3, 8, 8)),
        "conv_transpose": (lambda: tnn.Sequential(
            tnn.Conv2d(2, 6, 3, stride=2, padding=1), tnn.ReLU(), tnn.ConvTranspose2d(6, 4, 3, stride=2, padding=1,
                                                                                   output_padding=1),
            tnn.Tanh(), tnn.ConvTranspose2d(4, 1, (2, 3), padding=(0, 1), groups=1), tnn.Sigmoid()), (2, 7, 6)),
    }


@pytest.mark.parametrize("folding", [True, False], ids=["folded", "bn_nodes"])
@pytest.mark.parametrize("name", ["lenet5", "cifar_resnet", "depthwise_separable", "conv_transpose"])
def test_import_pytorch_export(name, folding, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import inspect
    import warnings
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        pytest.skip("this torch's onnx exporter has no dynamo=False (the TorchScript exporter); the dynamo "
                    "exporter needs onnxscript")
    torch.manual_seed(0)
    build, shape = _torch_models()[name]
    model = build()
    model.train()
    with torch.no_grad():
        model(torch.randn((4,) + shape))  # BN statistics move
    model.eval()
    path = tmp_path / "t.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn((2,) + shape),), str(path), dynamo=False, do_constant_folding=folding,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if name == "cifar_resnet":
        assert ("BatchNormalization" in ops) == (not folding)
    x = np.random.default_rng(6).standard_normal((3,) + shape).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    loaded = load(path)
    _close(_eval(loaded, x), ref)
    if ref.ndim == 2:
        target = np.arange(3) % ref.shape[1]
        loss_fn = (lambda out: F.cross_entropy(out, target)) if name != "depthwise_separable" else \
            (lambda out: -(out * np.eye(10, dtype=np.float32)[target]).sum())  # NLL of the log-softmax
    else:
        loss_fn = lambda out: F.mse_loss(out, np.full(out.shape, 0.5, np.float32))  # noqa: E731
    _fine_tune(loaded, x, loss_fn, lr=0.01)


# ----------------------------------------------------------------------------- command line

def test_cli_export_and_evaluate_onnx(capsys, tmp_path):
    """A checkpoint trained for one epoch, exported from the command line: its ONNX file, run by
    cnn_numba and by ONNX Runtime, scores what ``evaluate --checkpoint`` scores."""
    import test_train as TT
    data_dir = TT.write_dataset(tmp_path / "data", *TT.fixture_digits())
    ck = tmp_path / "run"
    assert TT.train_quick(capsys, data_dir, "--epochs", "1", "--checkpoint", ck)[0] == 0
    code, out, err = TT.run(capsys, "export", "--checkpoint", ck, "--onnx", tmp_path / "m.onnx")
    assert code == 0 and "wrote" in out, err
    results = {}
    for source in (["--checkpoint", ck], ["--onnx", tmp_path / "m.onnx"],
                   ["--onnx", tmp_path / "m.onnx", "--runtime", "onnxruntime"]):
        code, out, err = TT.run(capsys, "evaluate", *source, "--data-dir", data_dir)
        assert code == 0, err
        lines = out.strip().splitlines()
        results[source[-1]] = (lines[-2].split("test loss ")[1], lines[-1])
    (loss, acc), *others = results.values()
    assert acc.startswith("test accuracy: ")
    assert all(o == (loss, acc) for o in others), results

    code, _, err = TT.run(capsys, "evaluate", "--onnx", tmp_path / "run" / "epoch_001.npz", "--data-dir", data_dir)
    assert code == 2 and "not an ONNX model" in err and "zip" in err
    code, _, err = TT.run(capsys, "evaluate", "--checkpoint", ck, "--runtime", "onnxruntime")
    assert code == 2 and "--runtime applies to --onnx" in err


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_imported_softmax_gradient_by_finite_differences(log):
    """Softmax/LogSoftmax are the importer's own op (host numpy): float64 central differences."""
    from cnn_numba.onnx._load import _Softmax
    rng = np.random.default_rng(9)
    x0, w = rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 4, 2))

    def f(arr):
        with cn.no_grad():
            return float((_Softmax.apply(cn.tensor(arr), axis=1, log=log).numpy() * w).sum())
    x = cn.tensor(x0, requires_grad=True)
    (_Softmax.apply(x, axis=1, log=log) * cn.tensor(w)).sum().backward()
    num = np.zeros_like(x0)
    for i in np.ndindex(x0.shape):
        e = np.zeros_like(x0)
        e[i] = 1e-6
        num[i] = (f(x0 + e) - f(x0 - e)) / 2e-6
    np.testing.assert_allclose(x.grad.numpy(), num, rtol=1e-6, atol=1e-8)
