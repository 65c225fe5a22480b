"""Independent float64 references for the tests: plain numpy, never cnn_numba.

Layouts are PyTorch's: x (N, C, H, W); conv weight (CO, C/G, KH, KW); transposed-conv
weight (C, CO/G, KH, KW). Every function computes in float64 and returns float64.

Each forward is written from its definition and each gradient is written out
directly (no autodiff), so the package is compared with something that shares none
of its index arithmetic:

    conv2d            y[n,o,r,q] = b[o] + sum_{c in group(o), a, e} w[o,c,a,e] * xp[n,c, r*sh + a*dh, q*sw + e*dw]
                      with xp the explicitly zero-padded input (pads may be asymmetric)
    conv_transpose2d  the scatter: each x[n,c,i,j] * w[c,o,:,:] is added to full[n,o, i*sh + a*dh, j*sw + e*dw],
                      then full is cropped by the padding (output_padding only extends the bottom/right)
    max_pool2d        loops over windows; PyTorch's CPU rule: update when ``v > best or isnan(v)``,
                      padding never wins, index = h*W + w on the unpadded plane
    avg_pool2d        PyTorch's divisor rules (count_include_pad, divisor_override, clipped windows)
    adaptive pools    window [floor(i*H/O), ceil((i+1)*H/O))
"""
from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------- arguments


