"""bench/bytes_moved.py's count: each op's arrays read and written, once per call, the same way
on both sides; checked against LeNet-5's conv forwards counted by hand."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bytes_moved.py"
F32 = 4
# LeNet-5's two conv forwards at batch 64: input, weight, bias read, output written.
CONVS = (64 * 1 * 28 * 28 + 6 * 1 * 5 * 5 + 6 + 64 * 6 * 28 * 28
         + 64 * 6 * 14 * 14 + 16 * 6 * 5 * 5 + 16 + 64 * 16 * 10 * 10) * F32


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCH))


def test_cnn_numba_counts_each_launch_once(bench):
    counts = bench["count_cnn_numba"]("lenet5", True)
    assert counts["conv2d_forward"] == CONVS
    # the first conv's input-gradient is not computed (the images want none): one launch
    assert counts["conv2d_backward_input"] == (16 * 6 * 5 * 5 + 64 * 16 * 10 * 10 + 64 * 6 * 14 * 14) * F32
    # the linear layers' bias gradients: gy (64, n) read, (n,) written
    assert counts["sum_to"] == sum(64 * n + n for n in (120, 84, 10)) * F32


def test_torch_counted_alike(bench):
    pytest.importorskip("torch")
    counts = bench["count_torch"]("lenet5")
    assert counts["convolution"] == CONVS
    assert "detach" not in counts and "t" not in counts  # views move nothing
