"""functional_meta: pure-functional gradient-based meta-learning on torch.func."""

from functional_meta.data import Task, TaskBatch

__all__ = ["Task", "TaskBatch"]
__version__ = "0.1.0"
