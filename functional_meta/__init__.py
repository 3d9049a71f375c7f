"""functional_meta: pure-functional gradient-based meta-learning on torch.func.

The layers, each built only on the ones before it::

    tree        pytree helpers over optree
    validation  generic checks: numbers, counts, finiteness (NonFiniteError)
    model       functionalize(module) -> (apply, params, buffers)
    inner       InnerLoop (the inner-loop settings, validated once) and adapt(...): the one
                differentiable inner loop
    losses      maml_loss(...): the adapt-then-score objective (params, task) -> (loss, aux)
    batching    Batching, over_tasks / mean_value_and_grad: the one task-batching mechanism
    optim       pure optimizers (optax shape) and schedules
    checks      tasks and models checked at the public boundary
    steps       Algorithm: one record of pure functions per algorithm; init_state, step
    algorithms  one module per algorithm (maml, anil, metasgd, mamlpp, reptile) and the
                registry; maml_step, metasgd_step, reptile_step, mamlpp_step for own loops
    fit, evaluate, checkpoints, recipes, the MAML/Reptile/MetaSGD classes, plots, the
    command line, distributed (conveniences; imported on first use, so
    ``import functional_meta`` stays light)
"""

from functional_meta import algorithms, models, optim, tree
from functional_meta.algorithms.maml import maml_grad, maml_step
from functional_meta.algorithms.mamlpp import mamlpp_optimizer, mamlpp_step
from functional_meta.algorithms.metasgd import metasgd_grad, metasgd_init, metasgd_step
from functional_meta.algorithms.reptile import reptile_grad, reptile_step
from functional_meta.batching import Batching, mean_value_and_grad, over_tasks
from functional_meta.data import Task, TaskBatch
from functional_meta.inner import Adaptation, InnerLoop, adapt
from functional_meta.losses import maml_loss, msl_weights
from functional_meta.model import FunctionalModel, functionalize
from functional_meta.steps import Algorithm, Gradient, TrainState, init_state, step, update
from functional_meta.validation import NonFiniteError

__all__ = [
    "Adaptation",
    "Algorithm",
    "Batching",
    "FunctionalModel",
    "Gradient",
    "InnerLoop",
    "NonFiniteError",
    "Task",
    "TaskBatch",
    "TrainState",
    "adapt",
    "algorithms",
    "functionalize",
    "init_state",
    "maml_grad",
    "maml_loss",
    "maml_step",
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
    "step",
    "tree",
    "update",
]
# The one source of the version: pyproject.toml reads this literal without importing the package.
__version__ = "0.1.0"

# Conveniences, imported on first attribute access (PEP 562).
_LAZY = {
    "evaluate": "functional_meta.evaluation",
    "EvaluationResult": "functional_meta.evaluation",
    "confidence_interval": "functional_meta.evaluation",
    "sinusoid_test_tasks": "functional_meta.evaluation",
    "fit": "functional_meta.training",
    "FitResult": "functional_meta.training",
    "History": "functional_meta.training",
    "save_checkpoint": "functional_meta.checkpoint",
    "load_checkpoint": "functional_meta.checkpoint",
    "Checkpoint": "functional_meta.checkpoint",
    "CheckpointError": "functional_meta.checkpoint",
    "to_module": "functional_meta.export",
    "adapted_module": "functional_meta.export",
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
