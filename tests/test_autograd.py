"""The Tensor and its autograd: accumulation, no_grad, detach, elementwise ops, a chained graph; per-thread
grad mode, version counters, gradient checks and the freeing of the graph."""
from __future__ import annotations

import numpy as np
import pytest

import cnn_numba as cn
import cnn_numba.functional as F
import reference as R
from conftest import DTYPES, NAMED_ALGOS, needs_cuda


# ----------------------------------------------------------------------------- cn.tensor


def test_tensor_dtypes_and_copies():
    assert cn.tensor([[1.0, 2.0]]).dtype == np.float32           # Python lists: PyTorch's default
    for dt in (np.float32, np.float64):
        a = np.arange(6, dtype=dt).reshape(2, 3)
        t = cn.tensor(a)
        assert t.dtype == dt and t.shape == (2, 3) and t.device == "cpu"
        a[0, 0] = 100.0                                          # a copy: the tensor keeps its value
        assert t.numpy()[0, 0] == 0.0
    assert cn.tensor(np.zeros(3), dtype=np.float32).dtype == np.float32
    t = cn.tensor(np.ones((2, 2)), requires_grad=True)
    assert t.requires_grad and t.grad is None
    assert isinstance(cn.Tensor, type) and isinstance(t, cn.Tensor)


def test_tensor_from_non_contiguous_read_only_array():
    a = np.arange(24.0).reshape(2, 3, 4)[:, ::-1, ::2]
    a.flags.writeable = False
    t = cn.tensor(a)
    np.testing.assert_array_equal(t.numpy(), a)


# ----------------------------------------------------------------------------- accumulation


def test_tensor_used_twice_accumulates(rng):
    x = rng.standard_normal((1, 2, 5, 5))
    w1, w2 = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((3, 2, 3, 3))
    xt = cn.tensor(x, requires_grad=True)
    y = F.conv2d(xt, w1, padding=1) + F.conv2d(xt, w2, padding=1)
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    expected = R.conv2d_grads(x, w1, gy, padding=1)[0] + R.conv2d_grads(x, w2, gy, padding=1)[0]
    R.assert_close(xt.grad.numpy(), expected)
    # the same tensor on both sides of one op
    a = cn.tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    (a * a).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), [2.0, -4.0, 6.0])


def test_non_leaf_used_twice(rng):
    """A diamond: a = conv(x, w) feeds relu(a) and a * a."""
    x, w = rng.standard_normal((1, 1, 4, 4)), rng.standard_normal((2, 1, 2, 2))
    xt, wt = cn.tensor(x, requires_grad=True), cn.tensor(w, requires_grad=True)
    a = F.conv2d(xt, wt)
    (F.relu(a) + a * a).sum().backward()
    ra = R.conv2d(x, w)
    ga = (ra > 0) + 2 * ra
    gx, gw, _ = R.conv2d_grads(x, w, ga)
    R.assert_close(xt.grad.numpy(), gx)
    R.assert_close(wt.grad.numpy(), gw)


def test_grad_accumulates_across_backward_calls(rng):
    x, w = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((2, 2, 3, 3))
    xt, wt = cn.tensor(x, requires_grad=True), cn.tensor(w, requires_grad=True)
    F.conv2d(xt, wt).sum().backward()
    first = wt.grad.numpy().copy()
    gy = np.ones((2, 2, 2, 2))
    R.assert_close(first, R.conv2d_grads(x, w, gy)[1])
    F.conv2d(xt, wt).sum().backward()
    R.assert_close(wt.grad.numpy(), 2 * first)
    (xt * 3.0).sum().backward()
    R.assert_close(xt.grad.numpy(), 2 * R.conv2d_grads(x, w, gy)[0] + 3.0)


def test_grads_do_not_alias_the_seed_or_each_other(rng):
    """PyTorch gives every leaf its own .grad; writing into one must not change another or the seed."""
    a = cn.tensor(np.zeros((2, 3)), requires_grad=True)
    b = cn.tensor(np.zeros((2, 3)), requires_grad=True)
    gy = rng.standard_normal((2, 3))
    seed = gy.copy()
    (a + b).backward(gy)
    gy[...] = 7.0                       # the caller reuses its buffer
    np.testing.assert_array_equal(a.grad.numpy(), seed)
    np.testing.assert_array_equal(b.grad.numpy(), seed)
    ga = a.grad.numpy()
    if ga.flags.writeable:
        ga[...] = 0.0                   # an in-place zero_grad on one leaf only
        np.testing.assert_array_equal(b.grad.numpy(), seed)