def _pair(v):
    if isinstance(v, (tuple, list)):
        assert len(v) == 2
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv_pads(padding, kernel_hw, dilation_hw):
    """(top, bottom, left, right) for conv2d's padding argument."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        assert padding == "same"
        (kh, kw), (dh, dw) = kernel_hw, dilation_hw
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


def pad(x, top, bottom, left, right):
    x = np.asarray(x, np.float64)
    out = np.zeros(x.shape[:2] + (x.shape[2] + top + bottom, x.shape[3] + left + right))
    out[:, :, top:top + x.shape[2], left:left + x.shape[3]] = x
    return out


def conv_out_size(i, k, s, p0, p1, d):
    return (i + p0 + p1 - d * (k - 1) - 1) // s + 1


def conv_transpose_out_size(i, k, s, p, d, op):
    return (i - 1) * s - 2 * p + d * (k - 1) + op + 1


def pool_out_size(i, k, s, p, d, ceil_mode):
    span = i + 2 * p - d * (k - 1) - 1
    o = (math.ceil(span / s) if ceil_mode else span // s) + 1
    if ceil_mode and (o - 1) * s >= i + p:
        o -= 1  # PyTorch: the last window may not start inside the right padding
    return o


def _taps(xp, a, e, sh, sw, dh, dw, oh, ow):
    """xp[:, :, r*sh + a*dh, q*sw + e*dw] for r < oh, q < ow: the inputs seen through tap (a, e)."""
    return xp[:, :, a * dh: a * dh + (oh - 1) * sh + 1: sh, e * dw: e * dw + (ow - 1) * sw + 1: sw]


# ----------------------------------------------------------------------------- conv2d


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    co, cig, kh, kw = w.shape
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    t, bo, l, r = conv_pads(padding, (kh, kw), (dh, dw))
    oh, ow = conv_out_size(h, kh, sh, t, bo, dh), conv_out_size(wd, kw, sw, l, r, dw)
    assert oh > 0 and ow > 0 and c == cig * groups and co % groups == 0
    xp = pad(x, t, bo, l, r)
    cog = co // groups
    y = np.zeros((n, co, oh, ow))
    for g in range(groups):
        xs, os_ = slice(g * cig, (g + 1) * cig), slice(g * cog, (g + 1) * cog)
        for a in range(kh):
            for e in range(kw):
                patch = _taps(xp[:, xs], a, e, sh, sw, dh, dw, oh, ow)  # (n, cig, oh, ow)
                y[:, os_] += np.einsum("nchw,oc->nohw", patch, w[os_, :, a, e])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv2d_grads(x, w, gy, stride=1, padding=0, dilation=1, groups=1):
    """(gx, gw, gb) of sum(conv2d(x, w, b) * gy), written directly."""
    x, w, gy = (np.asarray(a, np.float64) for a in (x, w, gy))
    n, c, h, wd = x.shape
    co, cig, kh, kw = w.shape
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    t, bo, l, r = conv_pads(padding, (kh, kw), (dh, dw))
    oh, ow = gy.shape[2:]
    xp = pad(x, t, bo, l, r)
    gxp = np.zeros(xp.shape)  # not zeros_like, which writes every page: huge paddings stay untouched
    gw = np.zeros_like(w)
    cog = co // groups
    for g in range(groups):
        xs, os_ = slice(g * cig, (g + 1) * cig), slice(g * cog, (g + 1) * cog)
        for a in range(kh):
            for e in range(kw):
                patch = _taps(xp[:, xs], a, e, sh, sw, dh, dw, oh, ow)
                gw[os_, :, a, e] = np.einsum("nohw,nchw->oc", gy[:, os_], patch)
                # scatter each output gradient back onto the padded input it read
                _taps(gxp[:, xs], a, e, sh, sw, dh, dw, oh, ow)[...] += np.einsum(
                    "nohw,oc->nchw", gy[:, os_], w[os_, :, a, e])
    gx = gxp[:, :, t:t + h, l:l + wd]
    return gx, gw, gy.sum(axis=(0, 2, 3))


def conv2d_loops(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d with one Python loop per index: slow, used only to check ``conv2d`` itself."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    co, cig, kh, kw = w.shape
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    t, bo, l, r = conv_pads(padding, (kh, kw), (dh, dw))
    oh, ow = conv_out_size(h, kh, sh, t, bo, dh), conv_out_size(wd, kw, sw, l, r, dw)
    cog = co // groups
    y = np.zeros((n, co, oh, ow))
    for i in range(n):
        for o in range(co):
            for rr in range(oh):
                for q in range(ow):
                    s = 0.0 if b is None else float(b[o])
                    for ci in range(cig):
                        cc = (o // cog) * cig + ci
                        for a in range(kh):
                            for e in range(kw):
                                hh, ww = rr * sh - t + a * dh, q * sw - l + e * dw
                                if 0 <= hh < h and 0 <= ww < wd:
                                    s += w[o, ci, a, e] * x[i, cc, hh, ww]
                    y[i, o, rr, q] = s
    return y


# ----------------------------------------------------------------------------- conv_transpose2d


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    ci_w, cog, kh, kw = w.shape
    assert ci_w == c and c % groups == 0
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = map(_pair, (stride, padding, output_padding, dilation))
    oh = conv_transpose_out_size(h, kh, sh, ph, dh, oph)
    ow = conv_transpose_out_size(wd, kw, sw, pw, dw, opw)
    full = np.zeros((n, cog * groups, (h - 1) * sh + dh * (kh - 1) + 1 + oph,
                     (wd - 1) * sw + dw * (kw - 1) + 1 + opw))
    cig = c // groups
    for g in range(groups):
        xs, os_ = slice(g * cig, (g + 1) * cig), slice(g * cog, (g + 1) * cog)
        for a in range(kh):
            for e in range(kw):
                # input pixel (i, j) lands on full[i*sh + a*dh, j*sw + e*dw]
                _taps(full[:, os_], a, e, sh, sw, dh, dw, h, wd)[...] += np.einsum(
                    "nchw,co->nohw", x[:, xs], w[xs, :, a, e])
    y = full[:, :, ph:ph + oh, pw:pw + ow].copy()
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv_transpose2d_grads(x, w, gy, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """(gx, gw, gb) of sum(conv_transpose2d(x, w, b) * gy), written directly."""
    x, w, gy = (np.asarray(a, np.float64) for a in (x, w, gy))
    n, c, h, wd = x.shape
    _, cog, kh, kw = w.shape
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = map(_pair, (stride, padding, output_padding, dilation))
    oh, ow = gy.shape[2:]
    gfull = np.zeros((n, gy.shape[1], (h - 1) * sh + dh * (kh - 1) + 1 + oph,
                      (wd - 1) * sw + dw * (kw - 1) + 1 + opw))
    gfull[:, :, ph:ph + oh, pw:pw + ow] = gy  # the cropped border gets no gradient
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    cig = c // groups
    for g in range(groups):
        xs, os_ = slice(g * cig, (g + 1) * cig), slice(g * cog, (g + 1) * cog)
        for a in range(kh):
            for e in range(kw):
                seen = _taps(gfull[:, os_], a, e, sh, sw, dh, dw, h, wd)  # (n, cog, h, wd)
                gx[:, xs] += np.einsum("nohw,co->nchw", seen, w[xs, :, a, e])
                gw[xs, :, a, e] = np.einsum("nchw,nohw->co", x[:, xs], seen)
    return gx, gw, gy.sum(axis=(0, 2, 3))


# ----------------------------------------------------------------------------- pooling


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """(out, indices) with PyTorch's CPU semantics."""
    x = np.asarray(x, np.float64)
    n, c, h, wd = x.shape
    (kh, kw) = _pair(kernel_size)
    (sh, sw) = _pair(kernel_size if stride is None else stride)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    oh = pool_out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_out_size(wd, kw, sw, pw, dw, ceil_mode)
    out = np.empty((n, c, oh, ow))
    idx = np.empty((n, c, oh, ow), np.int64)
    for i in range(n):
        for cc in range(c):
            for r in range(oh):
                for q in range(ow):
                    best, arg = -np.inf, -1
                    for a in range(kh):
                        hh = r * sh - ph + a * dh
                        if not 0 <= hh < h:
                            continue
                        for e in range(kw):
                            ww = q * sw - pw + e * dw
                            if not 0 <= ww < wd:
                                continue
                            v = x[i, cc, hh, ww]
                            if arg < 0 or v > best or np.isnan(v):
                                best, arg = v, hh * wd + ww
                    if arg < 0:
                        raise ValueError("a pooling window lies entirely in the padding")
                    out[i, cc, r, q], idx[i, cc, r, q] = best, arg
    return out, idx


