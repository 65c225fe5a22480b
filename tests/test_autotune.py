"""Per-shape autotuning of conv2d's 'auto' on the CPU (kernels/autotune.py): the timed choice
is used and persisted, a bad table file is ignored with a warning, CNN_NUMBA_AUTOTUNE=0 keeps
the rule, and tuned results equal the rule's to float rounding. (conftest.py turns tuning
off for every other test.)"""
from __future__ import annotations

import json

import numba
import numpy as np
import pytest

import cnn_numba.functional as F
from cnn_numba import shapes, warmup
from cnn_numba.kernels import autotune
from cnn_numba.kernels.conv_algos import PASSES, TABLE, ConvAlgo
from conftest import forward_backward, random

# (2, 8, 10, 10) * (16, 8, 3, 3), padding 1: the rule runs 'direct' (its stride-1 kernels)
# for every pass, so 'im2col' is the other choice.
X_SHAPE, W_SHAPE = (2, 8, 10, 10), (16, 8, 3, 3)
GEOM = shapes.conv2d_geom(X_SHAPE, W_SHAPE, 1, 1, 1, 1)
OTHER = "im2col"


@pytest.fixture
def tune(monkeypatch, tmp_path):
    """Tuning on, its table in tmp_path, no choices left from earlier tests. Yields (the
    table's path, the list of (algorithm, pass) that ran, in order)."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.FILE_ENV, str(path))
    ran = []
    run = ConvAlgo.run

    def spy(self, pass_, geom, *arrays):
        ran.append((self.name, pass_))
        return run(self, pass_, geom, *arrays)

    monkeypatch.setattr(ConvAlgo, "run", spy)
    TABLE.tuner.clear()
    yield path, ran
    TABLE.tuner.clear()


def _conv(rng, dtype=np.float64):
    x, w, b = random(rng, X_SHAPE, dtype), random(rng, W_SHAPE, dtype), random(rng, (16,), dtype)
    return forward_backward(F.conv2d, [x, w, b], padding=1)


def _machine():
    return TABLE.tuner.machine(numba.get_num_threads(), TABLE)


def test_rule_is_direct_here():
    assert {TABLE.policy(GEOM, p) for p in PASSES} == {"direct"}


def test_tuning_times_every_algorithm_persists_and_matches_the_rule(tune, rng, monkeypatch):
    path, ran = tune
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    out, grads, _ = _conv(rng)
    for p in PASSES:  # the first call of each pass timed every algorithm that runs it
        assert {n for n, q in ran if q == p} == {a.name for a in TABLE.algos if a.tuned() and a.supports(GEOM, p)}
    assert {n for n, q in ran} >= {"direct", "im2col"}
    entries = json.loads(path.read_text())["machines"][_machine()]
    assert set(entries) == {autotune.shape_key(GEOM, np.dtype(np.float64), p) for p in PASSES}
    assert set(entries.values()) <= set(TABLE.names)

    # Later calls run the choice alone; a fresh process (a cleared tuner) reads it from disk.
    for fresh in (False, True):
        if fresh:
            TABLE.tuner.clear()
        ran.clear()
        out2, grads2, _ = _conv(np.random.default_rng(20240531))
        assert sorted(ran) == sorted((entries[autotune.shape_key(GEOM, np.dtype(np.float64), p)], p)
                                     for p in PASSES)
        np.testing.assert_array_equal(out2, out)  # the same algorithm: the same numbers
        for g2, g in zip(grads2, grads):
            np.testing.assert_array_equal(g2, g)

    # Whichever algorithm won, the numbers are the rule's up to rounding.
    monkeypatch.setenv(autotune.ENV, "0")
    TABLE.tuner.clear()  # the variable is read at the first call
    ref_out, ref_grads, _ = _conv(np.random.default_rng(20240531))
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def test_the_tables_choice_is_used(tune, rng):
    path, ran = tune
    key = autotune.shape_key(GEOM, np.dtype(np.float32), "forward")
    path.write_text(json.dumps({"format": autotune.FORMAT, "machines": {_machine(): {key: OTHER}}}))
    x, w = random(rng, X_SHAPE, np.float32), random(rng, W_SHAPE, np.float32)
    y = F.conv2d(x, w, padding=1)  # below MIN_MACS: no timing, but a stored choice counts
    assert ran == [(OTHER, "forward")]
    np.testing.assert_array_equal(y.numpy(), F.conv2d(x, w, padding=1, algo=OTHER).numpy())


@pytest.mark.parametrize("content", ["{not json", '{"format": "something else"}', "[1, 2]",
                                     json.dumps({"format": autotune.FORMAT, "machines": {"m": {"k": 3}}})])
def test_a_bad_table_is_ignored_with_a_warning(tune, rng, monkeypatch, content):
    path, ran = tune
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    path.write_text(content)
    x, w = random(rng, X_SHAPE), random(rng, W_SHAPE)
    with pytest.warns(RuntimeWarning, match="ignoring the autotune table"):
        y = F.conv2d(x, w, padding=1)
    np.testing.assert_allclose(y.numpy(), F.conv2d(x, w, padding=1, algo="direct").numpy(), rtol=1e-12, atol=1e-12)
    # tuned as if there were no file
    assert {n for n, _ in ran} == {a.name for a in TABLE.algos if a.supports(GEOM, "forward")}
    data = json.loads(path.read_text())  # and replaced by a good one
    assert data["format"] == autotune.FORMAT and list(data["machines"]) == [_machine()]


def test_unknown_algorithm_in_the_table_is_ignored(tune, rng):
    path, ran = tune
    key = autotune.shape_key(GEOM, np.dtype(np.float64), "forward")
    path.write_text(json.dumps({"format": autotune.FORMAT, "machines": {_machine(): {key: "winograd-9000"}}}))
    F.conv2d(random(rng, X_SHAPE), random(rng, W_SHAPE), padding=1)
    assert ran == [("direct", "forward")]  # tiny: the rule


def test_off_keeps_the_rule(tune, rng, monkeypatch):
    path, ran = tune
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    monkeypatch.setenv(autotune.ENV, "0")
    TABLE.tuner.clear()
    _conv(rng)
    assert sorted(ran) == sorted(("direct", p) for p in PASSES)
    assert not path.exists()


def test_small_layers_and_the_warmup_dry_step_are_not_timed(tune, rng):
    path, ran = tune
    x, w = random(rng, X_SHAPE), random(rng, W_SHAPE)
    F.conv2d(x, w, padding=1)  # 2*16*100*72 = 230k multiply-adds < MIN_MACS
    assert ran == [("direct", "forward")] and not path.exists()
    big = random(rng, (64, 8, 10, 10))  # 7.4M: would be timed, but the kernels only record
    ran.clear()
    with warmup.recording() as found:
        F.conv2d(big, w, padding=1)
    # Every algorithm's launcher ran (then the rule's, the dry step's own call), so the
    # warm-up compiles what the real step will time.
    geom = shapes.conv2d_geom(big.shape, W_SHAPE, 1, 1, 1, 1)
    every = [(a.name, "forward") for a in TABLE.algos if a.supports(geom, "forward")]
    assert len(every) >= 2 and sorted(ran) == sorted(every + [("direct", "forward")]) and not path.exists()
    compiled = {d.py_func.__name__ for d, _ in found}
    assert {"conv2d_forward_flat", "conv2d_forward_shifted"} <= compiled


def test_on_by_default(monkeypatch):
    monkeypatch.delenv(autotune.ENV, raising=False)
    assert autotune.enabled()
    for off in ("0", " 0 "):  # what conftest.py sets for every other test
        monkeypatch.setenv(autotune.ENV, off)
        assert not autotune.enabled()
    monkeypatch.setenv(autotune.ENV, "1")
    assert autotune.enabled()


def test_machine_key_names_the_blas_kernels_and_the_generation(tune, rng, monkeypatch):
    """Choices timed with other BLAS kernels (OpenBLAS's AVX2 set runs the products at half
    the AVX-512 speed) or against older kernels are not read: the key names both."""
    path, ran = tune
    from cnn_numba.sysinfo import kernel_blas_core
    machine = _machine()
    assert f"BLAS {kernel_blas_core().split(' (')[0]}" in machine and f"kernels {autotune.GENERATION} |" in machine
    key = autotune.shape_key(GEOM, np.dtype(np.float64), "forward")
    stale = machine.replace(f"kernels {autotune.GENERATION}", f"kernels {autotune.GENERATION - 1}")
    path.write_text(json.dumps({"format": autotune.FORMAT, "machines": {stale: {key: "im2col"}}}))
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    TABLE.tuner.clear()
    _conv(rng)
    assert {n for n, q in ran if q == "forward"} >= {"direct", "im2col"}  # timed afresh, not read
    assert set(json.loads(path.read_text())["machines"]) == {stale, machine}


def test_machine_key_names_the_candidates(tune, rng, monkeypatch):
    """A choice timed with Winograd switched off (CNN_NUMBA_WINOGRAD=0) never compared it: with
    Winograd back on it is not read, the layer is timed again, Winograd among the candidates."""
    path, ran = tune
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    monkeypatch.setenv("CNN_NUMBA_WINOGRAD", "0")
    x, w = random(rng, (2, 16, 6, 6)), random(rng, (16, 16, 3, 3))  # 16 channels: Winograd runs it
    off = _machine()
    tuned_off = [a.name for a in TABLE.algos if a.tuned()]
    assert off.endswith("| algos " + ",".join(tuned_off)) and "winograd" not in tuned_off
    F.conv2d(x, w, padding=1)
    assert ran and "winograd" not in {n for n, _ in ran}
    monkeypatch.setenv("CNN_NUMBA_WINOGRAD", "1")
    on = _machine()
    assert on.endswith("| algos " + ",".join(a.name for a in TABLE.algos if a.tuned())) and "winograd" in on
    TABLE.tuner.clear()
    ran.clear()
    F.conv2d(x, w, padding=1)
    assert ("winograd", "forward") in ran  # timed afresh: the choice made without it is not read
    assert set(json.loads(path.read_text())["machines"]) == {off, on}


def test_large_passes_are_timed_with_cold_caches(tune, rng, monkeypatch):
    """Above COLD_BYTES the tuner writes over twice the last-level cache before each timed
    call (a network's next layer finds its input evicted); below it, nothing."""
    from cnn_numba import sysinfo
    assert sysinfo.last_level_cache_bytes() > 0
    assert autotune._cache_evictor(autotune.COLD_BYTES) is None
    monkeypatch.setattr(autotune, "_last_level_cache", lambda: 1 << 16)
    evictor = autotune._cache_evictor(autotune.COLD_BYTES + 1)
    assert evictor.nbytes == 2 << 16
    fills = []
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    monkeypatch.setattr(autotune, "COLD_BYTES", 0)
    real = autotune._cache_evictor
    monkeypatch.setattr(autotune, "_cache_evictor", lambda n: (fills.append(n), real(n))[1])
    out, grads, _ = _conv(rng)
    assert len(fills) == 3  # one timing per pass
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
