"""Experiment recipes: the data sets the command line knows, their defaults, and the build of
a whole experiment (algorithm record, model, optimizer, task sources) from one
configuration dict.

A configuration is a flat dict of plain values (it is stored in checkpoints and
``config.json``): ``algorithm`` (a :data:`functional_meta.algorithms.REGISTRY` name),
``dataset`` (a :data:`DATASETS` name), the task shape (``ways``, ``shots``, ``queries``;
Omniglot's ``train_ways``: the classes of a training task, ``None`` for ``ways``),
the inner loop (``inner_lr``, ``inner_steps``, ``inner_clip``, ``inner_optimizer``: a
:data:`INNER_OPTIMIZERS` name), evaluation
(``eval_inner_steps``, ``val_tasks``, ``test_tasks``), the outer loop (``meta_lr``,
``meta_lr_schedule``: a :data:`~functional_meta.steps.META_LR_SCHEDULES` name or ``None``
for the algorithm's own, ``meta_lr_decay_steps``: its horizon, ``meta_batch_size``,
``steps``/``epochs``, ``steps_per_epoch``), batching (``strategy``,
``chunk_size``), the algorithm's own options (:data:`ALGORITHM_OPTIONS`) and where things
live (``data_dir``, ``cache_dir``, ``output_dir``, ``device``, ``seed``). Omniglot has a
``protocol`` (:data:`PROTOCOLS`): ``"vinyals"``, the common few-shot split, or ``"lake"``,
the one-shot challenge of Lake et al. (see :func:`omniglot_lake`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from functional_meta import algorithms, models, optim, tree
from functional_meta.batching import Batching
from functional_meta.inner import InnerLoop, LossFn
from functional_meta.model import functionalize
from functional_meta.optim import GradientTransformation
from functional_meta.steps import META_LR_SCHEDULES, Algorithm

__all__ = [
    "ALGORITHM_OPTIONS",
    "DATASETS",
    "DEFAULTS",
    "INNER_OPTIMIZERS",
    "PROTOCOLS",
    "TEST_SEED",
    "VAL_SEED",
    "Experiment",
    "algorithm_options",
    "build",
    "check_train_ways",
    "inner_loop",
    "omniglot_lake",
    "total_steps",
    "training_ways",
]

DATASETS = ("sinusoid", "omniglot")
PROTOCOLS = ("vinyals", "lake")
# Lake protocol: these background alphabets (the last ones by name) are held out for validation.
LAKE_VAL_ALPHABETS = 4
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
        test_tasks=600, strategy="auto", threads=None, hidden=64, protocol="vinyals",
        train_ways=None,
    ),
}  # fmt: skip
EVAL_INNER_STEPS = {"sinusoid": 10, "omniglot": 3}
# What a protocol changes in its dataset's defaults: Lake et al.'s challenge is 20-way.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {"vinyals": {}, "lake": {"ways": 20}}

# The inner update by name, built at the configuration's inner_lr. "sgd": the papers' plain
# step (InnerLoop(lr=...), which Meta-SGD and MAML++ learn rates for); "momentum": SGD with
# momentum 0.9; "adam": Adam with betas (0.9, 0.999) and eps 1e-8.
INNER_OPTIMIZERS: dict[str, Callable[[float], GradientTransformation] | None] = {
    "sgd": None,
    "momentum": lambda lr: optim.sgd(lr, momentum=0.9),
    "adam": lambda lr: optim.adam(lr),
}

# Configuration key -> the algorithm constructor's option it sets (None values are unset).
ALGORITHM_OPTIONS = {
    "msl_epochs": "msl_anneal_epochs",
    "first_order_epochs": "first_order_epochs",
    "regularization": "regularization",
    "cg_steps": "cg_steps",
    "damping": "damping",
    "hessian_damping": "hessian_damping",
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


def inner_loop(config: dict[str, Any]) -> InnerLoop:
    """The :class:`~functional_meta.inner.InnerLoop` of ``config``: ``inner_steps``,
    ``inner_clip`` and the update ``inner_optimizer`` (default ``"sgd"``, also for
    configurations saved before the option existed) at rate ``inner_lr``."""
    make = INNER_OPTIMIZERS[config.get("inner_optimizer", "sgd")]
    rate = {"lr": config["inner_lr"]} if make is None else {"optimizer": make(config["inner_lr"])}
    return InnerLoop(steps=config["inner_steps"], clip=config["inner_clip"], **rate)


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
    check_train_ways(config)
    module = models.conv4(config["ways"], hidden=config["hidden"])
    if config.get("protocol", "vinyals") == "lake":
        return (module, F.cross_entropy, *omniglot_lake(config, need_training))
    # cache_dir None: the one cache every run shares (data.omniglot_files.default_cache_dir)
    options = dict(cache_dir=config["cache_dir"], val_characters=100 if config["val_tasks"] else 0)
    shape = dict(shots=config["shots"], queries=config["queries"], augment=ROT90)
    size = config["meta_batch_size"]

    def sampler(split: str, ways: int = config["ways"]) -> FewShotSampler:
        data = load_omniglot(config["data_dir"], split, **options)
        return FewShotSampler(data.images, data.labels, ways=ways, **shape)

    sample, val = None, None
    if need_training:
        train = sampler("train", training_ways(config))

        def sample(generator: torch.Generator) -> Any:
            return train.sample(size, generator)

        if config["val_tasks"]:
            val = fixed_tasks(sampler("val"), config["val_tasks"], seed=VAL_SEED, batch_size=size)

    def test(n: int) -> Any:
        return fixed_tasks(sampler("test"), n, seed=TEST_SEED, batch_size=size)

    return module, F.cross_entropy, sample, val, test


def training_ways(config: dict[str, Any]) -> int:
    """The classes of a training task: ``train_ways``, or ``ways`` when it is unset (also
    for configurations saved before the option existed)."""
    return config.get("train_ways") or config["ways"]


def check_train_ways(config: dict[str, Any]) -> None:
    """Training on other ways than evaluation (``train_ways``, as Snell et al. train
    Prototypical Networks 60-way) needs meta-parameters that do not depend on the number of
    classes: the Omniglot model built for ``ways`` and for ``train_ways`` must give the
    algorithm the same meta-parameter shapes. Raises ``ValueError`` naming ``train_ways``
    when they differ (a classifier head with one output per class, as MAML adapts)."""
    if training_ways(config) == config["ways"]:
        return

    def shapes(ways: int) -> Any:
        with torch.random.fork_rng(devices=[]):  # the run's weights stay those of its seed
            apply, params, buffers = functionalize(models.conv4(ways, hidden=config["hidden"]))
        record = algorithms.build(config["algorithm"], apply, F.cross_entropy)
        return tree.map(lambda x: tuple(x.shape), record.init(params, buffers)[0])

    if shapes(config["ways"]) != shapes(training_ways(config)):
        raise ValueError(
            f"train_ways: {config['algorithm']}'s meta-parameters depend on the number of "
            f"classes (its classifier has one output per class), so it trains on "
            f"{config['ways']}-way tasks like those it is tested on; training on other ways is for an "
            "algorithm without a classifier in its meta-parameters, such as protonets"
        )


def omniglot_lake(config: dict[str, Any], need_training: bool) -> tuple:
    """Task sources ``(sample, val_tasks, test_tasks)`` of Lake et al.'s one-shot protocol.

    Meta-training sees the *background* set only (964 characters, 30 alphabets), less the
    last :data:`LAKE_VAL_ALPHABETS` alphabets by name, which are held out for validation
    (when ``val_tasks > 0``). Every task, in training, validation and test, is N-way within
    one alphabet with its support and query drawn by disjoint drawers
    (:class:`~functional_meta.data.WithinAlphabetSampler`); training classes are augmented
    with the 4 rotations (a rotated character keeps its alphabet), validation and test are
    not. Test tasks come from the *evaluation* set (20 alphabets) as in the challenge: one
    support drawing per class by one drawer and one query drawing per class by another
    (``shots`` support drawings when ``shots > 1``, by as many drawers), the same number of
    tasks in every alphabet: ``test_tasks`` rounded down to a multiple of the number of
    alphabets (at least one task each).
    """
    from functional_meta.data import (
        ROT90,
        WithinAlphabetSampler,
        fixed_tasks,
        load_omniglot,
        within_alphabet_tasks,
    )

    cache = config["cache_dir"]  # None: the one cache every run shares
    shots, size = config["shots"], config["meta_batch_size"]

    def sampler(
        split: str, keep: Callable[[str], bool], ways: int = config["ways"], **settings: Any
    ) -> Any:
        data = load_omniglot(config["data_dir"], split, cache_dir=cache)
        kept = torch.tensor([keep(data.alphabet_names[a]) for a in data.alphabets.tolist()])
        return WithinAlphabetSampler(
            data.by_class()[kept], alphabets=data.alphabets[kept], drawers=data.drawers[kept],
            alphabet_names=data.alphabet_names, ways=ways, shots=shots, **settings,
        )  # fmt: skip

    sample, val = None, None
    if need_training:
        names = sorted(
            load_omniglot(config["data_dir"], "background", cache_dir=cache).alphabet_names
        )
        held_out = set(names[-LAKE_VAL_ALPHABETS:]) if config["val_tasks"] else set()
        train = sampler("background", lambda a: a not in held_out, queries=config["queries"],
                        augment=ROT90, ways=training_ways(config))  # fmt: skip

        def sample(generator: torch.Generator) -> Any:
            return train.sample(size, generator)

        if held_out:
            held = sampler("background", held_out.__contains__, queries=1, query_drawers=1)
            val = fixed_tasks(held, config["val_tasks"], seed=VAL_SEED, batch_size=size)

    def test(n: int) -> Any:
        evaluation = sampler("evaluation", lambda a: True, queries=1, query_drawers=1)
        per_alphabet = max(1, n // len(evaluation.alphabets))
        return within_alphabet_tasks(evaluation, per_alphabet, seed=TEST_SEED, batch_size=size)

    return sample, val, test


RECIPES: dict[str, Callable[[dict[str, Any], bool], tuple[nn.Module, LossFn, Any, Any, Any]]] = {
    "sinusoid": _sinusoid,
    "omniglot": _omniglot,
}


def total_steps(config: dict[str, Any]) -> int:
    """The run's meta-updates in total: ``steps``, or ``epochs`` of ``steps_per_epoch``."""
    return config["steps"] or config["epochs"] * config["steps_per_epoch"]


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
        config["algorithm"], apply, loss, inner_loop(config),
        batching=Batching(config["strategy"], config["chunk_size"]), **algorithm_options(config),
    )  # fmt: skip
    if config["eval_inner_steps"] is None:
        extends = algorithm.extends_steps
        config["eval_inner_steps"] = (
            EVAL_INNER_STEPS[config["dataset"]] if extends else algorithm.inner_steps
        )
    # The horizon of a decaying meta rate: fixed when the run started (meta_lr_decay_steps),
    # else, as for configurations saved before the option existed, the run's length.
    horizon = config.get("meta_lr_decay_steps") or total_steps(config)
    schedule = config.get("meta_lr_schedule")  # None: the algorithm's own
    make = algorithm.meta_optimizer if schedule is None else META_LR_SCHEDULES[schedule]
    optimizer = make(config["meta_lr"], horizon)
    return Experiment(algorithm, params, buffers, optimizer, sample, val, test)