def test_backward_seed_rules(rng):
    x = cn.tensor(rng.standard_normal((2, 3)), requires_grad=True)
    y = x * 2.0
    with pytest.raises((RuntimeError, ValueError)):
        y.backward()                     # non-scalar needs an explicit gradient
    with pytest.raises((RuntimeError, ValueError)):
        y.backward(np.ones((3, 2)))      # wrong shape
    y.backward(cn.tensor(np.ones((2, 3))), retain_graph=True)  # a Tensor seed works; y.sum() reuses the graph
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 2.0))
    s = y.sum()
    assert s.shape in ((), (1,))
    s.backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 4.0))


# ----------------------------------------------------------------------------- no_grad, detach


def test_no_grad_records_nothing(rng):
    x = cn.tensor(rng.standard_normal((1, 1, 4, 4)), requires_grad=True)
    w = cn.tensor(rng.standard_normal((1, 1, 3, 3)), requires_grad=True)
    with cn.no_grad():
        y = F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)
        z = (y * 2.0 + y).sum()
        assert not y.requires_grad and not z.requires_grad
    with pytest.raises(RuntimeError):
        z.backward()
    assert x.grad is None and w.grad is None
    assert F.conv2d(x, w).requires_grad            # recording is back on
    with pytest.raises(KeyError):
        with cn.no_grad():
            raise KeyError("inside")
    assert F.conv2d(x, w).requires_grad            # and restored after an exception


def test_detach_stops_the_gradient(rng):
    x, w = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((1, 2, 3, 3))
    xt, wt = cn.tensor(x, requires_grad=True), cn.tensor(w, requires_grad=True)
    d = xt.detach()
    assert not d.requires_grad
    np.testing.assert_array_equal(d.numpy(), x)
    F.conv2d(d, wt).sum().backward()
    assert xt.grad is None
    R.assert_close(wt.grad.numpy(), R.conv2d_grads(x, w, np.ones((1, 1, 2, 2)))[1])
    # detaching a non-leaf cuts the graph there
    y = F.conv2d(xt, wt)
    (y.detach() * y).sum().backward()
    R.assert_close(xt.grad.numpy(), R.conv2d_grads(x, w, R.conv2d(x, w))[0])


def test_constants_get_no_grad(rng):
    x = rng.standard_normal((1, 2, 4, 4))
    wt = cn.tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    bt = cn.tensor(rng.standard_normal(3), requires_grad=True)
    y = F.conv2d(x, wt.detach(), bt)                # only the bias requires grad
    assert y.requires_grad
    y.sum().backward()
    np.testing.assert_allclose(bt.grad.numpy(), np.full(3, 4.0))
    assert wt.grad is None
    y = F.conv2d(x, wt.detach())
    assert not y.requires_grad


# ----------------------------------------------------------------------------- elementwise


def test_broadcasting_elementwise_grads(rng):
    a, b = rng.standard_normal((2, 3, 1, 4)), rng.standard_normal((3, 5, 1))
    at, bt = cn.tensor(a, requires_grad=True), cn.tensor(b, requires_grad=True)
    y = (at + bt) * at - bt
    assert y.shape == (2, 3, 5, 4)
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    # y = a^2 + a*b - b
    ga = (gy * (2 * a + b)).sum(axis=2, keepdims=True)
    gb = (gy * (a - 1)).sum(axis=0).sum(axis=-1, keepdims=True)
    R.assert_close(at.grad.numpy(), ga)
    R.assert_close(bt.grad.numpy(), gb)


def test_reshape_sizes_as_pytorch():
    """-1 stands for the size that is left, and a product that matches needs no -1; zero-size
    tensors reshape too (refusals: tests/test_errors.py)."""
    assert cn.tensor(np.ones((2, 3))).reshape(-1, 2).shape == (3, 2)
    assert cn.tensor(np.ones((2, 3))).reshape(3, 2).shape == (3, 2)
    assert cn.tensor(np.ones((0, 3))).reshape(3, 0).shape == (3, 0)
    assert F.flatten(cn.tensor(np.ones((4, 2, 3)))).shape == (4, 6)


