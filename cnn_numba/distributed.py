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
by a non-blocking in-place ``Iallreduce`` started as soon as it is packed (MPICH advances it inside
later MPI calls, so without its asynchronous progress thread, MPICH_ASYNC_PROGRESS=1, little of it
overlaps the packing of the next bucket). Reduction does not overlap the backward pass itself: the
autograd engine has no per-parameter gradient hooks. Device tensors are staged through host buffers.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from . import functional as F
from .backend import kernel
from .data import DataLoader
from .nn import Module
from .nn.layers import _BatchNorm
from .tensor import Function, Tensor, no_grad

LAUNCH_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
OPS = ("sum", "mean", "max", "min")
DTYPES = (np.float32, np.float64, np.int32, np.int64)
BUCKET_CAP_MB = 1.0
ABORT_GRACE_S = 1.0  # abort(): seconds for the launcher to forward the message printed before


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
        # MPICH's launcher stops forwarding a rank's output once it handles the abort: without a
        # pause the message just printed was lost in 1 of 12 runs here
        time.sleep(ABORT_GRACE_S)
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


def select_gpu() -> int | None:
    """One rank per GPU: this rank uses GPU (local rank mod GPUs on this machine). None without CUDA
    (check_device then says why)."""
    from numba import cuda
    if not cuda.is_available():
        return None
    gpu = _get().local_rank % len(cuda.gpus)
    cuda.select_device(gpu)
    return gpu


# ----------------------------------------------------------------------------- data

