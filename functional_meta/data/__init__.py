"""Task data: containers with a leading task axis, and the task sources built on them."""

from functional_meta.data.tasks import Task, TaskBatch

__all__ = ["Task", "TaskBatch"]