def test_scalars_arrays_sum_mean_reshape(rng):
    a = rng.standard_normal((2, 6)).astype(np.float32)
    t = cn.tensor(a, requires_grad=True)
    c = rng.standard_normal((3, 4)).astype(np.float32)
    y = (2.0 - t * 3.0).reshape(3, 4) * c + 1.0
    assert y.dtype == np.float32 and y.shape == (3, 4)
    R.assert_close(y.numpy(), (2.0 - a * 3.0).reshape(3, 4) * c + 1.0, np.float32)
    m = y.mean()
    R.assert_close(m.numpy().reshape(()), ((2.0 - a * 3.0).reshape(3, 4) * c + 1.0).mean(), np.float32)
    m.backward()
    R.assert_close(t.grad.numpy(), (-3.0 * c / 12.0).reshape(2, 6), np.float32)
    u = cn.tensor(np.ones((2, 2)), requires_grad=True)
    (np.full((2, 2), 5.0) * u).sum().backward()     # ndarray on the left defers to the Tensor
    np.testing.assert_array_equal(u.grad.numpy(), np.full((2, 2), 5.0))
    r = cn.tensor(np.arange(6.0), requires_grad=True)
    r.reshape((2, 3)).reshape(6).reshape(3, 2).sum().backward()
    np.testing.assert_array_equal(r.grad.numpy(), np.ones(6))


# ----------------------------------------------------------------------------- a small network


@pytest.mark.parametrize("algo", NAMED_ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_conv_relu_pool_sum_chain(rng, dtype, algo):
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    w2 = rng.standard_normal((2, 2, 2, 2)).astype(dtype)
    c = rng.standard_normal((4, 1, 2)).astype(dtype)
    xt, wt, bt, w2t = (cn.tensor(v, requires_grad=True) for v in (x, w, b, w2))
    a = F.conv2d(xt, wt, bt, padding=1, algo=algo)                    # (2, 4, 7, 6)
    r = F.relu(a)
    p = F.max_pool2d(r, 2, ceil_mode=True)                            # (2, 4, 4, 3)
    z = F.conv2d(p, w2, None, stride=(1, 2), groups=2, algo=algo)     # (2, 2, 3, 1)
    q = F.avg_pool2d(F.conv_transpose2d(z, w2t, stride=2, groups=2, algo=algo), 2, stride=1)  # (2,4,6,2) -> (2,4,5,1)
    loss = (F.adaptive_avg_pool2d(q, 2) * c).mean()                   # c (4, 1, 2) broadcasts
    loss.backward()

    # the same graph on the reference, backward written out by hand
    ra = R.conv2d(x, w, b, padding=1)
    rr = R.relu(ra)
    rp, ridx = R.max_pool2d(rr, 2, ceil_mode=True)
    rz = R.conv2d(rp, w2, None, stride=(1, 2), groups=2)
    rt = R.conv_transpose2d(rz, w2, stride=2, groups=2)
    rq = R.avg_pool2d(rt, 2, stride=1)
    ro = R.adaptive_avg_pool2d(rq, 2)
    R.assert_close(loss.numpy().reshape(()), (ro * c).mean(), dtype, "loss")
    g_ro = np.broadcast_to(c / ro.size, ro.shape)
    g_rq = R.adaptive_avg_pool2d_grad(g_ro, rq.shape)
    g_rt = R.avg_pool2d_grad(g_rq, rt.shape, 2, stride=1)
    g_rz, g_w2t, _ = R.conv_transpose2d_grads(rz, w2, g_rt, stride=2, groups=2)
    g_rp, _, _ = R.conv2d_grads(rp, w2, g_rz, stride=(1, 2), groups=2)
    g_rr = R.max_pool2d_grad(g_rp, ridx, rr.shape)
    g_ra = R.relu_grad(ra, g_rr)
    gx, gw, gb = R.conv2d_grads(x, w, g_ra, padding=1)
    R.assert_close(xt.grad.numpy(), gx, dtype, "gx")
    R.assert_close(wt.grad.numpy(), gw, dtype, "gw")
    R.assert_close(bt.grad.numpy(), gb, dtype, "gb")
    R.assert_close(w2t.grad.numpy(), g_w2t, dtype, "gw2")


# ----------------------------------------------------------------------------- grad mode: per thread


def test_grad_mode_is_per_thread(rng):
    """One thread inside no_grad() must not stop another thread's graph (PyTorch's mode is thread-local)."""
    import threading

    x = cn.tensor(rng.standard_normal(3), requires_grad=True)
    inside, forward_done = threading.Event(), threading.Event()
    seen = {}

    def eval_thread():
        with cn.no_grad():
            inside.set()
            forward_done.wait(10)              # stays inside no_grad while the main thread runs its forward
            seen["eval"] = (cn.is_grad_enabled(), (x * 2.0).requires_grad)

    t = threading.Thread(target=eval_thread)
    t.start()
    assert inside.wait(10)
    y = (x * 3.0).sum()                        # the main thread: grad mode still on here
    assert cn.is_grad_enabled() and y.requires_grad
    forward_done.set()
    t.join(10)
    assert seen["eval"] == (False, False)
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full(3, 3.0))
    # and the other way round: a new thread starts with grad mode on, whatever its parent's mode
    with cn.no_grad():
        t = threading.Thread(target=lambda: seen.update(child=(cn.is_grad_enabled(), (x * 2.0).requires_grad)))
        t.start()
        t.join(10)
        assert not cn.is_grad_enabled()
    assert seen["child"] == (True, True)


