"""Data-parallel training over MPI: every rank holds the whole model, takes its share of each
global batch, and the ranks average their gradients before each optimiser step.

    mpiexec -n 4 python -m cnn_numba train --model resnet8 --batch-size 256
    cnn-numba train --nproc 4 ...            # the same; starts mpiexec on this machine

    from cnn_numba import distributed as dist
    dist.init()                              # a world of size 1 when not launched by mpiexec
    model = dist.DistributedDataParallel(model)   # rank 0's weights and buffers on every rank
    loss.backward(); model.reduce_gradients(); optimizer.step()

    N = ranks (world size), r = this rank, P = parameters, B = global batch, b_r = rank r's share

Collectives take C-contiguous numpy arrays and reduce or broadcast them in place (MPI's
``MPI_IN_PLACE``): a strided view is rejected with a ValueError, since an in-place result written
into a hidden copy would be lost. MPI comes from mpi4py (``pip install cnn_numba[distributed]``
brings mpi4py and the mpich wheel); mpi4py is imported only when the process was started by an
MPI launcher (``PMI_RANK``, ``OMPI_COMM_WORLD_RANK``, ``PMIX_RANK`` in the environment), so a plain
``python`` run neither needs mpi4py nor pays for MPI_Init.

Gradient contract: ``reduce_gradients`` replaces each parameter's ``.grad`` (P values) by the mean
over ranks of the ranks' ``.grad`` (a parameter without ``.grad`` on a rank counts as zeros there).
The gradients travel flattened into buckets of about ``bucket_cap_mb`` (one buffer per bucket,
allocated once, parameters in reverse registration order, as PyTorch's DDP), each bucket reduced
by a non-blocking in-place ``Iallreduce`` started as soon as it is packed, so packing bucket k+1
overlaps reducing bucket k. Reduction does not overlap the backward pass itself: the autograd
engine has no per-parameter gradient hooks. Device tensors are staged through host buffers.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .backend import kernel
from .nn import Module

LAUNCH_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
OPS = ("sum", "mean", "max", "min")
DTYPES = (np.float32, np.float64, np.int32, np.int64)
BUCKET_CAP_MB = 1.0


class _World:
    """The communicator and the facts read once at init()."""

    def __init__(self, comm=None, mpi=None):
        self.comm, self.MPI = comm, mpi
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        if comm is not None:  # ranks sharing this machine's memory: the ones that share its cores
            local = comm.Split_type(mpi.COMM_TYPE_SHARED, self.rank)
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            local.Free()
        else:
            self.local_rank, self.local_size = 0, 1


_world: _World | None = None


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec, srun with PMI/PMIx) started this process."""
    return any(k in os.environ for k in LAUNCH_ENV)


def init() -> _World:
    """Join the MPI world if launched under MPI, else a world of one rank; idempotent.
    Raises RuntimeError when launched under MPI without mpi4py."""
    global _world
    if _world is not None:
        return _world
    if not launched_by_mpi():
        _world = _World()
        return _world
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"started by an MPI launcher but mpi4py cannot be imported ({e}): "
                           "pip install 'cnn_numba[distributed]'") from None
    _world = _World(MPI.COMM_WORLD, MPI)
    return _world


def _get() -> _World:
    return _world if _world is not None else init()


def rank() -> int:
    return _get().rank


def world_size() -> int:
    return _get().size


def local_size() -> int:
    """Ranks on this machine (MPI's shared-memory split)."""
    return _get().local_size


def is_main() -> bool:
    return _get().rank == 0


def barrier() -> None:
    w = _get()
    if w.comm is not None:
        w.comm.Barrier()


def abort(code: int = 1) -> None:
    """End every rank now (MPI_Abort), or this process alone in a world of one."""
    w = _get()
    sys.stdout.flush()
    sys.stderr.flush()
    if w.comm is not None:
        w.comm.Abort(code)
    os._exit(code)


def find_mpiexec() -> str | None:
    """The mpiexec next to this Python (the mpich wheel's, in a virtualenv), else on PATH."""
    import shutil
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


