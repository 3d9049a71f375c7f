"""Prototypical Networks: the loss and its gradient against a hand-written reference (loops
over tasks and classes, the original module), the batching strategies, evaluation without
an inner loop, the command line on Omniglot, and bad input."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta.algorithms.protonets import prototype_logits, prototypes
from functional_meta.cli import main
from tests.reference import image_tasks, tiny_conv4, tiny_mlp

STRATEGIES = [
    fm.Batching("vmap"),
    fm.Batching("vmap", chunk_size=2),
    fm.Batching("loop"),
    fm.Batching("auto"),
]
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"
HAVE_DATA = all((DATA / f"images_{n}.zip").is_file() for n in ("background", "evaluation"))


def shuffled_tasks(ways=3, shots=2, queries=2):
    """Image tasks whose support labels are in a random order per task (not grouped)."""
    tasks = image_tasks(num_tasks=4, ways=ways, shots=shots, queries=queries, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(ways * shots, generator=g) for _ in range(len(tasks))])
    support_x = torch.stack([x[o] for x, o in zip(tasks.support_x, order, strict=True)])
    support_y = torch.stack([y[o] for y, o in zip(tasks.support_y, order, strict=True)])
    return fm.TaskBatch(support_x, support_y, tasks.query_x, tasks.query_y)


def reference_loss_and_grads(module, tasks, ways):
    """(1/T) Σ_i CE(−‖f(x_q) − c_k‖², y_q) with c_k an explicit mean per class, by autograd
    through the original module's body (native batch norm on batch statistics)."""
    body = module.features.train()
    leaves = [p for _, p in body.named_parameters()]
    total = 0.0
    for i in range(len(tasks)):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        support, query = body(xs), body(xq)
        centres = [torch.stack([support[j] for j in range(len(ys)) if ys[j] == k]).mean(0)
                   for k in range(ways)]  # fmt: skip
        logits = torch.stack(
            [torch.stack([-((query[n] - c) ** 2).sum() for c in centres]) for n in range(len(yq))]
        )
        total = total + F.cross_entropy(logits, yq) / len(tasks)
    grads = torch.autograd.grad(total, leaves)
    return total.item(), {
        f"features.{n}": g for (n, _), g in zip(body.named_parameters(), grads, strict=True)
    }


@pytest.mark.parametrize("batching", STRATEGIES, ids=["vmap", "chunked", "loop", "auto"])
def test_loss_and_gradient_equal_the_hand_written_reference(batching):
    module = tiny_conv4(ways=3, dtype=torch.float64)
    apply, params, buffers = fm.functionalize(module)
    tasks = shuffled_tasks()
    algorithm = fm.algorithms.protonets(apply, F.cross_entropy, batching=batching)
    meta_params, meta_buffers = algorithm.init(params, buffers)
    assert sorted(meta_params["params"]) == sorted(k for k in params if not k.startswith("head."))
    gradient = algorithm.grad(meta_params, meta_buffers, tasks)
    loss, grads = reference_loss_and_grads(module, tasks, ways=3)
    assert gradient.metrics["loss"] == pytest.approx(loss, rel=1e-12)
    assert sorted(gradient.grads["params"]) == sorted(grads)
    for name, expected in grads.items():
        torch.testing.assert_close(gradient.grads["params"][name], expected, rtol=1e-10, atol=1e-12)


