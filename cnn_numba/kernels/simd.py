"""Vector registers for the CPU kernels' inner loops: a ``Vec`` of LANES elements that Numba
keeps as an LLVM vector value, so a loop can hold accumulators in registers across many
multiply-adds instead of loading and storing them at each one.

Why: LLVM vectorises Numba's innermost loops, but an accumulator that lives in an array is
loaded and stored once per pass over it (LLVM cannot prove that the stores leave the inputs
alone, so it will not keep it in a register across an outer loop). The flat direct kernels
did twelve multiply-adds per four accumulator loads and stores (kernels/conv_stride1.py) and
reached 140 GFLOP/s on one core; holding 8 x 32 accumulators in registers across all of a
pass's (channel, tap) pairs reaches 250 (2026-12-01, AMD Zen 5, float32), bit for bit the
same sums (each output still adds its pairs in order, one fused multiply-add each).

    v = vload(a, i)          a[i:i + LANES] (a 1-D contiguous array)
    vstore(a, i, v)          a[i:i + LANES] = v
    v = vsplat(s, a)         s in every lane (a Vec of a's dtype)
    v = vfma(v, w, x)        v + w * x, w a Vec or a scalar (every lane), one rounding (llvm.fma)
    s = vsum(v)              the lanes' sum, added pairwise
    v = vload_masked(a, i, n)      a[i:i + n] in the first n lanes (n <= LANES; masked: no
    vstore_masked(a, i, v, n)      element past n read or written), and ``copy_row`` on them
    vstore_lanes(a, i, v, lo, n)   a[i:i + n] = v[lo:lo + n] (lo + n <= LANES; masked)
    v = vadd(v, w), vsub, vmul     lane by lane, w a Vec or a scalar; no fast-math flags of
                                   their own (a caller's fastmath=True adds them: see conv.py)
    v = vrelu(v)                   0 in the lanes below 0, NaN kept
    t = vtranspose8(r0, ..., r7)   eight Vecs as a matrix of 8 rows, transposed in registers
                                   within each group of 8 lanes: t[j][8*h + p] = r_p[8*h + j]
    e, o = vdeinterleave(a, b)     the even and the odd elements of the 2*LANES values a, b

No bounds checks but under NUMBA_BOUNDSCHECK=1: callers keep every index within arrays they
sized for whole vectors (``vector_length``). LANES is one register of float32: 16 where
Numba compiles for AVX-512, 8 elsewhere; LLVM splits the vectors where registers are
narrower still (NEON) or the elements wider (float64). Functions using these stay cacheable
(``cache=True``): the type exists only inside compiled code.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, overload, register_model


def _lanes() -> int:
    """16 where Numba compiles for AVX-512 (one 512-bit register of float32), else 8 (one
    256-bit AVX register: with 16 the accumulators, two registers each, would not fit in
    AVX2's sixteen). NUMBA_CPU_NAME without NUMBA_CPU_FEATURES (a portable build) counts as
    no AVX-512."""
    from llvmlite import binding
    from numba.core import config
    if config.CPU_FEATURES is not None:
        features = config.CPU_FEATURES
    elif config.CPU_NAME is not None:
        features = ""
    else:
        features = binding.get_host_cpu_features().flatten()
    return 16 if "+avx512f" in features.split(",") else 8


LANES = _lanes()


class Vec(types.Type):
    """LANES elements of ``dtype`` in one LLVM vector value."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"Vec{LANES}({dtype})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), LANES))


def _vector_pointer(context, builder, arrty, arr, index, count=None):
    """A pointer to arr[index:index + LANES] as a vector; with NUMBA_BOUNDSCHECK=1 an
    IndexError unless both ends lie in the array (tests/test_boundscheck.py runs every
    kernel so). With ``count`` (an i64: the masked accesses), only the ``count`` elements from
    ``index`` are checked, and none where it is 0."""
    ary = context.make_array(arrty)(context, builder, arr)
    if context.enable_boundscheck:
        size = builder.extract_value(ary.shape, 0)
        reach = ir.Constant(index.type, LANES) if count is None else count
        last = builder.add(index, builder.sub(reach, ir.Constant(index.type, 1)))
        with builder.if_then(builder.icmp_signed(">", reach, ir.Constant(index.type, 0))):
            cgutils.do_boundscheck(context, builder, index, size)
            cgutils.do_boundscheck(context, builder, last, size)
    data = ary.data
    return builder.bitcast(builder.gep(data, [index]), ir.PointerType(ir.VectorType(data.type.pointee, LANES)))