class ShardedLoader(DataLoader):
    """A DataLoader whose batches are this rank's shares of the batches one process would get:
    the same (seed, epoch) order and augmentation draws on every rank (each rank draws them for
    the whole global batch, then keeps its ``shard`` before the float conversion), so N ranks
    together see exactly one process's batches. ``global_batch`` is the size of the global batch
    the last share came from (B; the last batch of an epoch may be short, a share may be empty)."""

    def __init__(self, *args, rank: int | None = None, size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank = _get().rank if rank is None else rank
        self.size = _get().size if size is None else size
        self.global_batch = 0

    def _batches(self, rng):
        for x, y in super()._batches(rng):  # x: this rank's share (_to_float below), y: the global batch's
            self.global_batch = len(y)
            yield x, y[shard(len(y), self.rank, self.size)]

    def _to_float(self, x):
        return super()._to_float(x[shard(len(x), self.rank, self.size)])


# ----------------------------------------------------------------------------- module state

def broadcast_module(module: Module, root: int = 0) -> None:
    """Copy rank ``root``'s parameters and buffers (state_dict and non-persistent buffers) into
    every rank's module."""
    _broadcast_tensors([t for t in (*module.parameters(), *module.buffers()) if t is not None], root)


def _broadcast_tensors(tensors, root: int = 0) -> None:
    if world_size() == 1:
        return
    for t in tensors:  # as bytes: any dtype; a CPU buffer's own memory when it is contiguous
        host = np.ascontiguousarray(t.numpy()).reshape(-1)
        _get().comm.Bcast(host.view(np.uint8), root=root)
        if isinstance(t.data, np.ndarray) and np.shares_memory(t.data, host):
            t._vc[0] += 1  # received in place
        else:
            with no_grad():  # parameters are leaves that require grad
                t._write(host.reshape(t.shape))


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


# ----------------------------------------------------------------------------- synchronised batch norm

class SyncBatchNormFunction(Function):
    """Batch norm whose statistics are those of the global batch: rank r holds x (n_r, C, *);
    M = sum of the ranks' n_r * L values per channel. Forward combines the ranks' (count, mean,
    biased var) per channel exactly (Chan's pairwise formula, float64); backward reduces the
    per-channel sums of gy and gy * xhat, so gx is the gradient through the global statistics;
    gw, gb stay this rank's sums, which the gradient average of DistributedDataParallel
    combines. Device arrays go through the host for the reductions (C values each) and the
    backward correction."""

    def forward(self, x, *wb, has_wb, running, momentum, eps):
        dev, c = self.device, x.shape[1]
        w, b = F._affine(x, wb, has_wb, dev)
        mean_r, var_r = (kernel("to_host", dev)(a).astype(np.float64).reshape(1, c)
                         for a in kernel("batch_norm_stats", dev)(x))
        table = np.zeros((world_size(), 3, c))  # per rank: count, mean, var (C,) each
        table[rank()] = np.concatenate([np.full((1, c), x.size // c), mean_r, var_r])
        counts, means, variances = all_reduce(table).transpose(1, 0, 2)
        m = counts.sum(0)  # (C,), the same M for every channel
        mean = (counts * means).sum(0) / m
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / m
        mean_d, var_d = (kernel("from_host", dev)(a.astype(x.dtype)) for a in (mean, var))
        if running[0] is not None:
            kernel("batch_norm_update_stats", dev)(running[0], running[1], mean_d, var_d, momentum, int(m[0]))
        y, invstd = kernel("batch_norm_forward", dev)(x, mean_d, var_d, w, b, eps)
        self.x, self.mean, self.invstd, self.w, self.has_wb, self.m = x, mean_d, invstd, w, has_wb, m[0]
        return y

    def backward(self, gy):
        dev = self.device
        # training=False: gx = gy * w * invstd, gw = sum(gy * xhat), gb = sum(gy) over this rank
        gx, gw, gb = kernel("batch_norm_backward", dev)(gy, self.x, self.mean, self.invstd, self.w, False)
        host = lambda a: kernel("to_host", dev)(a)  # noqa: E731
        sums = all_reduce(np.stack([host(gb), host(gw)]).astype(np.float64))  # (2, C)
        invstd, w, mean = (host(a).astype(np.float64) for a in (self.invstd, self.w, self.mean))
        a, bx = sums[0] / self.m, sums[1] * invstd / self.m  # mean(gy), mean(gy * xhat) * invstd
        x = host(self.x).reshape(self.x.shape[0], self.x.shape[1], -1)  # (N, C, L)
        k = (w * invstd)[:, None]
        correction = k * (a[:, None] + (x - mean[:, None]) * bx[:, None])  # (N, C, L)
        gx_host = (host(gx).reshape(x.shape) - correction).astype(gy.dtype).reshape(self.x.shape)
        gx = kernel("reshape", dev)(kernel("from_host", dev)(np.ascontiguousarray(gx_host)), self.x.shape)
        return (gx,) + tuple(g for g, has in zip((gw, gb), self.has_wb) if has)


def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5):
    """F.batch_norm with the global batch's statistics when training under MPI (else F.batch_norm)."""
    if not training or world_size() == 1:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    x, w, b, running = F._batch_norm_args(input, running_mean, running_var, weight, bias, training)
    return SyncBatchNormFunction.apply(*F._inputs(x, w, b), has_wb=(w is not None, b is not None),
                                       running=running, momentum=float(momentum), eps=float(eps))


def convert_sync_batchnorm(module: Module) -> Module:
    """Make every batch-norm layer in ``module`` use the statistics of all ranks' shares when
    training (torch.nn.SyncBatchNorm.convert_sync_batchnorm, in place: the layers keep their
    parameters, buffers and state_dict names). Returns ``module``."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            object.__setattr__(m, "_batch_norm", sync_batch_norm)
    return module


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
        self.broadcast_buffers = broadcast_buffers
        object.__setattr__(self, "_ddp_buckets",
                           make_buckets([p for p in module.parameters() if p.requires_grad], bucket_cap_mb))
        broadcast_module(module)

    def forward(self, *args, **kwargs):
        if self.training and self.broadcast_buffers:  # rank 0's running statistics, as PyTorch's
            _broadcast_tensors([b for b in self.module.buffers() if b is not None])
        return self.module(*args, **kwargs)

    def reduce_gradients(self) -> None:
        reduce_gradients(self._ddp_buckets)

    def broadcast_buffers_now(self) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank, e.g. before evaluating."""
        _broadcast_tensors([b for b in self.module.buffers() if b is not None])


__all__ = ["init", "launched_by_mpi", "rank", "world_size", "local_size", "is_main", "barrier", "abort",
           "all_reduce", "broadcast", "broadcast_object", "all_gather_object", "shard", "broadcast_module",
           "all_reduce_gradients", "DistributedDataParallel", "ShardedLoader", "SyncBatchNormFunction",
           "sync_batch_norm", "convert_sync_batchnorm", "select_gpu", "set_threads_per_rank", "find_mpiexec"]