def test_enable_grad_set_grad_enabled_and_decorators(rng):
    x = cn.tensor(rng.standard_normal(3), requires_grad=True)
    with cn.no_grad():
        with cn.enable_grad():
            assert cn.is_grad_enabled() and (x * 2.0).requires_grad
        assert not (x * 2.0).requires_grad
    ctx = cn.set_grad_enabled(False)           # sets the mode at once, as torch.set_grad_enabled
    assert not cn.is_grad_enabled()
    cn.set_grad_enabled(True)
    assert cn.is_grad_enabled()
    with cn.set_grad_enabled(False):
        assert not (x * 2.0).requires_grad
        with cn.set_grad_enabled(True):
            assert (x * 2.0).requires_grad
        assert not cn.is_grad_enabled()
    assert cn.is_grad_enabled() and ctx is not None

    @cn.no_grad()
    def infer(t):
        return t * 2.0, cn.is_grad_enabled()

    @cn.set_grad_enabled(False)                # decorating does not change the caller's mode
    def infer2(t):
        return t * 2.0

    assert cn.is_grad_enabled()
    y, mode = infer(x)
    assert not y.requires_grad and not mode and not infer2(x).requires_grad
    assert cn.is_grad_enabled() and (x * 2.0).requires_grad

    @cn.enable_grad()
    def train(t):
        return t * 2.0

    with cn.no_grad():
        assert train(x).requires_grad
        assert not cn.is_grad_enabled()
    @cn.no_grad()
    def fails():
        raise KeyError("inside")

    with pytest.raises(KeyError):
        fails()
    assert cn.is_grad_enabled()
    with pytest.raises(KeyError):
        with cn.enable_grad(), cn.no_grad():
            raise KeyError("inside")
    assert cn.is_grad_enabled()


# ----------------------------------------------------------------------------- version counter