def _check(arr):
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
            and isinstance(arr.dtype, types.Float)):
        raise TypingError(f"simd: a 1-D contiguous float array is needed, got {arr}")


@intrinsic
def vload(typingctx, arr, index):
    """arr[index:index + LANES] as a Vec."""
    _check(arr)

    def codegen(context, builder, sig, args):
        return builder.load(_vector_pointer(context, builder, sig.args[0], *args), align=arr.dtype.bitwidth // 8)
    return Vec(arr.dtype)(arr, types.intp), codegen


@intrinsic
def vstore(typingctx, arr, index, vec):
    """arr[index:index + LANES] = vec."""
    _check(arr)

    def codegen(context, builder, sig, args):
        builder.store(args[2], _vector_pointer(context, builder, sig.args[0], args[0], args[1]),
                      align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.none(arr, types.intp, vec), codegen


def _broadcast(builder, vty, value):
    lanes = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(lanes, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


@intrinsic
def vfma(typingctx, acc, w, x):
    """acc + w * x lane by lane, each lane rounded once (llvm.fma); w a Vec, or a scalar
    broadcast to every lane."""
    if not isinstance(acc, Vec) or acc != x:
        raise TypingError(f"vfma: two Vecs of one dtype are needed, got {acc} and {x}")

    def codegen(context, builder, sig, args):
        a, s, v = args
        vty = a.type
        if not isinstance(sig.args[1], Vec):
            s = _broadcast(builder, vty, context.cast(builder, s, sig.args[1], acc.dtype))
        name = f"llvm.fma.v{LANES}f{acc.dtype.bitwidth}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), name)
        return builder.call(fma, [s, v, a])
    return acc(acc, w, x), codegen


@intrinsic
def vsum(typingctx, vec):
    """The sum of vec's lanes, added pairwise (LLVM's tree reduction: log2(LANES) vector adds,
    where the ordered one is a chain of LANES dependent adds; a fixed order for a given
    LANES, so results repeat run to run)."""
    if not isinstance(vec, Vec):
        raise TypingError(f"vsum: a Vec is needed, got {vec}")

    def codegen(context, builder, sig, args):
        vty = args[0].type
        name = f"llvm.vector.reduce.fadd.v{LANES}f{vec.dtype.bitwidth}"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty.element, [vty.element, vty]), name)
        return builder.call(fn, [ir.Constant(vty.element, -0.0), args[0]], fastmath=("reassoc",))
    return vec.dtype(vec), codegen


@intrinsic
def vsplat(typingctx, value, like):
    """``value`` in every lane of a Vec of the dtype of array ``like``."""
    _check(like)

    def codegen(context, builder, sig, args):
        vty = ir.VectorType(context.get_value_type(like.dtype), LANES)
        return _broadcast(builder, vty, context.cast(builder, args[0], sig.args[0], like.dtype))
    return Vec(like.dtype)(value, like), codegen


def _mask(builder, count):
    """The lanes below ``count`` (an i64), as an LLVM <LANES x i1>."""
    i64 = ir.IntType(64)
    lanes = ir.Constant(ir.VectorType(i64, LANES), list(range(LANES)))
    return builder.icmp_signed("<", lanes, _broadcast(builder, ir.VectorType(i64, LANES), count))


def _masked(module, name, ptr, lanes, bits):
    """(llvm.masked.<name> (load or store) for vectors like ``*ptr`` of ``bits``-bit floats,
    declared in ``module``; the alignment argument)."""
    vty, i32 = ptr.type.pointee, ir.IntType(32)
    suffix = f"v{LANES}f{bits}.p0v{LANES}f{bits}"
    if name == "load":
        fty = ir.FunctionType(vty, [ptr.type, i32, lanes.type, vty])
    else:
        fty = ir.FunctionType(ir.VoidType(), [vty, ptr.type, i32, lanes.type])
    return cgutils.get_or_insert_function(module, fty, f"llvm.masked.{name}.{suffix}"), ir.Constant(
        i32, bits // 8)


@intrinsic
def vload_masked(typingctx, arr, index, count):
    """arr[index:index + count] in a Vec's first ``count`` lanes (0 <= count <= LANES), zeros in
    the rest: one masked load, no element past ``count`` read. The array's elements must be
    adjacent (a layout-'A' row too: the callers check its stride)."""
    _check_row(arr)

    def codegen(context, builder, sig, args):
        a, i, n = args
        ptr = _vector_pointer(context, builder, sig.args[0], a, i, n)
        lanes = _mask(builder, n)
        load, align = _masked(builder.module, "load", ptr, lanes, arr.dtype.bitwidth)
        return builder.call(load, [ptr, align, lanes, ir.Constant(ptr.type.pointee, None)])
    return Vec(arr.dtype)(arr, types.intp, types.intp), codegen


@intrinsic
def vstore_masked(typingctx, arr, index, vec, count):
    """arr[index:index + count] = vec's first ``count`` lanes (0 <= count <= LANES): one masked
    store, no element past ``count`` written (adjacent elements, as vload_masked)."""
    _check_row(arr)

    def codegen(context, builder, sig, args):
        a, i, v, n = args
        ptr = _vector_pointer(context, builder, sig.args[0], a, i, n)
        lanes = _mask(builder, n)
        store, align = _masked(builder.module, "store", ptr, lanes, arr.dtype.bitwidth)
        builder.call(store, [v, ptr, align, lanes])
        return context.get_dummy_value()
    return types.none(arr, types.intp, vec, types.intp), codegen


@intrinsic
def vstore_lanes(typingctx, arr, index, vec, lo, count):
    """arr[index:index + count] = vec[lo:lo + count] (0 <= lo, lo + count <= LANES): one masked
    store of the lanes from ``lo``, as if the vector started at arr[index - lo] (masked lanes
    are neither read nor written, so that address need not lie in the array)."""
    _check_row(arr)

    def codegen(context, builder, sig, args):
        a, i, v, first, n = args
        ptr = _vector_pointer(context, builder, sig.args[0], a, i, n)
        elem = ir.PointerType(ptr.type.pointee.element)
        ptr = builder.bitcast(builder.gep(builder.bitcast(ptr, elem), [builder.neg(first)]), ptr.type)
        i64 = ir.IntType(64)
        lanes = ir.Constant(ir.VectorType(i64, LANES), list(range(LANES)))
        lanes = builder.sub(lanes, _broadcast(builder, ir.VectorType(i64, LANES), first))  # lane - lo
        inside = builder.and_(builder.icmp_signed(">=", lanes, ir.Constant(lanes.type, [0] * LANES)),
                              builder.icmp_signed("<", lanes, _broadcast(builder, ir.VectorType(i64, LANES), n)))
        store, align = _masked(builder.module, "store", ptr, inside, arr.dtype.bitwidth)
        builder.call(store, [v, ptr, align, inside])
        return context.get_dummy_value()
    return types.none(arr, types.intp, vec, types.intp, types.intp), codegen


def _binary(name, doc):
    @intrinsic
    def op(typingctx, v, w):
        if not isinstance(v, Vec) or (isinstance(w, Vec) and w != v):
            raise TypingError(f"{name}: a Vec and a Vec of its dtype or a scalar are needed, got {v} and {w}")

        def codegen(context, builder, sig, args):
            a, b = args
            if not isinstance(sig.args[1], Vec):
                b = _broadcast(builder, a.type, context.cast(builder, b, sig.args[1], v.dtype))
            return getattr(builder, name)(a, b)
        return v(v, w), codegen
    op.__doc__ = doc
    return op


vadd = _binary("fadd", "v + w lane by lane (w a Vec or a scalar in every lane).")
vsub = _binary("fsub", "v - w lane by lane (w a Vec or a scalar in every lane).")
vmul = _binary("fmul", "v * w lane by lane (w a Vec or a scalar in every lane).")


@intrinsic
def vrelu(typingctx, vec):
    """0 in the lanes below 0, the rest (NaN, -0.0 included) kept: elementwise.relu_value's rule."""
    if not isinstance(vec, Vec):
        raise TypingError(f"vrelu: a Vec is needed, got {vec}")

    def codegen(context, builder, sig, args):
        v = args[0]
        below = builder.fcmp_ordered("<", v, ir.Constant(v.type, None))
        return builder.select(below, ir.Constant(v.type, None), v)
    return vec(vec), codegen


def _transpose_masks(bit):
    """The two shuffles of one stage of vtranspose8: rows p and q = p | bit (p without ``bit``)
    swap bit ``bit`` of the row with that of the lane: new p takes, in the lanes with the bit
    set, q's lane without it; new q takes, in the lanes without it, p's lane with it."""
    low = [c if not c & bit else LANES + c - bit for c in range(LANES)]
    high = [c + bit if not c & bit else LANES + c for c in range(LANES)]
    return low, high


@intrinsic
def vtranspose8(typingctx, r0, r1, r2, r3, r4, r5, r6, r7):
    """(t0, ..., t7) with t_j[8*h + p] = r_p[8*h + j] for h < LANES // 8: in each group of 8
    lanes, the 8 x 8 matrix of rows r_p transposed, in three stages of eight two-register
    shuffles (each swaps one bit of the row index with the same bit of the lane index)."""
    rows = (r0, r1, r2, r3, r4, r5, r6, r7)
    if not isinstance(r0, Vec) or any(r != r0 for r in rows):
        raise TypingError(f"vtranspose8: eight Vecs of one dtype are needed, got {rows}")

    def codegen(context, builder, sig, args):
        regs = list(args)
        i32 = ir.IntType(32)
        for bit in (1, 2, 4):
            low, high = (ir.Constant(ir.VectorType(i32, LANES), m) for m in _transpose_masks(bit))
            for p in range(8):
                if not p & bit:
                    q = p | bit
                    regs[p], regs[q] = (builder.shuffle_vector(regs[p], regs[q], low),
                                        builder.shuffle_vector(regs[p], regs[q], high))
        return context.make_tuple(builder, sig.return_type, regs)
    return types.UniTuple(r0, 8)(*rows), codegen


@intrinsic
def vdeinterleave(typingctx, a, b):
    """(e, o) with e[c] = (a, b)[2c], o[c] = (a, b)[2c + 1]: the even and the odd elements of
    the 2*LANES values of a then b, two two-register shuffles (AVX-512: vpermt2ps)."""
    if not isinstance(a, Vec) or a != b:
        raise TypingError(f"vdeinterleave: two Vecs of one dtype are needed, got {a} and {b}")

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        picks = [ir.Constant(ir.VectorType(i32, LANES), [2 * c + odd for c in range(LANES)]) for odd in (0, 1)]
        return context.make_tuple(builder, sig.return_type, [builder.shuffle_vector(*args, m) for m in picks])
    return types.UniTuple(a, 2)(a, b), codegen


def copy_row(src, i, dst, j, n):
    """dst[j:j + n] = src[i:i + n] (1-D arrays). Compiled (the overload below): in masked
    vectors of LANES where both are float arrays of one dtype whose elements are adjacent,
    element by element otherwise; from Python, a slice copy."""
    dst[j:j + n] = src[i:i + n]


def _vector_row(a) -> bool:
    """Whether ``a`` (a Numba type) is a 1-D float array whose elements may be adjacent
    (contiguous, or layout 'A': the callers check the stride at run time)."""
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout in "CA" and isinstance(a.dtype, types.Float)


def _vector_rows(src, dst) -> bool:
    return _vector_row(src) and _vector_row(dst) and src.dtype == dst.dtype


def _check_row(arr):
    if not _vector_row(arr):
        raise TypingError(f"simd: a 1-D float array is needed, got {arr}")


@overload(copy_row, inline="always")
def _copy_row(src, i, dst, j, n):
    if not _vector_rows(src, dst):
        def impl(src, i, dst, j, n):
            for k in range(n):
                dst[j + k] = src[i + k]
        return impl

    def impl(src, i, dst, j, n):
        if src.strides[0] == src.itemsize and dst.strides[0] == dst.itemsize:
            for k in range(0, n, LANES):
                m = min(LANES, n - k)
                vstore_masked(dst, j + k, vload_masked(src, i + k, m), m)
        else:
            for k in range(n):
                dst[j + k] = src[i + k]
    return impl


@njit(cache=True, inline="always")
def vector_length(n):
    """n rounded up to whole pairs of vectors (the kernels' step)."""
    return -(-n // (2 * LANES)) * (2 * LANES)
