"""128-bit loads and stores of runs of 4 elements, for the GEMM's vectorised staging (gemm.py).

    load4(arr, i)            -> (arr[i], arr[i+1], arr[i+2], arr[i+3])   global, read-only
    store4(tile, p, x, r)    tile[p, x:x+4] = r                          shared
    aligned(arr, i)          whether &arr[i] is 16-byte aligned

A run of 4 float32 is one 128-bit access, ``ld.global.nc.v4.f32`` / ``st.shared.v4.f32``;
of 4 float64 two, ``.v2.f64``. Both need the run's first address 16-byte aligned: for
``load4`` the caller checks ``aligned`` (a device allocation is 256-byte aligned, so
that is the element offset's alignment, 4 or 2 elements, unless the array is a view at an
odd offset); for ``store4`` the shared array is declared with ``alignment=SHARED_ALIGN``,
its rows are a multiple of 16 bytes long and x a multiple of 4.

numba-cuda has no vector load from an array (its ``float32x4`` is a value type, its
cache-hint loads ``ldcs`` etc. scalar), so these are ``intrinsic``s: the element's
pointer, cast to the global (or shared) address space and to ``<4 x float>`` (``<2 x
double>``), one aligned LLVM load or store per 16 bytes, which NVPTX lowers to the vector
instruction. ``load4`` marks its load ``!invariant.load``, which NVPTX lowers to the
read-only path (``.nc``): valid because a product kernel never writes its operands (C
never overlaps A or B: the scalar path would already race if it did).

Under the simulator (every thread a Python thread) they are the plain-Python reads and
writes they stand for; ``aligned`` reads the numpy buffer's address, so the simulated
kernels take the vector path on fresh arrays and the scalar one on misaligned views, as a
GPU would.
"""
from __future__ import annotations

from .launch import SIMULATOR

RUN = 4  # elements per run: 16 bytes of float32 (two 16-byte accesses of float64)
SHARED_ALIGN = None if SIMULATOR else 16  # the simulator refuses an alignment argument

if SIMULATOR:
    def _address(arr):
        """The data address of a simulated array (the kernel's wrapper, a device array, numpy)."""
        arr = getattr(arr, "_item", arr)
        return getattr(arr, "_ary", arr).ctypes.data

    def aligned(arr, i):
        return (_address(arr) + i * arr.dtype.itemsize) % 16 == 0

    def load4(arr, i):
        return arr[i], arr[i + 1], arr[i + 2], arr[i + 3]

    def store4(tile, p, x, r):
        tile[p, x], tile[p, x + 1], tile[p, x + 2], tile[p, x + 3] = r

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    _GLOBAL, _SHARED = 1, 3  # NVVM address spaces

    def _element_pointer(context, builder, aryty, ary, inds):
        """&ary[inds] (no wraparound: the callers' indices are never negative)."""
        arr = context.make_array(aryty)(context, builder, ary)
        return cgutils.get_item_pointer(context, builder, aryty, arr, inds)

    def _vectors(context, builder, ptr, dtype, space):
        """The 16-byte vectors covering a run of RUN elements from ``ptr``, as pointers in
        ``space`` (one for float32, two for float64), and their element count."""
        elt = context.get_value_type(dtype)
        width = 16 // (dtype.bitwidth // 8)
        base = builder.addrspacecast(ptr, ir.PointerType(elt, space))
        vty = ir.PointerType(ir.VectorType(elt, width), space)
        return [builder.bitcast(builder.gep(base, [ir.Constant(ir.IntType(64), h * width)]), vty)
                for h in range(RUN // width)], width

    @intrinsic
    def aligned(typingctx, arr, i):
        if not isinstance(arr, types.Array) or not isinstance(i, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0],
                                   [context.cast(builder, args[1], sig.args[1], types.intp)])
            low = builder.and_(builder.ptrtoint(ptr, ir.IntType(64)), ir.Constant(ir.IntType(64), 15))
            return builder.icmp_unsigned("==", low, ir.Constant(ir.IntType(64), 0))

        return types.boolean(arr, i), codegen

    @intrinsic
    def load4(typingctx, arr, i):
        if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(i, types.Integer):
            return None
        run = types.UniTuple(arr.dtype, RUN)

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0],
                                   [context.cast(builder, args[1], sig.args[1], types.intp)])
            pointers, width = _vectors(context, builder, ptr, arr.dtype, _GLOBAL)
            values = []
            for vp in pointers:
                v = builder.load(vp, align=16)
                v.set_metadata("invariant.load", builder.module.add_metadata([]))
                values += [builder.extract_element(v, ir.Constant(ir.IntType(32), w)) for w in range(width)]
            return context.make_tuple(builder, run, values)

        return run(arr, i), codegen

    @intrinsic
    def store4(typingctx, tile, p, x, r):
        if not (isinstance(tile, types.Array) and tile.ndim == 2 and isinstance(r, types.UniTuple)
                and r.count == RUN and r.dtype == tile.dtype):
            return None

        def codegen(context, builder, sig, args):
            inds = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:3], sig.args[1:3])]
            ptr = _element_pointer(context, builder, sig.args[0], args[0], inds)
            pointers, width = _vectors(context, builder, ptr, tile.dtype, _SHARED)
            values = cgutils.unpack_tuple(builder, args[3], RUN)
            for h, vp in enumerate(pointers):
                v = ir.Constant(ir.VectorType(context.get_value_type(tile.dtype), width), None)
                for w in range(width):
                    v = builder.insert_element(v, values[h * width + w], ir.Constant(ir.IntType(32), w))
                builder.store(v, vp, align=16)
            return context.get_dummy_value()

        return types.void(tile, p, x, r), codegen