def test_prototypes_are_class_means_and_absent_classes_get_minus_infinity():
    embeddings = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 2, 2, 0])
    means, counts = prototypes(embeddings, labels)
    torch.testing.assert_close(means[0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(means[2], torch.tensor([3.0, 2.0]))
    assert counts.tolist() == [2, 0, 2, 0]
    logits = prototype_logits(torch.tensor([[3.0, 2.0]]), means, counts)
    assert logits[0, 2] == 0 and logits[0, 0] == -10
    assert logits[0, 1] == float("-inf") and logits[0, 3] == float("-inf")


def test_evaluation_has_no_inner_steps_and_refuses_some():
    apply, params, buffers = fm.functionalize(tiny_conv4(ways=3))
    algorithm = fm.algorithms.protonets(apply, F.cross_entropy)
    assert algorithm.inner_steps == 0 and not algorithm.extends_steps
    state = fm.init_state(algorithm, params, buffers, fm.optim.adam(1e-3))
    tasks = image_tasks(ways=3, shots=2, queries=3)
    result = fm.evaluate(algorithm, state, tasks)
    assert result.steps == 0 and 0 <= result.accuracy <= 1
    assert fm.evaluate(algorithm, state, tasks, steps=0).loss == result.loss
    with pytest.raises(ValueError, match="steps: prototypical networks have no inner loop"):
        fm.evaluate(algorithm, state, tasks, steps=1)
    with pytest.raises(TypeError, match="not adapted parameters"):
        fm.adapted_module(
            algorithm, state, tiny_conv4(ways=3), tasks.support_x[0], tasks.support_y[0]
        )


def test_training_raises_query_accuracy():
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(fm.models.mlp((8, 32, 32, 2)))
    algorithm = fm.algorithms.protonets(apply, F.cross_entropy)
    optimizer = fm.optim.adam(3e-3)
    state = fm.init_state(algorithm, params, buffers, optimizer)

    def sample(generator, num_tasks=8):
        # 3-way tasks: the classes differ in the first two inputs; the other six are noise
        # that an untrained embedding mixes in and a trained one learns to ignore.
        centres = torch.zeros(num_tasks, 3, 1, 8)
        centres[..., :2] = torch.randn(num_tasks, 3, 1, 2, generator=generator)

        def draw(per_class):
            noise = torch.randn(num_tasks, 3, per_class, 8, generator=generator)
            noise[..., :2] *= 0.3
            x = (centres + noise).reshape(num_tasks, 3 * per_class, 8)
            return x, torch.arange(3).repeat_interleave(per_class).expand(
                num_tasks, -1
            ).contiguous()

        return fm.TaskBatch(*draw(1), *draw(5))

    test = sample(torch.Generator().manual_seed(99), 200)
    before = fm.evaluate(algorithm, state, test).accuracy
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        state, _ = fm.step(algorithm, state, sample(generator), optimizer)
    after = fm.evaluate(algorithm, state, test).accuracy
    assert after > before + 0.1, (before, after)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda t: replace(t, query_y=t.query_y.clamp(max=1)), None, None),
        (lambda t: replace(t, query_y=torch.full_like(t.query_y, 5)), ValueError,
         "tasks.query_y: every query label must be a class of the task's support set"),
        (lambda t: replace(t, support_y=t.support_y * 3), ValueError,
         r"tasks.support_y: expected class labels in 0..5"),
        (lambda t: replace(t, support_y=t.support_y.float(), query_y=t.query_y.float()), TypeError,
         "tasks.support_y: prototypical networks classify"),
    ],
)  # fmt: skip
def test_labels_are_checked(change, error, message):
    apply, params, buffers = fm.functionalize(tiny_conv4(ways=3))
    algorithm = fm.algorithms.protonets(apply, F.cross_entropy)
    tasks = change(image_tasks(ways=3, shots=2))
    if error is None:
        algorithm.grad(*algorithm.init(params, buffers), tasks)
        return
    with pytest.raises(error, match=message):
        algorithm.grad(*algorithm.init(params, buffers), tasks)


def test_the_head_must_exist_or_be_none():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    with pytest.raises(ValueError, match="head: the model has no submodule 'classifier'"):
        fm.algorithms.protonets(apply, F.cross_entropy, head="classifier")
    with pytest.raises(TypeError, match="pass head=None to embed with the whole model"):
        fm.algorithms.protonets(lambda p, b, x: x, F.cross_entropy)
    whole = fm.algorithms.protonets(apply, F.cross_entropy, head=None)
    assert sorted(whole.init(params, buffers)[0]["params"]) == sorted(params)


@pytest.mark.skipif(not HAVE_DATA, reason=f"Omniglot zips not found in {DATA.resolve()}")
def test_command_line_trains_and_evaluates_on_omniglot(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "omniglot", "--algorithm", "protonets", "--steps", "2",
            "--meta-batch-size", "2", "--test-tasks", "4", "--val-tasks", "0", "--no-progress",
            "--no-plots", "--data-dir", str(DATA), "--cache-dir", str(DATA / "cache"),
            "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["after"]) == ["0"] and results["after"]["0"]["steps"] == 0
    assert (
        main(["evaluate", str(out), "--test-tasks", "4", "--cache-dir", str(DATA / "cache")]) == 0
    )
    assert "0 inner steps" in capsys.readouterr().out


def test_the_command_line_evaluates_an_algorithm_without_inner_loop_at_k_0_only(tmp_path):
    from functional_meta import recipes
    from functional_meta.cli import report
    from functional_meta.cli.arguments import build_parser, train_config

    args = build_parser().parse_args(
        ["train", "--algorithm", "protonets", "--steps", "1", "--output-dir", str(tmp_path)]
    )
    config = train_config(args)
    experiment = recipes.build(config, need_training=False)
    assert config["eval_inner_steps"] == 0  # the record's steps, not --inner-steps (1)
    apply, params, buffers = fm.functionalize(tiny_conv4(ways=3))
    algorithm = fm.algorithms.protonets(apply, F.cross_entropy)
    state = fm.init_state(algorithm, params, buffers, fm.optim.adam(1e-3))
    tasks = image_tasks(ways=3, shots=2)
    scores = report.test_scores(config, replace(experiment, algorithm=algorithm), state, tasks)
    assert list(scores) == [0]
