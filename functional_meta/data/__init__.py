"""Task data: containers with a leading task axis, and the task sources built on them.

- :class:`TaskBatch` / :class:`Task`: four tensors ``support_x [T, S, ...]``, ``support_y``,
  ``query_x [T, Q, ...]``, ``query_y`` (one task: the same without ``T``).
- :func:`sinusoid_tasks`, :func:`sample_sinusoids`: sinusoid regression (Finn et al. 2017).
- :class:`FewShotSampler`, :func:`fixed_tasks`: N-way K-shot tasks from any labelled tensors.
- :class:`DatasetSampler`: the same from a dataset of ``(input, label)`` pairs, loading only
  the drawn examples.
- :func:`load_omniglot`: Omniglot from its official zips (decoding needs Pillow), decoded
  once into a cache every run shares (:func:`default_cache_dir`).
- :class:`WithinAlphabetSampler`, :func:`within_alphabet_tasks`: Lake et al.'s protocol,
  tasks within one alphabet with support and query by different drawers.
"""

from functional_meta.data.dataset import DatasetSampler
from functional_meta.data.fewshot import (
    ROT90,
    ClassAugment,
    FewShotSampler,
    FixedTasks,
    fixed_tasks,
    rotate90,
)
from functional_meta.data.omniglot import (
    Omniglot,
    default_cache_dir,
    download_omniglot,
    find_omniglot,
    load_omniglot,
)
from functional_meta.data.sinusoid import SinusoidTasks, sample_sinusoids, sinusoid_tasks
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.data.within_alphabet import WithinAlphabetSampler, within_alphabet_tasks

__all__ = [
    "ROT90",
    "ClassAugment",
    "DatasetSampler",
    "FewShotSampler",
    "FixedTasks",
    "Omniglot",
    "SinusoidTasks",
    "Task",
    "TaskBatch",
    "WithinAlphabetSampler",
    "default_cache_dir",
    "download_omniglot",
    "find_omniglot",
    "fixed_tasks",
    "load_omniglot",
    "rotate90",
    "sample_sinusoids",
    "sinusoid_tasks",
    "within_alphabet_tasks",
]
