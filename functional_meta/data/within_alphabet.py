"""Within-alphabet tasks with support and query by different drawers (Lake et al.).

Lake, Salakhutdinov and Tenenbaum's one-shot classification protocol (Science 2015; "The
Omniglot challenge: a 3-year progress report", 2019): meta-train on Omniglot's
*background* set only (964 characters, 30 alphabets) and evaluate 20-way one-shot
classification in which the 20 characters of a task all come from **one alphabet** of the
*evaluation* set, and the query drawings are by **other drawers** than the support
drawings. Both make the task harder than the common protocol (classes from any alphabet,
drawings by anyone).

:class:`WithinAlphabetSampler` is a :class:`~functional_meta.data.FewShotSampler` whose
``draw`` adds both constraints; everything else (``gather``, ``sample``, :func:`fixed_tasks`,
``distributed.sample_shard``) is the parent's. Per task, with ``T`` tasks drawn at once:

1. an alphabet, uniformly among the alphabets with at least ``ways`` classes (smaller ones
   are *skipped*, listed in ``skipped_alphabets``; if none is large enough the constructor
   raises);
2. ``N = ways`` distinct classes of that alphabet, in random order (label ``n`` is the
   ``n``-th);
3. a random split of the drawers: ``support_drawers`` of them for the support set and
   ``query_drawers`` others for the query set (disjoint); by default the support set is
   drawn by ``shots`` drawers and the query set by all the remaining ones;
4. per class, ``K`` of the task's support drawers and ``Q`` of its query drawers, distinct
   and at random; the class's drawings by those drawers are the support and query examples.

Each drawer drew a character once, so within a class the drawings are by different drawers
anyway; the split matters across classes: no query drawing is by a drawer who drew any of
the task's support drawings (in Omniglot a drawer index is one person across an
alphabet's characters; docs/data.md shows the evidence).

The split is drawn at random per task; it is not the fixed set of 20 evaluation runs that
Lake et al. published as image files (those are not reproduced here). With
``shots=1, queries=1, support_drawers=1, query_drawers=1`` the 20 support images of a task
are all by one drawer and the 20 query images all by one other drawer.

Every step is ``rand`` + ``topk`` over the whole meta-batch, as in ``FewShotSampler``: no
per-task Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from functional_meta.data.fewshot import (
    ClassAugment,
    FewShotSampler,
    FixedTasks,
    _check_labels,
    _pick,
)
from functional_meta.data.omniglot import Omniglot
from functional_meta.data.tasks import _as_generator, _check_count

__all__ = ["WithinAlphabetSampler", "within_alphabet_tasks"]


class WithinAlphabetSampler(FewShotSampler):
    """N-way K-shot tasks whose classes share one alphabet and whose support and query
    drawings are by disjoint sets of drawers (see the module docstring).

    Args:
        images, labels: as for :class:`~functional_meta.data.FewShotSampler`: class-indexed
            ``[num_classes, per_class, *feature]`` with ``labels=None``, or
            ``[num_examples, *feature]`` with ``labels [num_examples]``.
        alphabets: integer tensor ``[num_classes]``, the alphabet (any integer id) of each
            class, classes in ascending label order (the order of ``class_labels``). With an
            ``augment``, the variants of a class share its alphabet.
        drawers: integer tensor, who drew each example: ``[num_classes, per_class]`` for
            class-indexed ``images``, ``[num_examples]`` with ``labels``. Every class must
            have exactly one example by each drawer of one common set (Omniglot: 1..20).
        ways, shots, queries: ``N``, ``K``, ``Q``.
        support_drawers: how many drawers draw a task's support set (``>= shots``);
            default ``shots``.
        query_drawers: how many other drawers draw its query set (``>= queries``); default
            all the drawers not drawing the support set.
        alphabet_names: optional names, ``alphabet_names[a]`` for alphabet id ``a``; used in
            messages and :meth:`__repr__`.
        augment: an optional :class:`~functional_meta.data.ClassAugment`; alphabet sizes are
            counted in classes after augmentation.

    Attributes:
        alphabets: the ids of the alphabets tasks are drawn from (those with at least
            ``ways`` classes), ascending. skipped_alphabets: the ids of the others.
        drawers: the drawer ids, ascending.

    Raises ``ValueError`` naming the argument for: alphabets or drawers of the wrong shape,
    a class without exactly one example per drawer, drawer counts that do not fit
    (``support_drawers + query_drawers`` more than the drawers), and no alphabet with
    ``ways`` classes; plus everything ``FewShotSampler`` checks.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        alphabets: torch.Tensor,
        drawers: torch.Tensor,
        ways: int,
        shots: int,
        queries: int,
        support_drawers: int | None = None,
        query_drawers: int | None = None,
        alphabet_names: Sequence[str] | None = None,
        augment: ClassAugment | None = None,
    ) -> None:
        super().__init__(images, labels, ways=ways, shots=shots, queries=queries, augment=augment)
        where = "WithinAlphabetSampler"
        num_base = int(self._counts.numel())
        variants = augment.variants if augment is not None else 1

        _check_labels(drawers, where, "drawers", optional=False)
        layout = tuple(images.shape[:2]) if labels is None else (images.shape[0],)
        if tuple(drawers.shape) != layout:
            raise ValueError(
                f"{where}: drawers must have one entry per example, shape {layout} for images "
                f"{tuple(images.shape)}{'' if labels is None else ' with labels'}, "
                f"got {tuple(drawers.shape)}"
            )
        flat_drawers = drawers.reshape(-1).cpu()
        self.drawers = tuple(int(d) for d in torch.unique(flat_drawers, sorted=True))
        num_drawers = len(self.drawers)
        position = torch.searchsorted(torch.tensor(self.drawers), flat_drawers)
        if self._table.shape[1] != num_drawers or not bool((self._counts == num_drawers).all()):
            c = int((self._counts != num_drawers).nonzero()[0])
            raise ValueError(
                f"{where}: every class needs exactly one example by each of the {num_drawers} "
                f"drawers, but class {int(self.class_labels[c])} has {int(self._counts[c])} examples"
            )
        by_class = position[self._table]  # [C, D]: drawer position of each class's examples
        complete = (by_class.sort(dim=1).values == torch.arange(num_drawers)).all(dim=1)
        if not bool(complete.all()):
            c = int((~complete).nonzero()[0])
            row = sorted(self.drawers[int(p)] for p in by_class[c])
            raise ValueError(
                f"{where}: every class needs exactly one example by each drawer; class "
                f"{int(self.class_labels[c])} has examples by drawers {row}, not one each of "
                f"{list(self.drawers)}"
            )
        # grid[c, d] = the example of base class c drawn by the d-th drawer.
        self._grid = torch.empty_like(self._table).scatter_(1, by_class, self._table)
        self._drawer_of = flat_drawers

        _check_labels(alphabets, where, "alphabets", optional=False)
        if tuple(alphabets.shape) != (num_base,):
            raise ValueError(
                f"{where}: alphabets must have one entry per class, shape ({num_base},) in "
                f"ascending label order, got {tuple(alphabets.shape)}"
            )
        self._class_alphabet = alphabets.cpu().repeat_interleave(variants)  # [num_classes]
        ids, sizes = torch.unique(self._class_alphabet, sorted=True, return_counts=True)
        if alphabet_names is not None:
            alphabet_names = tuple(alphabet_names)
            if int(ids.min()) < 0 or int(ids.max()) >= len(alphabet_names):
                raise ValueError(
                    f"{where}: alphabet_names has {len(alphabet_names)} names but alphabets "
                    f"holds ids {int(ids.min())}..{int(ids.max())}"
                )
        self.alphabet_names = alphabet_names
        self.alphabets = tuple(int(a) for a in ids[sizes >= self.ways])
        self.skipped_alphabets = tuple(int(a) for a in ids[sizes < self.ways])
        if not self.alphabets:
            largest = int(sizes.argmax())
            raise ValueError(
                f"{where}: ways={self.ways} but no alphabet has that many classes (the largest, "
                f"{self._name(int(ids[largest]))}, has {int(sizes[largest])}); alphabets with "
                "fewer than ways classes are skipped, so lower ways"
            )

        self.support_drawers = shots if support_drawers is None else support_drawers
        _check_count(self.support_drawers, "support_drawers", where)
        if self.support_drawers < shots:
            raise ValueError(
                f"{where}: support_drawers={self.support_drawers} is fewer than shots={shots}: "
                "each class's support examples need distinct drawers"
            )
        free = num_drawers - self.support_drawers
        self.query_drawers = free if query_drawers is None else query_drawers
        if query_drawers is not None:
            _check_count(query_drawers, "query_drawers", where)
        if self.query_drawers < queries:
            raise ValueError(
                f"{where}: query_drawers={self.query_drawers} is fewer than queries={queries} "
                f"(the data has {num_drawers} drawers, support_drawers={self.support_drawers}): "
                "each class's query examples need distinct drawers"
            )
        if self.query_drawers > free:
            raise ValueError(
                f"{where}: support_drawers + query_drawers = {self.support_drawers} + "
                f"{self.query_drawers} is more than the {num_drawers} drawers"
            )

    @classmethod
    def from_omniglot(
        cls,
        data: Omniglot,
        *,
        ways: int,
        shots: int,
        queries: int,
        support_drawers: int | None = None,
        query_drawers: int | None = None,
        augment: ClassAugment | None = None,
    ) -> WithinAlphabetSampler:
        """The sampler for a split from :func:`~functional_meta.data.load_omniglot` (its
        ``by_class()`` images, ``alphabets``, ``drawers`` and ``alphabet_names``)."""
        if not isinstance(data, Omniglot):
            raise TypeError(
                f"WithinAlphabetSampler.from_omniglot: data must be an Omniglot (from "
                f"load_omniglot), got {type(data).__name__}"
            )
        return cls(
            data.by_class(),
            alphabets=data.alphabets,
            drawers=data.drawers,
            alphabet_names=data.alphabet_names,
            ways=ways,
            shots=shots,
            queries=queries,
            support_drawers=support_drawers,
            query_drawers=query_drawers,
            augment=augment,
        )

    def _name(self, alphabet: int) -> str:
        return self.alphabet_names[alphabet] if self.alphabet_names else f"alphabet {alphabet}"

    def draw(
        self, num_tasks: int, generator: torch.Generator | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``num_tasks`` tasks' indices, each from one alphabet chosen uniformly among
        :attr:`alphabets`. Returns ``(examples [T, N, K+Q], classes [T, N])`` like
        :meth:`FewShotSampler.draw <functional_meta.data.FewShotSampler.draw>`."""
        num_tasks = _check_count(num_tasks, "num_tasks", "WithinAlphabetSampler.draw")
        generator = _as_generator(generator, "WithinAlphabetSampler.draw")
        device = generator.device
        which = torch.randint(len(self.alphabets), (num_tasks,), generator=generator, device=device)
        return self.draw_in(torch.tensor(self.alphabets, device=device)[which], generator)

    def draw_in(
        self, alphabets: torch.Tensor, generator: torch.Generator | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one task in each given alphabet: ``alphabets [T]`` ids from :attr:`alphabets`.
        Returns ``(examples [T, N, K+Q], classes [T, N])``."""
        where = "WithinAlphabetSampler.draw_in"
        generator = _as_generator(generator, where)
        if not isinstance(alphabets, torch.Tensor) or alphabets.dim() != 1:
            raise TypeError(f"{where}: alphabets must be a 1-d tensor of alphabet ids")
        unknown = set(alphabets.tolist()) - set(self.alphabets)
        if unknown:
            raise ValueError(
                f"{where}: alphabets {sorted(unknown)} are not among those with at least "
                f"ways={self.ways} classes ({list(self.alphabets)})"
            )
        device = generator.device
        num_tasks, ways = alphabets.shape[0], self.ways
        same = self._class_alphabet.to(device)[None, :] == alphabets.to(device)[:, None]
        classes = _pick(generator, (num_tasks, self.num_classes), ways, same)
        num_drawers = self._grid.shape[1]
        ds, dq = self.support_drawers, self.query_drawers
        chosen = _pick(generator, (num_tasks, num_drawers), ds + dq)  # random, distinct
        support_pool = chosen[:, None, :ds].expand(num_tasks, ways, ds)
        query_pool = chosen[:, None, ds:].expand(num_tasks, ways, dq)
        support = support_pool.gather(2, _pick(generator, (num_tasks, ways, ds), self.shots))
        query = query_pool.gather(2, _pick(generator, (num_tasks, ways, dq), self.queries))
        variants = self.augment.variants if self.augment is not None else 1
        base = classes // variants
        slots = torch.cat([support, query], dim=2)  # drawer positions [T, N, K+Q]
        return self._grid.to(device)[base[..., None], slots], classes

    def task_alphabets(self, classes: torch.Tensor) -> torch.Tensor:
        """The alphabet id of every class in ``classes`` (e.g. ``[T, N]`` from :meth:`draw`
        or ``FixedTasks.classes``), same shape."""
        return self._class_alphabet.to(classes.device)[classes]

    def example_drawers(self, examples: torch.Tensor) -> torch.Tensor:
        """The drawer id of every example in ``examples`` (indices from :meth:`draw`)."""
        return self._drawer_of.to(examples.device)[examples]

    def __repr__(self) -> str:
        augment = f", augment={self.augment.variants} variants" if self.augment is not None else ""
        skipped = (
            f", {len(self.skipped_alphabets)} smaller skipped" if self.skipped_alphabets else ""
        )
        return (
            f"WithinAlphabetSampler({self.num_classes} classes, {len(self.alphabets)} alphabets "
            f"with >= {self.ways} classes{skipped}, feature {self.feature_shape}, "
            f"ways={self.ways}, shots={self.shots}, queries={self.queries}, drawers: "
            f"{self.support_drawers} support / {self.query_drawers} query of "
            f"{len(self.drawers)}{augment})"
        )


def within_alphabet_tasks(
    sampler: WithinAlphabetSampler,
    tasks_per_alphabet: int = 30,
    seed: int = 0,
    batch_size: int = 32,
) -> FixedTasks:
    """A fixed evaluation set with the same number of tasks in every alphabet.

    ``tasks_per_alphabet`` tasks in each of ``sampler.alphabets`` (alphabets with fewer
    than ``ways`` classes are skipped: see ``sampler.skipped_alphabets``), ordered alphabet
    by alphabet in ascending id order: tasks ``i·n .. (i+1)·n - 1`` are in
    ``sampler.alphabets[i]``. All drawn at once from ``torch.Generator().manual_seed(seed)``
    (on the CPU), so task ``i`` depends only on the data, the sampler's settings,
    ``tasks_per_alphabet`` and ``seed``, not on ``batch_size``. Returns the same lazy
    :class:`~functional_meta.data.FixedTasks` as :func:`~functional_meta.data.fixed_tasks`
    (which also works with this sampler, drawing each task's alphabet at random).

    The default, 30 tasks in each of the evaluation set's 20 alphabets, is 600 tasks.
    """
    where = "within_alphabet_tasks"
    if not isinstance(sampler, WithinAlphabetSampler):
        raise TypeError(
            f"{where}: sampler must be a WithinAlphabetSampler, got {type(sampler).__name__}"
        )
    tasks_per_alphabet = _check_count(tasks_per_alphabet, "tasks_per_alphabet", where)
    batch_size = _check_count(batch_size, "batch_size", where)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
    alphabets = torch.tensor(sampler.alphabets).repeat_interleave(tasks_per_alphabet)
    examples, classes = sampler.draw_in(alphabets, torch.Generator().manual_seed(seed))
    return FixedTasks(sampler, examples, classes, batch_size)