def test_inplace_methods_bump_the_version_and_write(rng):
    a = rng.standard_normal((2, 3)).astype(np.float32)
    t = cn.tensor(a)
    assert t._version == 0
    assert t.zero_() is t and t._version == 1
    np.testing.assert_array_equal(t.numpy(), np.zeros((2, 3)))
    t.fill_(2.5)
    assert t._version == 2
    np.testing.assert_array_equal(t.numpy(), np.full((2, 3), 2.5, np.float32))
    t.copy_(cn.tensor(a))
    np.testing.assert_array_equal(t.numpy(), a)
    t.copy_(np.arange(3.0))                    # broadcast and cast, as torch's copy_
    assert t._version == 4 and t.dtype == np.float32
    np.testing.assert_array_equal(t.numpy(), np.tile(np.arange(3.0, dtype=np.float32), (2, 1)))
    with pytest.raises(ValueError, match=r"\(4,\).*\(2, 3\)"):
        t.copy_(np.zeros(4))
    assert t._version == 4
    # views share the counter (and the memory)
    d, r = t.detach(), t.reshape(3, 2)
    d.fill_(1.0)
    assert t._version == d._version == r._version == 5
    np.testing.assert_array_equal(r.numpy(), np.ones((3, 2)))
    # a leaf that requires grad: in place only under no_grad (PyTorch's rule)
    p = cn.tensor(a, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        p.zero_()
    with cn.no_grad():
        p.zero_()
    assert p._version == 1


def _conv_loss(x, w):
    return F.relu(F.conv2d(x, w, padding=1)).sum()


@pytest.mark.parametrize("make_opt", [
    lambda ps: cn.optim.SGD(ps, lr=0.1),
    lambda ps: cn.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    lambda ps: cn.optim.Adam(ps, lr=0.1, weight_decay=1e-2, amsgrad=True),
    lambda ps: cn.optim.AdamW(ps, lr=0.1),
], ids=["sgd", "sgd-momentum-wd", "adam-wd-amsgrad", "adamw"])
def test_optimizer_step_between_forward_and_backward_raises(rng, make_opt):
    x = cn.tensor(rng.standard_normal((1, 2, 5, 5)))
    w = cn.nn.Parameter(rng.standard_normal((3, 2, 3, 3)))
    opt = make_opt([w])
    w.grad = cn.tensor(np.ones(w.shape))
    loss = _conv_loss(x, w)                    # Conv2d saved w at version 0
    opt.step()                                 # moves w in place: version 1
    assert w._version == 1
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: \[Conv2d\] input 1 .*"
                                           r"is at version 1; expected version 0 instead"):
        loss.backward()


def test_normal_train_loop_does_not_raise(rng):
    """zero_grad, forward, backward, step, over and over: each forward saves the current versions."""
    model = cn.nn.Sequential(cn.nn.Conv2d(1, 2, 3), cn.nn.ReLU(), cn.nn.Flatten(), cn.nn.Linear(2 * 4 * 4, 3))
    opt = cn.optim.Adam(model.parameters(), lr=0.05)
    x = cn.tensor(rng.standard_normal((4, 1, 6, 6)).astype(np.float32))
    y = cn.tensor(np.array([0, 1, 2, 1]))
    losses = []
    before = [p._version for p in model.parameters()]  # initialisation wrote them too
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert [p._version for p in model.parameters()] == [v + 5 for v in before]


def test_saved_output_and_views_are_checked(rng):
    x = cn.tensor(rng.standard_normal(4), requires_grad=True)
    y = F.relu(x)                              # ReLU saves its output
    z = y.sum()                                # (Sum saves no values)
    with cn.no_grad():
        y.detach().zero_()                     # the same memory: the saved output changed
    with pytest.raises(RuntimeError, match=r"\[ReLU\] its output is at version 1; expected version 0"):
        z.backward()
    # a parameter used through a view: the view shares the parameter's counter
    w = cn.tensor(rng.standard_normal(6), requires_grad=True)
    with cn.no_grad():
        w.fill_(1.0)                           # version 1 before the forward: no error for that
    x = cn.tensor(rng.standard_normal((2, 3)))
    F.linear(x, w.reshape(2, 3)).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), np.tile(x.numpy().sum(0), 2))
    loss = F.linear(x, w.reshape(2, 3)).sum()
    with cn.no_grad():
        w.fill_(0.0)
    with pytest.raises(RuntimeError, match=r"\[Linear\] input 1 \(shape \(2, 3\)\) is at version 2; expected version 1"):
        loss.backward()


def test_changed_inputs_that_were_not_saved_are_fine(rng):
    """Add saves neither input (its gradient needs no values), so PyTorch lets them change; so do we."""
    a, b = cn.tensor(rng.standard_normal(3), requires_grad=True), cn.tensor(rng.standard_normal(3))
    y = (a + b).sum()
    with cn.no_grad():
        a.fill_(7.0)
        b.fill_(7.0)
    y.backward()
    np.testing.assert_array_equal(a.grad.numpy(), np.ones(3))


# ----------------------------------------------------------------------------- gradients checked where they enter