def max_pool2d_grad(gy, indices, input_shape):
    """gx: each output gradient added at its argmax (overlapping windows accumulate)."""
    n, c, h, wd = input_shape
    gx = np.zeros((n, c, h * wd))
    gy = np.asarray(gy, np.float64)
    m = gy.shape[2] * gy.shape[3]
    gy, idx = gy.reshape(n, c, m), np.asarray(indices).reshape(n, c, m)
    for i in range(n):
        for cc in range(c):
            np.add.at(gx[i, cc], idx[i, cc], gy[i, cc])
    return gx.reshape(input_shape)


def max_unpool2d(x, indices, kernel_size, stride=None, padding=0, output_size=None):
    x = np.asarray(x, np.float64)
    n, c, h, wd = x.shape
    (kh, kw) = _pair(kernel_size)
    (sh, sw) = _pair(kernel_size if stride is None else stride)
    (ph, pw) = _pair(padding)
    if output_size is None:
        oh, ow = (h - 1) * sh - 2 * ph + kh, (wd - 1) * sw - 2 * pw + kw
    else:
        oh, ow = tuple(output_size)[-2:]
    out = np.zeros((n, c, oh * ow))
    idx = np.asarray(indices).reshape(n, c, h * wd)
    for i in range(n):
        for cc in range(c):
            out[i, cc, idx[i, cc]] = x[i, cc].reshape(-1)
    return out.reshape(n, c, oh, ow)


def max_unpool2d_grad(gy, indices):
    """gx[n, c, p] = gy[n, c, indices[n, c, p]]: unpooling gathers its gradient back."""
    gy = np.asarray(gy, np.float64)
    n, c = gy.shape[:2]
    flat = gy.reshape(n, c, gy.shape[2] * gy.shape[3])
    idx = np.asarray(indices)
    return np.take_along_axis(flat, idx.reshape(n, c, idx.shape[2] * idx.shape[3]), axis=2).reshape(idx.shape)


def _avg_windows(h, k, s, p, o_count):
    """Per output: (start, end) clipped to the input and the count_include_pad size."""
    res = []
    for o in range(o_count):
        start = o * s - p
        end = min(start + k, h + p)  # PyTorch clips the window to the padded input first
        res.append((max(start, 0), min(end, h), end - start))
    return res


