"""functional_meta: pure-functional gradient-based meta-learning on torch.func.

The layers, each built only on the ones before it::

    tree       pytree helpers over optree
    model      functionalize(module) -> (apply, params, buffers)
    inner      adapt(...): the one differentiable inner loop
    losses     maml_loss(...): pure (meta_params, task) -> (loss, aux)
    batching   over_tasks / mean_value_and_grad: the one task-batching mechanism
    optim      pure optimizers (optax shape) and schedules
    steps      maml_step, metasgd_step; reptile_step; mamlpp_step: one meta-update per call
    fit, evaluate, checkpoints, MAML/Reptile/MetaSGD classes, plots, the command line
               (conveniences; imported on first use, so ``import functional_meta`` stays light)
"""

from functional_meta import models, optim, tree
from functional_meta.algorithms import ALGORITHMS, MetaLearner, TrainState
from functional_meta.batching import mean_value_and_grad, over_tasks
from functional_meta.checks import NonFiniteError
from functional_meta.data import Task, TaskBatch
from functional_meta.inner import Adaptation, adapt
from functional_meta.losses import maml_loss, msl_weights
from functional_meta.mamlpp import (
    MAMLPlusPlus,
    mamlpp_eval_model,
    mamlpp_grad,
    mamlpp_init,
    mamlpp_optimizer,
    mamlpp_step,
    update_running_statistics,
)
from functional_meta.model import FunctionalModel, functionalize
from functional_meta.reptile import reptile_grad, reptile_step
from functional_meta.steps import (
    maml_grad,
    maml_step,
    metasgd_grad,
    metasgd_init,
    metasgd_step,
)
from functional_meta.training import fit

__all__ = [
    "ALGORITHMS",
    "Adaptation",
    "FunctionalModel",
    "MAMLPlusPlus",
    "MetaLearner",
    "NonFiniteError",
    "Task",
    "TaskBatch",
    "TrainState",
    "adapt",
    "fit",
    "functionalize",
    "maml_grad",
    "maml_loss",
    "maml_step",
    "mamlpp_eval_model",
    "mamlpp_grad",
    "mamlpp_init",
    "mamlpp_optimizer",
    "mamlpp_step",
    "mean_value_and_grad",
    "metasgd_grad",
    "metasgd_init",
    "metasgd_step",
    "models",
    "msl_weights",
    "optim",
    "over_tasks",
    "reptile_grad",
    "reptile_step",
    "tree",
    "update_running_statistics",
]
# The one source of the version: pyproject.toml reads this literal without importing the package.
__version__ = "0.1.0"

# Conveniences, imported on first attribute access (PEP 562).
_LAZY = {
    "evaluate": "functional_meta.evaluation",
    "EvaluationResult": "functional_meta.evaluation",
    "confidence_interval": "functional_meta.evaluation",
    "sinusoid_test_tasks": "functional_meta.evaluation",
    "FitResult": "functional_meta.training",
    "History": "functional_meta.training",
    "save_checkpoint": "functional_meta.checkpoint",
    "load_checkpoint": "functional_meta.checkpoint",
    "Checkpoint": "functional_meta.checkpoint",
    "CheckpointError": "functional_meta.checkpoint",
    "MAML": "functional_meta.classic",
    "Reptile": "functional_meta.classic",
    "MetaSGD": "functional_meta.classic",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'functional_meta' has no attribute {name!r}")