def set_threads_per_rank() -> int:
    """Give this rank its share of the machine's Numba threads: NUMBA_NUM_THREADS (the cores,
    unless set) divided by the ranks on this machine, at least 1. Returns the thread count."""
    import numba
    threads = max(1, numba.config.NUMBA_NUM_THREADS // _get().local_size)
    numba.set_num_threads(threads)
    return threads


def _check_buffer(array, name: str, dtypes=DTYPES) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if array.dtype not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{name}: dtype {array.dtype} is not one of {', '.join(np.dtype(d).name for d in dtypes)}")
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError(f"{name}: the array (shape {array.shape}, strides {array.strides}) must be C-contiguous and "
                         "writeable, since the result is written into it; pass np.ascontiguousarray(a) and use "
                         "what is returned")
    return array


def all_reduce(array: np.ndarray, op: str = "sum") -> np.ndarray:
    """Reduce ``array`` element-wise over all ranks, in place; returns it. ``op``: sum, mean
    (floats only), max, min. Every rank must pass the same shape and dtype."""
    if op not in OPS:
        raise ValueError(f"all_reduce: op must be one of {OPS}, got {op!r}")
    _check_buffer(array, "all_reduce", DTYPES[:2] if op == "mean" else DTYPES)
    w = _get()
    if w.comm is None:
        return array
    mpi_op = {"sum": w.MPI.SUM, "mean": w.MPI.SUM, "max": w.MPI.MAX, "min": w.MPI.MIN}[op]
    w.comm.Allreduce(w.MPI.IN_PLACE, array, op=mpi_op)
    if op == "mean":
        array /= array.dtype.type(w.size)
    return array


def broadcast(array: np.ndarray, root: int = 0) -> np.ndarray:
    """Copy rank ``root``'s ``array`` into every rank's, in place; returns it."""
    w = _get()
    if not 0 <= root < w.size:
        raise ValueError(f"broadcast: root {root} is not a rank of a world of {w.size}")
    _check_buffer(array, "broadcast")
    if w.comm is not None:
        w.comm.Bcast(array, root=root)
    return array


def broadcast_object(obj, root: int = 0):
    """Rank ``root``'s picklable ``obj`` on every rank."""
    w = _get()
    return obj if w.comm is None else w.comm.bcast(obj, root=root)


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    w = _get()
    return [obj] if w.comm is None else w.comm.allgather(obj)


def shard(n: int, r: int | None = None, size: int | None = None) -> slice:
    """Rank r's contiguous part of n items split as evenly as possible (the first n % size ranks
    one item more), as numpy's array_split; ranks past n get empty slices."""
    r = rank() if r is None else r
    size = world_size() if size is None else size
    base, extra = divmod(n, size)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


# ----------------------------------------------------------------------------- module state

def broadcast_module(module: Module, root: int = 0) -> None:
    """Copy rank ``root``'s parameters and buffers (state_dict and non-persistent buffers) into
    every rank's module."""
    if world_size() == 1:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t is not None]
    for t in tensors:
        host = np.ascontiguousarray(t.numpy())
        if host.dtype == np.bool_:
            host = host.view(np.uint8)
        if host.dtype not in [np.dtype(d) for d in DTYPES]:
            _get().comm.Bcast(host.view(np.uint8).reshape(-1), root=root)
        else:
            broadcast(host, root)
        _write_host(t, host)


def _write_host(t, host: np.ndarray) -> None:
    """Copy a host array of ``t``'s size into ``t``'s memory without autograd's in-place check."""
    data = host.view(t.dtype).reshape(t.shape)
    if isinstance(t.data, np.ndarray):
        if t.data is not host:
            np.copyto(t.data, data)
    else:
        t.data.copy_to_device(np.ascontiguousarray(data))
    t._vc[0] += 1


class _Bucket:
    """Consecutive parameters of one dtype and device whose gradients share a flat buffer."""

    def __init__(self, params):
        self.params = params
        self.sizes = [p.size for p in params]
        self.buffer = np.empty(sum(self.sizes), params[0].dtype)  # (sum of sizes,)


