"""A caching device allocator for numba-cuda (an External Memory Management plugin).

Numba allocates every device array with ``cuMemAlloc`` and frees it with ``cuMemFree``,
which waits for the whole device to go idle: a training step that allocates its
activations and gradients afresh would call the driver a few hundred times and stop the
GPU from running ahead of Python at every batch of frees. Like PyTorch's allocator, this
one keeps a freed block and hands it to the next request of the same rounded size.

Reuse is safe without events because every kernel runs on the default stream: work that
reads a block before it is freed is queued ahead of work that writes it after reuse.

Installed by ``backend._load_cuda`` before the first CUDA context exists (it then serves
every numba-cuda allocation in the process); ``CNN_NUMBA_CUDA_CACHE=0`` keeps Numba's
own manager. Cached blocks go back to the driver when an allocation runs out of memory,
and on ``release_cached()``.
"""
from __future__ import annotations

import os
import weakref

SMALL = 1 << 20       # below this, sizes round up to a multiple of ALIGN; above, of SMALL
ALIGN = 512


def rounded(size: int) -> int:
    """The size of the block that serves a request of ``size`` bytes."""
    step = ALIGN if size < SMALL else SMALL
    return max(step, -(-size // step) * step)


class BlockCache:
    """Free blocks by rounded size: ``take`` one or None, ``give`` one back, ``drain`` all."""

    def __init__(self):
        self._free: dict[int, list] = {}
        self.cached_bytes = 0

    def take(self, size: int):
        blocks = self._free.get(size)
        if not blocks:
            return None
        self.cached_bytes -= size
        return blocks.pop()

    def give(self, size: int, block) -> None:
        self._free.setdefault(size, []).append(block)
        self.cached_bytes += size

    def drain(self) -> list:
        blocks = [b for bs in self._free.values() for b in bs]
        self._free.clear()
        self.cached_bytes = 0
        return blocks


def _manager_class():
    from numba.cuda.cudadrv import driver

    class CachingMemoryManager(driver.NumbaCUDAMemoryManager):
        """Numba's manager, with freed blocks kept for reuse (see the module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.cache = BlockCache()
            self._live = {}  # device address -> the pointer handed out (Numba's pattern: strong refs here)

        def memalloc(self, size):
            size_r = rounded(size)
            block = self.cache.take(size_r)
            if block is None:
                try:
                    block = super().memalloc(size_r)
                except driver.CudaAPIError as e:
                    if e.code != driver.binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
                        raise
                    self.release_cached()
                    block = super().memalloc(size_r)
            # ``block`` owns the device memory through Numba's manager. The pointer handed out
            # counts its users like Numba's own: when the last one is gone, its finalizer puts
            # the block back in the cache instead of freeing it.
            key, live, cache = int(block.device_pointer), self._live, self.cache

            def finalizer():
                live.pop(key, None)
                cache.give(size_r, block)

            mem = driver.AutoFreePointer(weakref.proxy(self.context), block.device_pointer, size, finalizer=finalizer)
            live[key] = mem
            return mem.own()

        def release_cached(self) -> None:
            """Return every cached block to the driver (Numba frees each as it is dropped)."""
            self.cache.drain()
            self.deallocations.clear()

        def reset(self):
            self.release_cached()
            super().reset()

    return CachingMemoryManager


_installed = False


def install() -> bool:
    """Make the caching manager numba-cuda's (once); False when switched off or not applicable."""
    global _installed
    if _installed:
        return True
    from numba import config

    if (config.ENABLE_CUDASIM or os.environ.get("CNN_NUMBA_CUDA_CACHE", "1") == "0"
            or os.environ.get("NUMBA_CUDA_MEMORY_MANAGER", "default") != "default"):
        return False
    from numba import cuda

    cuda.set_memory_manager(_manager_class())
    _installed = True
    return True
