"""Data-parallel meta-learning: 2 gloo processes on CPU equal one process on the same tasks.

One launch of 2 ranks (``distributed.spawn``, fork start, 1 thread each) runs every
distributed check and saves what each rank saw; the tests below compare that with
single-process runs here. A second launch goes through ``torchrun`` with a rank that
raises, under a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optree
import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta import distributed
from functional_meta.data import FewShotSampler, sinusoid_tasks
from functional_meta.training import fit
from tests.reference import tiny_conv4, tiny_mlp

WORLD = 2
PER_RANK = 2  # tasks per rank; the meta-batch is WORLD * PER_RANK
STEPS = 3
F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def sinusoids(num_tasks, generator):
    return sinusoid_tasks(num_tasks, 5, 5, generator=generator)


def image_sampler(dtype=torch.float32):
    images = torch.rand(6, 4, 1, 16, 16, generator=torch.Generator().manual_seed(5), dtype=dtype)
    return FewShotSampler(images, ways=3, shots=1, queries=2)


def record(name, apply, loss):
    """The algorithm record each distributed check trains."""
    settings = {
        "maml": (fm.InnerLoop(lr=0.05, steps=2), {}),
        "metasgd": (fm.InnerLoop(lr=0.05), {}),
        "reptile": (fm.InnerLoop(lr=0.02, steps=3), {"batch_size": 4}),
        "mamlpp": (fm.InnerLoop(lr=0.4, steps=2), {"first_order_epochs": 1.0}),
        "imaml": (fm.InnerLoop(lr=0.05, steps=3), {"regularization": 2.0, "cg_steps": 3}),
        "protonets": (fm.InnerLoop(), {}),
    }
    inner, options = settings[name]
    return fm.algorithms.build(name, apply, loss, inner, **options)


def setups():
    """name -> (module builder, sampler, optimizer, loss).

    MAML++ runs in float64: its second-order meta-gradient through batch norm on 3-example
    batches amplifies float32 rounding (sharded and whole-batch gradients differ by ~3e-5
    there, 1e-15 in float64), and Adam turns the rounding noise of the conv biases' exactly
    zero meta-gradient (batch statistics cancel them) into ±lr steps. float64 shows that the
    sharding itself is exact."""
    return {
        "maml": (tiny_mlp, sinusoids, fm.optim.sgd(0.01), F.mse_loss),
        "metasgd": (tiny_mlp, sinusoids, fm.optim.adam(1e-3), F.mse_loss),
        "reptile": (tiny_mlp, sinusoids, fm.optim.sgd(0.5), F.mse_loss),
        "mamlpp": (lambda seed=0: tiny_conv4(dtype=F64, seed=seed), image_sampler(F64),
                   fm.optim.adam(1e-3), F.cross_entropy),
        "imaml": (tiny_mlp, sinusoids, fm.optim.sgd(0.01), F.mse_loss),
        "protonets": (lambda seed=0: tiny_conv4(dtype=F64, seed=seed), image_sampler(F64),
                      fm.optim.adam(1e-3), F.cross_entropy),
    }  # fmt: skip


def train(name, steps, *, seed=0, distributed_run=False):
    """``steps`` meta-updates on meta-batches of WORLD * PER_RANK tasks from one stream;
    epochs 0, 1, 2... so that MAML++ crosses from first to second order."""
    build, sample, optimizer, loss = setups()[name]
    apply, params, buffers = fm.functionalize(build(seed=seed))
    algorithm = record(name, apply, loss)
    state = fm.init_state(algorithm, params, buffers, optimizer)
    stream, inner = torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)
    history = []
    if distributed_run:
        state = distributed.broadcast(state)
    for epoch in range(steps):
        if distributed_run:
            tasks = distributed.sample_shard(sample, WORLD * PER_RANK, stream)
            state, metrics = distributed.step(
                algorithm, state, tasks, optimizer,
                epoch=float(epoch), generator=inner, check_sync=True,
            )  # fmt: skip
        else:
            full = sample if callable(sample) else sample.sample
            tasks = full(WORLD * PER_RANK, stream)
            state, metrics = fm.step(
                algorithm, state, tasks, optimizer, epoch=float(epoch), generator=inner
            )
        history.append(metrics)
    return state, history


def user_loop(distributed_run=False):
    """A maml_step-style loop of a user's own: plain parameter dicts, ``maml_grad`` made
    data-parallel by ``distributed.data_parallel``, the update by hand."""
    apply, params, buffers = fm.functionalize(tiny_mlp())
    grad = distributed.data_parallel(fm.maml_grad) if distributed_run else fm.maml_grad
    opt = fm.optim.adam(1e-2)
    opt_state = opt.init(params)
    stream = torch.Generator().manual_seed(3)
    history = []
    for _ in range(STEPS):
        tasks = sinusoids(WORLD * PER_RANK, stream)
        if distributed_run:
            tasks = distributed.shard(tasks)
        grads, metrics = grad(params, tasks, apply=apply, buffers=buffers, loss=F.mse_loss,
                              inner=fm.InnerLoop(lr=0.05, steps=2))  # fmt: skip
        updates, opt_state = opt.update(grads, opt_state, params)
        params = fm.optim.apply_updates(params, updates)
        history.append(metrics)
    return params, history


def worker(ctx, out_dir):
    """Every distributed check, on each rank; results saved for the parent to compare."""
    results = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend}
    # Rank 1 starts from other weights: broadcast must make them rank 0's.
    for name in setups():
        state, history = train(name, STEPS, seed=ctx.rank, distributed_run=True)
        results[name] = (state, history)

    results["mean"] = distributed.all_reduce_mean({"a": torch.full((3,), float(ctx.rank))})

    results["user_loop"] = user_loop(distributed_run=True)

    build, sample, optimizer, loss = setups()["maml"]
    apply, params, buffers = fm.functionalize(build())
    learner = record("maml", apply, loss)
    state = fm.init_state(learner, params, buffers, optimizer)
    tasks = distributed.sample_shard(sample, WORLD * PER_RANK, 0)

    def failing_step(tasks):
        try:
            distributed.step(learner, state, tasks, optimizer)
        except Exception as error:
            return type(error).__name__, str(error)
        return None

    # A non-finite gradient on rank 1 only: every rank raises NonFiniteError, none hangs.
    poisoned = tasks
    if ctx.rank == 1:
        poisoned = fm.TaskBatch(
            tasks.support_x, tasks.support_y * float("nan"), tasks.query_x, tasks.query_y
        )
    results["non_finite"] = failing_step(poisoned)
    # The same through fit, as the command line runs it: every rank stops in step 1.
    try:
        fit(learner, state, lambda generator: poisoned, optimizer=optimizer, epochs=1,
            steps_per_epoch=1, gradient=distributed.data_parallel(learner.grad), progress=False)  # fmt: skip
        results["fit_non_finite"] = None
    except fm.NonFiniteError as error:
        results["fit_non_finite"] = str(error)
    # Any other error on rank 1: it raises its own, rank 0 a DistributedError.
    broken = tasks
    if ctx.rank == 1:
        targets = torch.zeros(PER_RANK, 5, 2)  # the model outputs 1 value per example
        broken = fm.TaskBatch(tasks.support_x, targets, tasks.query_x, targets)
    results["failure"] = failing_step(broken)
    # ...and the group still works afterwards.
    results["after"] = failing_step(tasks)

    # A diverged parameter is caught and named on every rank.
    meta = {"params": dict(state.meta_params["params"])}
    if ctx.rank == 1:
        meta["params"]["head.bias"] = meta["params"]["head.bias"] + 1e-6
    try:
        distributed.check_in_sync(meta)
        results["divergence"] = None
    except distributed.DivergenceError as error:
        results["divergence"] = str(error)
    torch.save(results, Path(out_dir) / f"rank{ctx.rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    start = time.perf_counter()
    distributed.spawn(worker, WORLD, str(out), start_method="fork", threads=1)
    print(f"2-rank run: {time.perf_counter() - start:.1f} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close_trees(actual, expected, atol=1e-6, rtol=1e-5):
    a_leaves, a_spec = optree.tree_flatten(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    assert a_spec == e_spec
    for a, e in zip(a_leaves, e_leaves, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


def test_ranks_form_a_gloo_group(ranks):
    assert [(r["rank"], r["world"], r["backend"]) for r in ranks] == [
        (0, 2, "gloo"),
        (1, 2, "gloo"),
    ]
    for r in ranks:
        torch.testing.assert_close(r["mean"]["a"], torch.full((3,), 0.5))


@pytest.mark.parametrize("name", ["maml", "metasgd", "reptile", "mamlpp", "imaml", "protonets"])
def test_distributed_steps_equal_single_process_steps_on_the_same_tasks(ranks, name):
    expected, expected_history = train(name, STEPS)
    state0, history0 = ranks[0][name]
    state1, history1 = ranks[1][name]
    # Identical on both ranks, bit for bit (check_sync=True checked it at every step too).
    assert_close_trees(state1, state0, atol=0, rtol=0)
    # Equal to one process on all 2T tasks, to float32 rounding.
    assert_close_trees(state0.meta_params, expected.meta_params)
    assert_close_trees(state0.buffers, expected.buffers)
    assert_close_trees(state0.opt_state, expected.opt_state, atol=1e-6, rtol=1e-4)
    # The parameters moved, so the comparison means something.
    initial, _ = train(name, 0)
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(
            initial.meta_params["params"].values(),
            state0.meta_params["params"].values(),
            strict=True,
        )
    )
    assert moved > 1e-4
    # Metrics are averaged over ranks: the means over all 2T tasks.
    for got, want in zip(history0, expected_history, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(
                torch.tensor(got[key], dtype=torch.float64),
                torch.tensor(want[key], dtype=torch.float64),
                atol=1e-6,
                rtol=1e-5,
            )
    assert history0 == history1


def test_a_users_own_maml_grad_loop_runs_data_parallel(ranks):
    expected, expected_history = user_loop()
    for r in ranks:
        params, history = r["user_loop"]
        assert_close_trees(params, expected)
        for got, want in zip(history, expected_history, strict=True):
            assert got.keys() == want.keys()
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert_close_trees(ranks[1]["user_loop"][0], ranks[0]["user_loop"][0], atol=0, rtol=0)


def test_an_error_on_one_rank_raises_on_every_rank_in_the_same_step(ranks):
    (kind0, message0), (kind1, _) = ranks[0]["non_finite"], ranks[1]["non_finite"]
    assert (kind0, kind1) == ("NonFiniteError", "NonFiniteError")
    assert "rank(s) [1]" in message0
    (kind0, message0), (kind1, message1) = ranks[0]["failure"], ranks[1]["failure"]
    assert kind0 == "DistributedError" and "rank(s) [1] failed" in message0
    assert kind1 == "ValueError" and "loss: mse_loss" in message1
    assert ranks[0]["after"] is None and ranks[1]["after"] is None
    assert all(r["fit_non_finite"].startswith("step 1 (epoch 1)") for r in ranks)
    assert "rank(s) [1]" in ranks[0]["fit_non_finite"]


def test_divergence_is_detected_on_every_rank_and_names_the_tensor(ranks):
    for r in ranks:
        assert "ranks [1]" in r["divergence"] and "head.bias" in r["divergence"]


# -- without a process group --------------------------------------------------------------
def test_outside_a_process_group_everything_is_the_single_process_identity(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.init()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    tree = {"a": torch.ones(2)}
    assert distributed.all_reduce_mean(tree) is tree and distributed.broadcast(tree) is tree
    distributed.check_in_sync(tree)
    grad = distributed.data_parallel(lambda x: (x, {"loss": 1.0}))
    assert grad(tree) == (tree, {"loss": 1.0})
    tasks = sinusoids(4, 0)
    assert distributed.shard(tasks) is tasks


def test_shards_are_contiguous_slices_of_one_stream():
    tasks = sinusoids(6, 0)
    parts = [distributed.shard(tasks, rank=r, world_size=3) for r in range(3)]
    torch.testing.assert_close(torch.cat([p.support_x for p in parts]), tasks.support_x)
    sampler = image_sampler()
    full = sampler.sample(4, torch.Generator().manual_seed(3))
    for rank in range(2):
        g = torch.Generator().manual_seed(3)
        part = distributed.sample_shard(sampler, 4, g, rank=rank, world_size=2)
        torch.testing.assert_close(part.query_x, full.query_x[2 * rank : 2 * rank + 2])
        # The stream advances as in a single process, whatever this rank kept.
        g_single = torch.Generator().manual_seed(3)
        sampler.draw(4, g_single)
        assert torch.equal(g.get_state(), g_single.get_state())
    streamed = list(distributed.shard_stream([tasks, tasks], rank=1, world_size=2))
    torch.testing.assert_close(streamed[1].query_y, tasks.query_y[3:])


def test_uneven_meta_batches_and_bad_environments_are_clear_errors():
    with pytest.raises(ValueError, match="5 tasks do not split evenly over 2 processes"):
        distributed.shard(sinusoids(5, 0), rank=0, world_size=2)
    with pytest.raises(ValueError, match="do not split evenly"):
        distributed.sample_shard(sinusoids, 3, 0, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank/world_size"):
        distributed.shard(sinusoids(4, 0), rank=2, world_size=2)
    assert distributed.torchrun_env({}) is None
    assert distributed.torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == {
        "rank": 1, "world_size": 2, "local_rank": 1,
    }  # fmt: skip
    with pytest.raises(distributed.DistributedError, match="RANK < WORLD_SIZE"):
        distributed.torchrun_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(distributed.DistributedError, match="must both be set"):
        distributed.torchrun_env({"RANK": "0"})


def disagreeing(ctx, out_dir):
    """Rank r was started with seed r: every rank refuses, naming the seed; a per-rank
    setting that is ignored (the device) and equal settings pass."""
    outcome = None
    try:
        distributed.check_same_config({"seed": ctx.rank, "meta_lr": 1e-3, "device": ctx.rank},
                                      ignore=("device",))  # fmt: skip
    except ValueError as error:
        outcome = str(error)
    distributed.check_same_config({"seed": 0, "device": ctx.rank}, ignore=("device",))
    Path(out_dir, f"rank{ctx.rank}.txt").write_text(str(outcome))


def test_ranks_started_with_different_settings_refuse_to_train_naming_the_setting(tmp_path):
    distributed.spawn(disagreeing, WORLD, str(tmp_path), start_method="fork", threads=1)
    for rank in range(WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert (
            "the ranks disagree on the configuration: seed is 0 on rank 0 but 1 on rank 1"
            in message
        )
        assert "meta_lr" not in message and "device" not in message


# -- failure under torchrun ----------------------------------------------------------------
FAILING = """
import torch
from functional_meta import distributed

