"""conv2d / conv_transpose2d: each shape x pass {fwd, gx, gw} x {direct, im2col, torch}.

One pytest-benchmark group per (shape, pass), so the three implementations of a pass sit in
one table. Select with -k, e.g. ``-k "big3x3 and gw"`` or ``-k torch``.
"""
import pytest

from shapes import ALGOS, CONV_PASSES, CONV_SHAPES, numba_conv_pass, torch_conv_pass

IMPLS = (*ALGOS, "torch")
CASES = [pytest.param(s, p, impl, id=f"{s.name}-{p}-{impl}")
         for s in CONV_SHAPES for p in CONV_PASSES for impl in IMPLS]


@pytest.mark.parametrize("shape, pass_, impl", CASES)
def test_conv(bench_pass, data, shape, pass_, impl):
    a = data(shape)
    if impl == "torch":
        fn = torch_conv_pass(shape, pass_, a)
        if fn is None:
            pytest.skip("torch is not installed")
    else:
        fn = numba_conv_pass(shape, pass_, impl, a)
    bench_pass(fn, group=f"conv {shape.name} {pass_}", flops=shape.flops, shape=shape.name,
               layer=shape.describe(), pass_=pass_, impl=impl, auto=shape.auto_algo(pass_))
