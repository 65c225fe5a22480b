"""The CUDA backend's plumbing: device copies, the launcher layer, elementwise ops,
broadcasting and its gradient, reductions, cat/split/permute, CUDA Array Interface,
modules and a whole training step on the device.

Under Numba's CUDA simulator (no GPU here) every thread is a Python thread, so shapes
are tiny; on a GPU the same tests run as they are.
"""
from __future__ import annotations

import numpy as np
import pytest

import cnn_numba as cn
from cnn_numba import functional as F
from cnn_numba import nn, optim
from cnn_numba.backend import kernel
from conftest import CUDA_SIMULATED, forward_backward, needs_cuda

pytestmark = needs_cuda


def _rand(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_round_trip_keeps_values_shape_and_dtype():
    for a in (_rand((2, 3)), _rand((4,), np.float64), np.asarray(np.float32(2.5)), np.zeros((0, 3), np.float32),
              np.arange(6, dtype=np.int64).reshape(2, 3)):
        t = cn.tensor(a, device="cuda")
        assert t.device == "cuda" and t.shape == a.shape and t.dtype == a.dtype
        np.testing.assert_array_equal(t.numpy(), a)
        back = t.cpu()
        assert back.device == "cpu"
        np.testing.assert_array_equal(back.numpy(), a)


def test_to_is_differentiable_both_ways():
    a = _rand((2, 3))
    x = cn.tensor(a, requires_grad=True)
    y = x.to("cuda")
    assert y.device == "cuda" and x.to("cpu") is x
    z = (y * y).cpu()
    assert z.device == "cpu"
    z.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * a, rtol=1e-6)
    assert x.grad.device == "cpu"


def test_ops_refuse_mixed_devices():
    with pytest.raises(ValueError, match="different devices"):
        cn.tensor([1.0, 2.0]) + cn.tensor([1.0, 2.0], device="cuda")


@pytest.mark.parametrize("shape_a, shape_b", [((2, 3), (2, 3)), ((2, 3, 4), (3, 1)), ((1, 3), (2, 1)),
                                              ((2, 1, 3), ()), ((), (2, 2))])
@pytest.mark.parametrize("op, ref", [(F.add, np.add), (F.mul, np.multiply), (F.sub, np.subtract)])
def test_broadcasting_ops_and_their_gradients(shape_a, shape_b, op, ref):
    a, b = _rand(shape_a, np.float64, 1), _rand(shape_b, np.float64, 2)
    out, (ga, gb), gy = forward_backward(op, [a, b], device="cuda")
    np.testing.assert_allclose(out, ref(a, b), rtol=1e-12)
    # references: the gradient of broadcasting sums over the broadcast axes
    da, db = {np.add: (1, 1), np.subtract: (1, -1), np.multiply: (b, a)}[ref]
    full = np.broadcast_shapes(a.shape, b.shape)
    for g, d, shape in ((ga, da, a.shape), (gb, db, b.shape)):
        contrib = np.broadcast_to(gy * np.broadcast_to(d, full), full)
        lead = len(full) - len(shape)
        expect = contrib.sum(axis=tuple(range(lead))) if lead else contrib
        expect = expect.sum(axis=tuple(i for i, s in enumerate(shape) if s == 1), keepdims=True).reshape(shape)
        np.testing.assert_allclose(g, expect, rtol=1e-10, atol=1e-12)