def main(ctx):
    distributed.all_reduce_mean({"x": torch.ones(3)})
    if ctx.rank == 1:
        raise ValueError("boom on rank 1")
    distributed.all_reduce_mean({"x": torch.ones(3)})  # rank 0 would wait here forever
    distributed.all_reduce_mean({"x": torch.ones(3)})

if __name__ == "__main__":
    distributed.run(main)
"""


def launch(args, timeout=60):
    """Run a command in its own session; on timeout kill the whole group and fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{args} hung for more than {timeout} s:\n{output}")
    return process.returncode, output


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_a_failing_rank_under_torchrun_fails_the_run_with_its_error(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(FAILING))
    start = time.perf_counter()
    code, output = launch([*TORCHRUN, str(script)])
    assert code != 0
    assert "[rank 1] Traceback" in output and "ValueError: boom on rank 1" in output, output
    assert time.perf_counter() - start < 60


# -- the command line under torchrun -------------------------------------------------------
def test_cli_under_torchrun_trains_data_parallel_and_resumes_with_one_process(tmp_path, capsys):
    from functional_meta import cli
    from functional_meta.checkpoint import load_checkpoint

    common = ["--meta-batch-size", "4", "--test-tasks", "4", "--val-tasks", "0", "--no-plots",
              "--no-progress", "--threads", "1"]  # fmt: skip
    split = tmp_path / "split"
    code, output = launch(
        [
            *TORCHRUN,
            "-m",
            "functional_meta",
            "train",
            "--steps",
            "3",
            "--output-dir",
            str(split),
            *common,
        ]
    )
    assert code == 0, output
    assert output.count("meta-trained 3 steps") == 1  # only rank 0 prints
    # Resume the 2-process run in this single process, and compare with 6 steps in one go.
    assert cli.main(["train", "--resume", "--steps", "6", "--output-dir", str(split), *common]) == 0
    whole = tmp_path / "whole"
    assert cli.main(["train", "--steps", "6", "--output-dir", str(whole), *common]) == 0
    capsys.readouterr()
    resumed = load_checkpoint(split / "checkpoints" / "final.pt")
    expected = load_checkpoint(whole / "checkpoints" / "final.pt")
    assert resumed.step == expected.step == 6
    assert_close_trees(resumed.state.meta_params, expected.state.meta_params)
    assert_close_trees(resumed.state.opt_state, expected.state.opt_state, rtol=1e-4)


def test_cli_rejects_a_meta_batch_that_does_not_split_over_the_processes(tmp_path):
    code, output = launch(
        [
            *TORCHRUN,
            "-m",
            "functional_meta",
            "train",
            "--steps",
            "1",
            "--meta-batch-size",
            "5",
            "--output-dir",
            str(tmp_path),
            "--test-tasks",
            "4",
            "--no-plots",
            "--no-progress",
        ]
    )
    assert code != 0 and "does not split evenly over 2 processes" in output, output
