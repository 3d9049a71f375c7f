"""Experiment recipes: the data sets the command line knows, their defaults, and the build of
a whole experiment (algorithm record, model, optimizer, task sources) from one
configuration dict.

A configuration is a flat dict of plain values (it is stored in checkpoints and
``config.json``): ``algorithm`` (a :data:`functional_meta.algorithms.REGISTRY` name),
``dataset`` (a :data:`DATASETS` name), the task shape (``ways``, ``shots``, ``queries``),
the inner loop (``inner_lr``, ``inner_steps``, ``inner_clip``), evaluation
(``eval_inner_steps``, ``val_tasks``, ``test_tasks``), the outer loop (``meta_lr``,
``meta_batch_size``, ``steps``/``epochs``, ``steps_per_epoch``), batching (``strategy``,
``chunk_size``), the algorithm's own options (:data:`ALGORITHM_OPTIONS`) and where things
live (``data_dir``, ``cache_dir``, ``output_dir``, ``device``, ``seed``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from functional_meta import algorithms, models
from functional_meta.batching import Batching
from functional_meta.inner import InnerLoop, LossFn
from functional_meta.model import functionalize
from functional_meta.optim import GradientTransformation
from functional_meta.steps import Algorithm

__all__ = [
    "ALGORITHM_OPTIONS",
    "DATASETS",
    "DEFAULTS",
    "TEST_SEED",
    "VAL_SEED",
    "Experiment",
    "algorithm_options",
    "build",
]

DATASETS = ("sinusoid", "omniglot")
VAL_SEED, TEST_SEED = 1, 2

# Finn et al. 2017 settings, per dataset. eval_inner_steps None: the dataset's
# EVAL_INNER_STEPS, or the trained steps for an algorithm that learned something per step.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sinusoid": dict(
        ways=1, shots=10, queries=10, inner_steps=1, eval_inner_steps=None, inner_lr=0.01,
        meta_lr=1e-3, meta_batch_size=25, steps=5000, steps_per_epoch=500, val_tasks=100,
        test_tasks=600, strategy="auto", threads=1, hidden=40,
    ),
    "omniglot": dict(
        ways=5, shots=1, queries=15, inner_steps=1, eval_inner_steps=None, inner_lr=0.4,
        meta_lr=1e-3, meta_batch_size=32, steps=60000, steps_per_epoch=1000, val_tasks=96,
        test_tasks=600, strategy="auto", threads=None, hidden=64,
    ),
}  # fmt: skip
EVAL_INNER_STEPS = {"sinusoid": 10, "omniglot": 3}

# Configuration key -> the algorithm constructor's option it sets (None values are unset).
ALGORITHM_OPTIONS = {
    "msl_epochs": "msl_anneal_epochs",
    "first_order_epochs": "first_order_epochs",
    "regularization": "regularization",
    "cg_steps": "cg_steps",
}


@dataclass
class Experiment:
    """Everything a run needs, built from a configuration dict by :func:`build`."""

    algorithm: Algorithm
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer: GradientTransformation
    sample: Callable[[torch.Generator], Any] | None
    val_tasks: Any
    test_tasks: Callable[[int], Any]


def algorithm_options(config: dict[str, Any]) -> dict[str, Any]:
    """The algorithm's own options that ``config`` sets (``ALGORITHM_OPTIONS``). Raises
    ``ValueError`` naming the configuration key when the algorithm has no such option."""
    known = algorithms.options(config["algorithm"])
    chosen = {}
    for key, option in ALGORITHM_OPTIONS.items():
        if config.get(key) is None:
            continue
        if option not in known:
            raise ValueError(
                f"{key}: {config['algorithm']} has no option {option} (its options: {sorted(known)})"
            )
        chosen[option] = config[key]
    return chosen


def _sinusoid(config: dict[str, Any], need_training: bool) -> tuple:
    from functional_meta.data import sinusoid_tasks
    from functional_meta.evaluation import sinusoid_test_tasks

    shots, queries, size = config["shots"], config["queries"], config["meta_batch_size"]

    def sample(generator: torch.Generator) -> Any:
        return sinusoid_tasks(size, shots, queries, generator=generator)

    def test(n: int) -> Any:
        return sinusoid_test_tasks(n, seed=TEST_SEED, support=shots, query=queries)

    val = None
    if config["val_tasks"]:
        val = sinusoid_test_tasks(config["val_tasks"], seed=VAL_SEED, support=shots, query=queries)
    module = models.mlp((1, config["hidden"], config["hidden"], 1))
    return module, F.mse_loss, sample, val, test


def _omniglot(config: dict[str, Any], need_training: bool) -> tuple:
    from functional_meta.data import ROT90, FewShotSampler, fixed_tasks, load_omniglot

    if config["data_dir"] is not None and not Path(config["data_dir"]).is_dir():
        raise FileNotFoundError(f"data_dir {config['data_dir']}: no such directory")
    cache = config["cache_dir"] or os.path.join(config["output_dir"], "cache")
    options = dict(cache_dir=cache, val_characters=100 if config["val_tasks"] else 0)
    shape = dict(
        ways=config["ways"], shots=config["shots"], queries=config["queries"], augment=ROT90
    )
    size = config["meta_batch_size"]

    def sampler(split: str) -> FewShotSampler:
        data = load_omniglot(config["data_dir"], split, **options)
        return FewShotSampler(data.images, data.labels, **shape)

    sample, val = None, None
    if need_training:
        train = sampler("train")

        def sample(generator: torch.Generator) -> Any:
            return train.sample(size, generator)

        if config["val_tasks"]:
            val = fixed_tasks(sampler("val"), config["val_tasks"], seed=VAL_SEED, batch_size=size)

    def test(n: int) -> Any:
        return fixed_tasks(sampler("test"), n, seed=TEST_SEED, batch_size=size)

    module = models.conv4(config["ways"], hidden=config["hidden"])
    return module, F.cross_entropy, sample, val, test


RECIPES: dict[str, Callable[[dict[str, Any], bool], tuple[nn.Module, LossFn, Any, Any, Any]]] = {
    "sinusoid": _sinusoid,
    "omniglot": _omniglot,
}


def build(config: dict[str, Any], *, need_training: bool = True) -> Experiment:
    """The algorithm record, model state, optimizer and task sources for ``config``.

    Seeds torch's global generator with ``config["seed"]`` before building the model (so
    its initial weights are reproducible), and fills ``config["eval_inner_steps"]`` when
    it is ``None`` (the dataset's default, or the record's trained steps for an algorithm
    that does not extend beyond them: 0 for one without an inner loop). Training tasks are loaded only when ``need_training``.
    """
    torch.manual_seed(config["seed"])
    module, loss, sample, val, test = RECIPES[config["dataset"]](config, need_training)
    apply, params, buffers = functionalize(module)
    algorithm = algorithms.build(
        config["algorithm"], apply, loss,
        InnerLoop(lr=config["inner_lr"], steps=config["inner_steps"], clip=config["inner_clip"]),
        batching=Batching(config["strategy"], config["chunk_size"]), **algorithm_options(config),
    )  # fmt: skip
    if config["eval_inner_steps"] is None:
        extends = algorithm.extends_steps
        config["eval_inner_steps"] = (
            EVAL_INNER_STEPS[config["dataset"]] if extends else algorithm.inner_steps
        )
    total = config["steps"] or config["epochs"] * config["steps_per_epoch"]
    optimizer = algorithm.meta_optimizer(config["meta_lr"], total)
    return Experiment(algorithm, params, buffers, optimizer, sample, val, test)