def test_scalar_operands_keep_float32():
    x = cn.tensor(_rand((3, 2)), device="cuda")
    for y in (x * 0.5, 0.5 * x, x + 2.0, x - 1.0, -x):
        assert y.dtype == np.float32 and y.device == "cuda"
    np.testing.assert_allclose((x * 0.5 + 2.0).numpy(), x.numpy() * 0.5 + 2.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_and_mean_match_float64_and_repeat_bit_for_bit(dtype):
    a = _rand((5, 7, 3), dtype)
    x = cn.tensor(a, device="cuda")
    s1, s2 = F.sum(x).numpy(), F.sum(x).numpy()
    assert s1.shape == () and s1.dtype == dtype
    assert s1.tobytes() == s2.tobytes()
    np.testing.assert_allclose(s1, a.astype(np.float64).sum(), rtol=1e-6)
    np.testing.assert_allclose(F.mean(x).numpy(), a.astype(np.float64).mean(), rtol=1e-6)
    assert F.sum(cn.tensor(np.zeros((0, 4), dtype), device="cuda")).numpy() == 0


def test_relu_forward_backward_with_nan():
    a = np.array([[-1.0, 0.0, 2.0, np.nan]], np.float32)
    out, (g,), gy = forward_backward(F.relu, [a], device="cuda")
    np.testing.assert_array_equal(out, np.array([[0, 0, 2, np.nan]], np.float32))
    np.testing.assert_array_equal(g, np.where(np.array([[0, 0, 1, 1]]) > 0, gy, 0))


def test_cat_split_permute_and_channel_shuffle():
    a, b = _rand((2, 1, 3), np.float64, 1), _rand((2, 2, 3), np.float64, 2)
    out, (ga, gb), gy = forward_backward(lambda u, v: F.cat([u, v], dim=1), [a, b], device="cuda")
    np.testing.assert_array_equal(out, np.concatenate([a, b], 1))
    np.testing.assert_array_equal(ga, gy[:, :1]) and np.testing.assert_array_equal(gb, gy[:, 1:])
    out, (g,), gy = forward_backward(lambda u: F.permute(u, (2, 0, 1)), [b], device="cuda")
    np.testing.assert_array_equal(out, b.transpose(2, 0, 1))
    np.testing.assert_array_equal(g, gy.transpose(1, 2, 0))
    x = _rand((1, 6, 2, 1), np.float64)
    out = F.channel_shuffle(cn.tensor(x, device="cuda"), 3).numpy()
    np.testing.assert_array_equal(out, x.reshape(1, 3, 2, 2, 1).transpose(0, 2, 1, 3, 4).reshape(x.shape))


def test_reshape_and_flatten_are_views_with_gradients():
    a = _rand((2, 3, 2), np.float64)
    out, (g,), gy = forward_backward(lambda u: F.flatten(u), [a], device="cuda")
    np.testing.assert_array_equal(out, a.reshape(2, 6))
    np.testing.assert_array_equal(g, gy.reshape(a.shape))


def test_leaf_gradients_accumulate_on_the_device():
    x = cn.tensor(_rand((3,)), requires_grad=True, device="cuda")
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    assert x.grad.device == "cuda"
    np.testing.assert_allclose(x.grad.numpy(), np.full(3, 5.0))


def test_launcher_refuses_host_arrays():
    from cnn_numba.kernels.cuda import elementwise, launch
    dst = launch.empty((4,), np.float32)
    with pytest.raises(TypeError, match="host numpy array"):
        launch.launch(elementwise._copy, 4, np.zeros(4, np.float32), dst)
    with pytest.raises(TypeError, match="host array"):
        kernel("add", "cuda")(dst, np.ones(4, np.float32))


def test_index_checks_and_accuracy_count_return_scalars():
    t = cn.tensor(np.array([0, 3, 9, 2]), device="cuda")
    assert kernel("count_outside", "cuda")(t.data, 0, 5) == 1
    z = np.array([[0.1, 2.0, 0.0], [1.0, 1.0, 0.0], [np.nan, 5.0, 1.0], [0.0, 0.0, 0.5]], np.float32)
    labels = np.array([1, 1, 0, 2])
    got = kernel("count_correct", "cuda")(cn.tensor(z, device="cuda").data, cn.tensor(labels, device="cuda").data)
    assert got == kernel("count_correct", "cpu")(z, labels) == int((z.argmax(1) == labels).sum()) == 3
    with pytest.raises(ValueError, match=r"target must lie in \[0, 3\)"):
        F.cross_entropy(cn.tensor(z, device="cuda"), cn.tensor(np.array([0, 1, 3, 0]), device="cuda"))


def test_cuda_array_interface_shares_memory():
    x = cn.tensor(_rand((2, 3)), device="cuda")
    assert not hasattr(cn.tensor([1.0]), "__cuda_array_interface__")
    if CUDA_SIMULATED:  # the simulator has no device pointers: its own arrays stand in
        shared = cn.from_cuda_array(x.data)
    else:
        iface = x.__cuda_array_interface__
        assert iface["shape"] == (2, 3) and iface["typestr"] == "<f4"
        shared = cn.from_cuda_array(x)
    assert shared.device == "cuda" and shared.shape == (2, 3)
    kernel("relu_forward", "cuda")  # (any kernel) - now write through one, read through the other
    from cnn_numba.kernels.cuda import elementwise, launch
    launch.launch(elementwise._fill, 6, launch.flat(shared.data), np.float32(7.0))
    np.testing.assert_array_equal(x.numpy(), np.full((2, 3), 7.0, np.float32))
    with pytest.raises(TypeError):
        cn.from_cuda_array(np.zeros(3))


def test_module_to_cuda_and_back_keeps_the_state():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    state = model.state_dict()
    model.to("cuda")
    assert all(p.device == "cuda" for p in model.parameters())
    x = _rand((5, 4))
    y_cuda = model(cn.tensor(x, device="cuda")).numpy()
    model.to("cpu")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    np.testing.assert_allclose(y_cuda, model(cn.tensor(x)).numpy(), rtol=1e-5, atol=1e-6)


def _tiny_net():
    """Every layer kind a LeNet/ResNet step uses, on 1x6x6 images. (No conv bias before the batch
    norm: its gradient is zero up to rounding, which Adam would amplify differently per device.)"""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


@pytest.mark.parametrize("make_optimizer", [lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
                                            lambda p: optim.Adam(p, lr=0.01)], ids=["sgd", "adam"])
def test_training_steps_on_the_device_follow_the_cpu(make_optimizer):
    """The same model, data and optimiser on both devices: losses and parameters agree after
    two steps, and everything the step touches stays on the device."""
    rng = np.random.default_rng(3)
    xs, ys = rng.standard_normal((2, 3, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, (2, 3))
    runs = {}
    for device in ("cpu", "cuda"):
        cn.manual_seed(0)
        model = _tiny_net().to(device)
        opt = make_optimizer(model.parameters())
        losses = []
        for x, y in zip(xs, ys):
            loss = F.cross_entropy(model(cn.tensor(x, device=device)), cn.tensor(y, device=device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(p.device == device and p.grad.device == device for p in model.parameters())
        runs[device] = losses, model.state_dict()
    np.testing.assert_allclose(runs["cuda"][0], runs["cpu"][0], rtol=1e-4)
    for k, v in runs["cpu"][1].items():
        np.testing.assert_allclose(runs["cuda"][1][k], v, rtol=1e-3, atol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------- caching allocator


def test_block_sizes_round_up_and_the_cache_hands_back_what_it_was_given():
    from cnn_numba.kernels.cuda.memory import ALIGN, SMALL, BlockCache, rounded

    assert [rounded(s) for s in (0, 1, ALIGN, ALIGN + 1)] == [ALIGN, ALIGN, ALIGN, 2 * ALIGN]
    assert rounded(SMALL - 1) == SMALL and rounded(SMALL + 1) == 2 * SMALL
    cache = BlockCache()
    assert cache.take(ALIGN) is None
    cache.give(ALIGN, "a")
    cache.give(ALIGN, "b")
    cache.give(2 * ALIGN, "c")
    assert cache.cached_bytes == 4 * ALIGN
    assert cache.take(2 * ALIGN) == "c" and cache.take(2 * ALIGN) is None
    assert cache.take(ALIGN) == "b" and cache.cached_bytes == ALIGN
    assert cache.drain() == ["a"] and cache.cached_bytes == 0 and cache.take(ALIGN) is None


@pytest.mark.skipif(CUDA_SIMULATED or not cn.cuda_is_available(), reason="the allocator serves a real GPU only")
def test_a_freed_device_block_is_reused_and_keeps_no_stale_values():
    import gc

    from numba import cuda

    from cnn_numba.kernels.cuda.memory import install

    assert install()
    manager = cuda.current_context().memory_manager
    assert type(manager).__name__ == "CachingMemoryManager"
    a = cuda.to_device(np.arange(1000, dtype=np.float32))
    address = int(a.device_ctypes_pointer.value)
    del a
    gc.collect()
    before = manager.cache.cached_bytes
    b = cuda.to_device(np.full(1000, 7, np.float32))  # the same rounded size: the freed block
    assert int(b.device_ctypes_pointer.value) == address
    assert manager.cache.cached_bytes == before - 4096
    np.testing.assert_array_equal(b.copy_to_host(), 7)
    manager.release_cached()
    assert manager.cache.cached_bytes == 0