def make_buckets(params, cap_mb: float = BUCKET_CAP_MB) -> list[_Bucket]:
    """Parameters in reverse order (the order backward produces their gradients), grouped by
    dtype and device into buckets of at most ``cap_mb`` MB (one parameter may exceed it alone)."""
    buckets, group, nbytes = [], [], 0
    for p in reversed(list(params)):
        if group and (p.dtype != group[0].dtype or p.device != group[0].device
                      or nbytes + p.size * p.dtype.itemsize > cap_mb * 2**20):
            buckets.append(_Bucket(group))
            group, nbytes = [], 0
        group.append(p)
        nbytes += p.size * p.dtype.itemsize
    if group:
        buckets.append(_Bucket(group))
    return buckets


def _pack(bucket: _Bucket) -> None:
    offset = 0
    for p, n in zip(bucket.params, bucket.sizes):
        view = bucket.buffer[offset:offset + n]
        if p.grad is None:
            view.fill(0)
        else:
            view[...] = kernel("to_host", p.device)(p.grad.data).reshape(-1)
        offset += n


def _unpack(bucket: _Bucket, scale) -> None:
    bucket.buffer *= scale
    offset = 0
    for p, n in zip(bucket.params, bucket.sizes):
        host = bucket.buffer[offset:offset + n].reshape(p.shape)
        if p.grad is not None and isinstance(p.grad.data, np.ndarray):
            np.copyto(p.grad.data, host)
        else:
            from .tensor import Tensor
            data = kernel("reshape", p.device)(kernel("from_host", p.device)(host.copy()), p.shape)
            p.grad = Tensor._wrap(data, p.device, False, None)
        offset += n


def reduce_gradients(buckets: list[_Bucket]) -> None:
    """Average the parameters' ``.grad`` over ranks (the gradient contract in the module docstring)."""
    w = _get()
    if w.comm is None:
        return
    requests = []
    for bucket in buckets:
        _pack(bucket)
        requests.append(w.comm.Iallreduce(w.MPI.IN_PLACE, bucket.buffer, op=w.MPI.SUM))
    for bucket, request in zip(buckets, requests):
        request.Wait()
        _unpack(bucket, bucket.buffer.dtype.type(1.0 / w.size))


def all_reduce_gradients(model: Module, cap_mb: float = BUCKET_CAP_MB) -> None:
    """Average ``model``'s gradients over ranks (buckets built on each call; a
    DistributedDataParallel keeps its own)."""
    reduce_gradients(make_buckets([p for p in model.parameters() if p.requires_grad], cap_mb))


class DistributedDataParallel(Module):
    """Wraps ``module`` for data-parallel training, as torch.nn.parallel.DistributedDataParallel:
    at construction every rank gets rank 0's parameters and buffers; calling it calls the module;
    after ``loss.backward()`` call ``reduce_gradients()`` (PyTorch does that inside backward,
    through hooks this autograd does not have). ``state_dict`` keys carry the ``module.`` prefix,
    as PyTorch's; save ``ddp.module.state_dict()`` for a checkpoint that loads without it."""

    def __init__(self, module: Module, bucket_cap_mb: float = BUCKET_CAP_MB, broadcast_buffers: bool = True):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel: module must be a Module, got {type(module).__name__}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"DistributedDataParallel: bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        init()
        self.module = module
        object.__setattr__(self, "_ddp_buckets",
                           make_buckets([p for p in module.parameters() if p.requires_grad], bucket_cap_mb))
        broadcast_module(module)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def reduce_gradients(self) -> None:
        reduce_gradients(self._ddp_buckets)


__all__ = ["init", "launched_by_mpi", "rank", "world_size", "local_size", "is_main", "barrier", "abort",
           "all_reduce", "broadcast", "broadcast_object", "all_gather_object", "shard", "broadcast_module",
           "all_reduce_gradients", "DistributedDataParallel", "set_threads_per_rank", "find_mpiexec"]
