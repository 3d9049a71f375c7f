"""pytest-benchmark view of the same measurements (kept out of the default test run).

    pytest benchmarks/ --benchmark-only
    FM_BENCH_WORKLOADS=W1,W2 pytest benchmarks/ --benchmark-only    # the full conv workloads

Default workloads: W3 (sinusoid, meta-batch 25) and W1 at meta-batch 4 (conv4, short). Each
case checks its meta-gradient against the plain autograd loop's before it is timed; peers
that are not installed are skipped with the reason. Peak memory per case needs a fresh
process: use ``python benchmarks/vmap_vs_loop.py`` for that.
"""

from __future__ import annotations

import functools
import os

import bench_lib as bl
import pytest

WORKLOADS = os.environ.get("FM_BENCH_WORKLOADS", "W3,W1@T=4").split(",")
IMPLS = [
    ("plain", "-"),
    ("ours", "loop"),
    ("ours", "vmap"),
    ("ours", "chunked"),
    ("higher", "-"),
    ("learn2learn", "-"),
    ("torchopt", "-"),
]
TOL = 3e-3  # float32 rounding of second-order MAML through BN reaches ~1e-3 at T=64


@functools.cache
def reference(name: str) -> dict:
    prepared, _ = bl.prepare(bl.workload(name), "plain", "-", "cpu", 8)
    return prepared.check_grads()


def rounds(name: str) -> tuple[int, int]:
    w = bl.workload(name)
    if w.net == "mlp":
        return 2, 10
    return (0, 3) if w.tasks <= 8 else (0, 2)


@pytest.mark.parametrize("impl,strategy", IMPLS, ids=[f"{i}-{s}".rstrip("-") for i, s in IMPLS])
@pytest.mark.parametrize("name", WORKLOADS)
def test_meta_step(benchmark, name: str, impl: str, strategy: str) -> None:
    w = bl.workload(name)
    reason = bl.unavailable_reason(w, impl)
    if reason:
        pytest.skip(reason)
    if strategy == "chunked" and w.tasks <= 8:
        pytest.skip("one chunk: the same as vmap")
    prepared, source = bl.prepare(w, impl, strategy, "cpu", 8)
    grads = prepared.check_grads()
    if grads is not None:
        err = bl.rel_err(grads, reference(name))
        assert err <= TOL, f"{impl} {strategy}: meta-gradient rel err {err:.2e} vs the plain loop"
        benchmark.extra_info["grad_rel_err"] = err
    benchmark.extra_info.update(workload=w.describe(), data=source)
    warmup, n = rounds(name)
    benchmark.pedantic(prepared.step, rounds=n, warmup_rounds=warmup, iterations=1)