def _avg_plan(shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    n, c, h, wd = shape
    (kh, kw) = _pair(kernel_size)
    (sh, sw) = _pair(kernel_size if stride is None else stride)
    (ph, pw) = _pair(padding)
    oh, ow = pool_out_size(h, kh, sh, ph, 1, ceil_mode), pool_out_size(wd, kw, sw, pw, 1, ceil_mode)
    plan = []
    for r, (h0, h1, hp) in enumerate(_avg_windows(h, kh, sh, ph, oh)):
        for q, (w0, w1, wp) in enumerate(_avg_windows(wd, kw, sw, pw, ow)):
            if divisor_override:
                div = divisor_override
            elif count_include_pad:
                div = hp * wp
            else:
                div = (h1 - h0) * (w1 - w0)
            plan.append((r, q, h0, h1, w0, w1, div))
    return (oh, ow), plan


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    x = np.asarray(x, np.float64)
    (oh, ow), plan = _avg_plan(x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad,
                               divisor_override)
    out = np.zeros(x.shape[:2] + (oh, ow))
    for r, q, h0, h1, w0, w1, div in plan:
        if h1 > h0 and w1 > w0:
            out[:, :, r, q] = x[:, :, h0:h1, w0:w1].sum(axis=(2, 3)) / div
    return out


def avg_pool2d_grad(gy, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
                    count_include_pad=True, divisor_override=None):
    gy = np.asarray(gy, np.float64)
    _, plan = _avg_plan(input_shape, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override)
    gx = np.zeros(input_shape)
    for r, q, h0, h1, w0, w1, div in plan:
        gx[:, :, h0:h1, w0:w1] += (gy[:, :, r, q] / div)[:, :, None, None]
    return gx


def _adaptive_windows(i, o):
    return [((j * i) // o, -((-(j + 1) * i) // o)) for j in range(o)]


def adaptive_avg_pool2d(x, output_size):
    x = np.asarray(x, np.float64)
    oh, ow = _pair(output_size)
    out = np.zeros(x.shape[:2] + (oh, ow))
    for r, (h0, h1) in enumerate(_adaptive_windows(x.shape[2], oh)):
        for q, (w0, w1) in enumerate(_adaptive_windows(x.shape[3], ow)):
            out[:, :, r, q] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def adaptive_avg_pool2d_grad(gy, input_shape):
    gy = np.asarray(gy, np.float64)
    oh, ow = gy.shape[2:]
    gx = np.zeros(input_shape)
    for r, (h0, h1) in enumerate(_adaptive_windows(input_shape[2], oh)):
        for q, (w0, w1) in enumerate(_adaptive_windows(input_shape[3], ow)):
            gx[:, :, h0:h1, w0:w1] += (gy[:, :, r, q] / ((h1 - h0) * (w1 - w0)))[:, :, None, None]
    return gx


def relu(x):
    return np.maximum(np.asarray(x, np.float64), 0.0)


def batch_norm_eval(x, mean, var, weight=None, bias=None, eps=1e-5):
    """Eval-mode batch norm of x (N, C, H, W) with running statistics mean, var (C,), written
    element by element in float64: (x - mean) / sqrt(var + eps) * weight + bias."""
    x = np.asarray(x, np.float64)
    y = np.empty(x.shape)
    for c in range(x.shape[1]):
        w = 1.0 if weight is None else float(weight[c])
        b = 0.0 if bias is None else float(bias[c])
        y[:, c] = (x[:, c] - float(mean[c])) / np.sqrt(float(var[c]) + eps) * w + b
    return y


def relu_grad(x, gy):
    """PyTorch's threshold_backward: zero where x <= 0, so a NaN input passes its gradient."""
    return np.where(np.asarray(x) <= 0, 0.0, np.asarray(gy, np.float64))


# ----------------------------------------------------------------------------- checking


def numerical_grad(f, x, gy, eps=1e-6):
    """Central differences of ``sum(f(x) * gy)`` with respect to x, in float64."""
    x = np.array(x, np.float64)
    gy = np.asarray(gy, np.float64)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = np.sum(np.asarray(f(x), np.float64) * gy)
        flat[i] = old - eps
        down = np.sum(np.asarray(f(x), np.float64) * gy)
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


def tolerance(dtype, ref):
    """Max abs error allowed: 1e-4 * max(1, max|ref|) in float32, 1e-10 * that in float64."""
    scale = max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    return (1e-4 if np.dtype(dtype) == np.float32 else 1e-10) * scale


def assert_close(got, ref, dtype=np.float64, what=""):
    got, ref = np.asarray(got), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    if got.size == 0:
        return
    bad_got, bad_ref = ~np.isfinite(got), ~np.isfinite(ref)
    assert np.array_equal(bad_got, bad_ref), f"{what}: NaN/inf positions differ"
    assert np.array_equal(got[bad_ref], ref[bad_ref], equal_nan=True), f"{what}: NaN/inf values differ"
    with np.errstate(invalid="ignore"):  # inf - inf at the non-finite positions, which ``where`` leaves out
        err = float(np.max(np.abs(got.astype(np.float64) - ref), where=~bad_ref, initial=0.0))
    tol = tolerance(dtype, ref[~bad_ref])
    assert err <= tol, f"{what}: max abs error {err:.3g} > tolerance {tol:.3g}"
