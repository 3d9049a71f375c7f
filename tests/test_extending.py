"""docs/extending.md, done as the page says, from outside the package: the toy algorithm's
module is written to a temporary directory, imported, registered with one line, and then
trained and scored through fit, evaluate, checkpoints and the command line."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta.cli import main
from tests.reference import regression_tasks, tiny_mlp

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)  # markers aside


@pytest.fixture
def joint(tmp_path, monkeypatch):
    """The page's module, saved and imported as a user would, then the page's registry line."""
    (tmp_path / "joint.py").write_text(blocks()[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("joint", None)
    module = importlib.import_module("joint")
    namespace: dict = {}
    exec(blocks()[1], namespace)  # the registry line, exactly as on the page
    assert fm.algorithms.REGISTRY["joint"] is module.joint
    module.page_namespace = namespace
    yield module
    del fm.algorithms.REGISTRY["joint"]


def test_the_page_runs_as_written(joint, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    exec(blocks()[2], joint.page_namespace)  # the page's blocks run in sequence


def test_the_joint_gradient_equals_a_hand_written_reference(joint):
    module = tiny_mlp(torch.float64)
    apply, params, buffers = fm.functionalize(module)
    tasks = regression_tasks(dtype=torch.float64)
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    for i in range(len(tasks)):
        sx, sy, qx, qy = tasks[i]
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        out = torch.func.functional_call(module, leaves, (x,))
        grads = torch.autograd.grad(F.mse_loss(out, y) / len(tasks), list(leaves.values()))
        expected = {k: expected[k] + g for k, g in zip(leaves, grads, strict=True)}
    for batching in (fm.Batching("vmap"), fm.Batching("loop")):
        algorithm = fm.algorithms.build("joint", apply, F.mse_loss, batching=batching)
        gradient = algorithm.grad({"params": params}, buffers, tasks)
        for name in params:
            torch.testing.assert_close(gradient.grads["params"][name], expected[name])


def test_fit_checkpoints_and_the_command_line_know_the_new_name(joint, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--algorithm", "joint", "--steps", "4", "--steps-per-epoch", "2",
            "--meta-batch-size", "4", "--val-tasks", "4", "--test-tasks", "8",
            "--eval-inner-steps", "2", "--no-plots", "--no-progress", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and set(results["after"]) == {"0", "1", "2"}
    assert main(["evaluate", str(out), "--test-tasks", "8"]) == 0


def test_register_refuses_what_cannot_be_a_constructor(joint):
    with pytest.raises(ValueError, match="already registered"):
        fm.algorithms.register("maml", joint.joint)
    with pytest.raises(TypeError, match=r"constructor\(model, loss, inner"):
        fm.algorithms.register("bad", lambda apply, loss: None)
    with pytest.raises(ValueError, match="identifier"):
        fm.algorithms.register("not a name", joint.joint)
