"""max_pool2d: forward (values and argmax indices) and backward (the scatter through them)
against PyTorch's max_pool2d_with_indices and its backward."""
import pytest

from shapes import POOL_PASSES, POOL_SHAPES, numba_pool_pass, torch_pool_pass

CASES = [pytest.param(s, p, impl, id=f"{s.name}-{p}-{impl}")
         for s in POOL_SHAPES for p in POOL_PASSES for impl in ("numba", "torch")]


@pytest.mark.parametrize("shape, pass_, impl", CASES)
def test_max_pool(bench_pass, data, shape, pass_, impl):
    a = data(shape)
    if impl == "torch":
        fn = torch_pool_pass(shape, pass_, a)
        if fn is None:
            pytest.skip("torch is not installed")
    else:
        fn = numba_pool_pass(shape, pass_, a)
    bench_pass(fn, group=f"pool {shape.name} {pass_}", shape=shape.name, layer=shape.describe(),
               pass_=pass_, impl=impl)
