"""pytest-benchmark set-up: equal thread counts, the warm-up rule, GFLOP/s in extra_info.

Run (pyproject's addopts carry --benchmark-disable; --benchmark-enable overrides it):

    python -m pytest bench -p no:cacheprovider --benchmark-enable --benchmark-only

Without --benchmark-enable each case only runs (warm-up and one call), untimed: a smoke test.
"""
from __future__ import annotations

import pytest

from shapes import ALGOS, ConvShape, conv_arrays, cpu_info, match_threads, pool_arrays, versions

THREADS = match_threads()
_RECORDS: list[dict] = []  # one per timed case, for the GFLOP/s summary


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cnn_numba_bench"] = {**cpu_info(), **versions(), "threads": THREADS}


@pytest.fixture(scope="session")
def data():
    """``data(shape)``: the shape's float32 arrays, built once; only the latest shape is kept."""
    cache: dict = {}

    def get(shape):
        if shape.name not in cache:
            cache.clear()
            cache[shape.name] = conv_arrays(shape) if isinstance(shape, ConvShape) else pool_arrays(shape)
        return cache[shape.name]

    return get


@pytest.fixture
def bench_pass(benchmark):
    """``bench_pass(fn, group=..., pass_=..., flops=..., **info)``: warm fn up, time it, record GFLOP/s.

    The untimed first call compiles the Numba kernel (or loads it from the cache) and faults
    the output pages in; PyTorch gets the same call. GFLOP/s is computed from the fastest
    round, as report.py does.
    """
    def run(fn, *, group: str, pass_: str, flops: int | None = None, **info):
        fn()
        benchmark.group = group
        benchmark.extra_info.update(info, **{"pass": pass_})
        if flops:
            benchmark.extra_info["gflop"] = flops / 1e9
        result = benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            best = stats.stats.min
            benchmark.extra_info["best_ms"] = best * 1e3
            if flops:
                benchmark.extra_info["gflops"] = flops / best / 1e9
            _RECORDS.append({"group": group, **benchmark.extra_info})
        return result

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """GFLOP/s per conv case (pytest-benchmark's own table has only times)."""
    rows = [r for r in _RECORDS if "gflops" in r]
    if not rows:
        return
    impls = [*ALGOS, "torch"]
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        table.setdefault(r["group"], {})[r["impl"]] = r["gflops"]
    tr = terminalreporter
    tr.write_sep("-", f"GFLOP/s from the fastest round ({THREADS} threads)")
    tr.write_line(f"{'group':<26}" + "".join(f"{i:>10}" for i in impls))
    for group, vals in table.items():
        tr.write_line(f"{group:<26}" + "".join(f"{vals[i]:>10.1f}" if i in vals else f"{'-':>10}" for i in impls))
