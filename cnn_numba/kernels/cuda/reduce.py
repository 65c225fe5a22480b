"""The block-wide reduction every CUDA reduction kernel ends with."""
from numba import cuda

from .launch import device_function


@device_function
def block_reduce(buf, value, maximum):
    """The sum (or, with ``maximum``, the max) of ``value`` over the block's threads, returned to
    every thread: a tree in shared memory ``buf``, one slot per thread (its length a power of two,
    the block's size), in a fixed order, so the result is the same on every run. Every thread of
    the block must call it (it synchronises)."""
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    half = buf.shape[0] // 2
    while half > 0:
        if t < half:
            buf[t] = max(buf[t], buf[t + half]) if maximum else buf[t] + buf[t + half]
        cuda.syncthreads()
        half //= 2
    total = buf[0]
    cuda.syncthreads()  # everyone has read buf[0] before the next reduction overwrites it
    return total
