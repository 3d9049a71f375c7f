"""The benchmark scripts whose figures the docs quote run end to end (tiny settings)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_shared_body_prints_one_row_per_setting():
    command = [sys.executable, str(ROOT / "benchmarks" / "shared_body.py"), "--meta-batch-size",
               "2", "--queries", "1", "--repeats", "1", "--inner-steps", "2"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 2 |")]
    assert [(name.strip(), strategy.strip()) for _, name, strategy, *_ in rows] == [
        ("anil", "loop"), ("anil (whole model)", "loop"), ("anil", "vmap"), ("maml", "loop"),
        ("maml", "vmap"),
    ]  # fmt: skip
    assert all(float(row[3]) > 0 and 0 < float(row[4].strip(" %")) <= 100 for row in rows)


@pytest.mark.parametrize("floor", ["_hand_written", "_any_model_floor"])
def test_the_eager_floors_take_the_same_steps_as_maml_step(floor):
    """step_overhead.py's eager floors are only floors if they compute what maml_step does."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_overhead
        from bench_lib import OUTER_LR, make_module, make_tasks, workload
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import functional_meta as fm

    w = workload("W3")
    tasks, _ = make_tasks(w, "cpu")
    hand_step, hand_params = getattr(step_overhead, floor)(w, tasks)
    apply, params, buffers = fm.functionalize(make_module(w))
    optimizer = fm.optim.adam(OUTER_LR)
    state = optimizer.init(params)
    inner = fm.InnerLoop(lr=w.inner_lr, steps=w.inner_steps)
    for _ in range(3):
        hand_step()
        params, state, _ = fm.maml_step(params, state, tasks, optimizer=optimizer, apply=apply,
                                        buffers=buffers, loss=w.loss, inner=inner)  # fmt: skip
    for ours, hand in zip(params.values(), hand_params, strict=True):
        torch.testing.assert_close(hand, ours, rtol=1e-5, atol=1e-7)
