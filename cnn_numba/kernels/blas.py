"""A BLAS matrix product callable from ``@njit`` code on strided views.

``np.dot`` inside Numba takes whole contiguous arrays and always overwrites its output.
The im2col kernels at stride 1 need more: operands that are windows of a larger buffer
(an offset and a row stride, BLAS's leading dimension) and accumulation (beta = 1).
So this calls the same library that Numba's ``np.dot`` calls, through the same entry
point, ``numba_xxgemm`` in Numba's helper library, which dispatches to SciPy's BLAS
(float32 and float64). The call is by symbol name, so kernels using it stay cacheable.

Row-major convention, like numpy: ``C[m, n] = op(A) @ op(B) + beta * C`` with element
``(i, j)`` of an operand at ``base + i*ld + j`` (before ``op``'s transpose).
"""
import numpy as np
from numba import njit, types
from numba.extending import intrinsic
from numba.np.linalg import ensure_blas

ensure_blas()  # SciPy's BLAS, loaded into Numba's helper library

_xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char,            # kind ('s' or 'd'), transa, transb
    types.intp, types.intp, types.intp,            # m, n, k (column-major)
    types.voidptr, types.voidptr, types.intp,      # alpha, a, lda
    types.voidptr, types.intp, types.voidptr,      # b, ldb, beta
    types.voidptr, types.intp))                    # c, ldc

_N, _T = np.int8(ord("n")), np.int8(ord("t"))


@intrinsic
def _address(typingctx, arr, offset):
    """Pointer to element ``offset`` of a contiguous 1-D array."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.bitcast(builder.gep(data, [args[1]]), context.get_value_type(types.voidptr))
    return types.voidptr(arr, offset), codegen


@njit(cache=True, inline="always")
def _last(trans, rows, cols, base, ld):
    """Flat index of the last element of a (rows, cols) operand stored row-major with row
    stride ld, or transposed (stored as (cols, rows))."""
    if rows <= 0 or cols <= 0:
        return base - 1
    return base + (cols - 1) * ld + rows - 1 if trans else base + (rows - 1) * ld + cols - 1


@njit(cache=True)
def gemm(trans_a, trans_b, m, n, k, a, a0, lda, b, b0, ldb, beta, c, c0, ldc):
    """``C = op(A) @ op(B) + beta*C`` on flat float32/float64 arrays a, b, c (one dtype):
    A at ``a[a0:]`` is (m, k) row-major with row stride lda, or (k, m) when ``trans_a``;
    likewise B (k, n) or (n, k); C (m, n) at ``c[c0:]`` with row stride ldc.

    BLAS is column-major, where this row-major product reads C^T = op(B)^T @ op(A)^T: B
    goes first, and each operand's row-major layout is its transpose's column-major one.
    """
    if m <= 0 or n <= 0:
        return
    # BLAS reads raw pointers: check every operand's last element lies inside its array.
    if (a0 < 0 or b0 < 0 or c0 < 0 or _last(trans_a, m, k, a0, lda) >= a.size
            or _last(trans_b, k, n, b0, ldb) >= b.size or _last(False, m, n, c0, ldc) >= c.size):
        raise IndexError("gemm: an operand window reaches past the end of its array")
    scalars = np.empty(2, c.dtype)
    scalars[0], scalars[1] = 1, beta
    kind = np.int8(ord("s")) if c.itemsize == 4 else np.int8(ord("d"))
    _xxgemm(kind, _T if trans_b else _N, _T if trans_a else _N, n, m, k,
            _address(scalars, 0), _address(b, b0), ldb, _address(a, a0), lda,
            _address(scalars, 1), _address(c, c0), ldc)