def test_backward_grad_dtype_device_shape(rng):
    x = cn.tensor(rng.standard_normal((2, 3)).astype(np.float32), requires_grad=True)
    y = x * 2.0
    with pytest.raises(TypeError, match="float64.*float32"):
        y.backward(cn.tensor(np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        y.backward(cn.tensor(np.ones((3, 2), np.float32)))
    with pytest.raises(ValueError, match=r"\(6,\).*\(2, 3\)"):
        y.backward(np.ones(6))
    assert x.grad is None                      # nothing ran
    y.backward(np.ones((2, 3)))                # host arrays are data: cast to the tensor's dtype
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 2.0))


class _BadShape(cn.Function):
    def forward(self, a):
        return a * 2

    def backward(self, gy):
        return (gy[:1],)


class _BadDtype(cn.Function):
    def forward(self, a):
        return a * 2

    def backward(self, gy):
        return (gy.astype(np.float64),)


def test_function_gradients_are_checked():
    x = cn.tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"_BadShape returned an invalid gradient at index 0: got shape \(1,\)"):
        _BadShape.apply(x).sum().backward()
    with pytest.raises(RuntimeError, match="_BadDtype returned an invalid gradient at index 0: .*float64.*float32"):
        _BadDtype.apply(x).sum().backward()
    assert x.grad is None


def test_leaf_gradient_accumulation_never_broadcasts():
    x = cn.tensor(np.ones(3), requires_grad=True)
    x.grad = cn.tensor(np.ones(1))             # np.add would broadcast this to (3,)
    with pytest.raises(ValueError, match=r"shape \(1,\).*shape \(3,\)"):
        (x * 2.0).sum().backward()
    x.grad = cn.tensor(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="float32.*float64"):
        (x * 2.0).sum().backward()


# ----------------------------------------------------------------------------- the graph is freed


def test_graph_is_freed_after_backward(rng):
    import gc
    import weakref

    x = cn.tensor(rng.standard_normal((1, 1, 5, 5)))
    w = cn.tensor(rng.standard_normal((2, 1, 3, 3)), requires_grad=True)
    a = F.conv2d(x, w)
    activation = weakref.ref(a)
    loss = F.relu(a).sum()
    del a
    gc.collect()
    assert activation() is not None            # the graph holds the activation until backward
    loss.backward()
    gc.collect()
    assert activation() is None                # and lets it go after
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    # retain_graph keeps it for a second pass; then the default frees it
    w.grad = None
    loss = _conv_loss(x, w)
    loss.backward(retain_graph=True)
    first = w.grad.numpy().copy()
    loss.backward()
    np.testing.assert_allclose(w.grad.numpy(), 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


@needs_cuda
def test_inplace_versions_and_optimizer_checks_on_cuda(rng):
    a = rng.standard_normal((2, 3)).astype(np.float32)
    t = cn.tensor(a, device="cuda")
    t.fill_(3.0)
    np.testing.assert_array_equal(t.numpy(), np.full((2, 3), 3.0, np.float32))
    t.copy_(cn.tensor(a, device="cuda"))
    np.testing.assert_array_equal(t.numpy(), a)
    t.copy_(np.arange(3.0))                    # from the host, broadcast and cast
    np.testing.assert_array_equal(t.numpy(), np.tile(np.arange(3.0, dtype=np.float32), (2, 1)))
    assert t._version == 3
    w = cn.nn.Parameter(cn.tensor(rng.standard_normal((4, 3)).astype(np.float32), device="cuda"))
    opt = cn.optim.SGD([w], lr=0.1, momentum=0.9)
    loss = F.linear(t, w).sum()
    w.grad = cn.tensor(np.ones((4, 3), np.float32))                  # on the host
    with pytest.raises(ValueError, match="parameter 0 .*device 'cuda'.*device 'cpu'"):
        opt.step()
    w.grad = cn.tensor(np.ones((4, 3), np.float32), device="cuda")
    opt.step()
    with pytest.raises(RuntimeError, match=r"\[Linear\] input 1 .* is at version 1; expected version 0"):
        loss.backward()
    with pytest.raises(ValueError, match="device 'cpu'.*'cuda'"):
        F.linear(t, w).sum().backward(cn.tensor(np.ones((), np.float32)))
