"""``torch.compile`` for strategy ``"compile"``, or eager where a function cannot be compiled.

For an algorithm whose record has an ``objective`` (a loss gradient), a whole meta-update
over the meta-batch is one graph: the gradient, the metrics and finite flags, and the
optimizer's step (:func:`functional_meta.steps.compiled_step`). Otherwise (chunks, MAML++,
iMAML, Reptile, a gradient averaged across processes) two things are compiled, each as
its own graph: a chunk's meta-gradient (:func:`functional_meta.batching.mean_value_and_grad`)
and the meta-update, the optimizer's step with its finiteness check
(:func:`functional_meta.steps.meta_update`). Updates are compiled whole (``fullgraph=True``)
or not at all: ``functional_meta.optim``'s transformations with constant learning rates
trace as one graph (their update count, a 0-d CPU tensor, is read inside it, so a growing
count does not recompile it), while ``cosine_decay``'s Python arithmetic on the count does
not trace, and such an update runs eagerly.

When compiling fails (an unsupported operator, no C++ compiler for the CPU backend, a
schedule), :func:`compiled_or_eager` warns once and runs that function eagerly from then on;
an error that the eager function raises too is the caller's and propagates as it would
without compile.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["compiled_or_eager"]

# What failed to compile, by the key it was run with: it runs eagerly from then on.
_COMPILE_FAILED: set[Hashable] = set()


def compiled_or_eager(
    fn: Callable[..., Any], key: Hashable, what: str, *args: Any, fullgraph: bool = False
) -> Any:
    """``fn(*args)`` through ``torch.compile`` (which caches by ``fn``'s code, so a fresh
    closure per call reuses the graph while the guards on what it closes over hold), or
    eagerly once compiling ``key`` has failed. ``what`` names the eager fallback in the
    warning (e.g. ``'eager "vmap" for this task loss'``)."""
    if key in _COMPILE_FAILED:
        return fn(*args)
    try:
        return _trampoline(torch.compile, fullgraph)(fn, *args)
    except Exception as error:
        result = fn(*args)  # an error of the caller's raises here, as without compile
        _COMPILE_FAILED.add(key)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f'strategy="compile": torch.compile failed ({type(error).__name__}: {first_line}); '
            f"running {what} from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        return result


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _call_whole(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


@functools.cache
def _trampoline(compile: Callable[..., Any], fullgraph: bool) -> Callable[..., Any]:
    """One compiled trampoline per ``fullgraph``, made on first use: ``torch.compile()``
    copies its configuration each time it is called (about 1 ms on a CPU), so a wrapper per
    meta-step would cost as much as a small model's compiled step. Dynamo traces into
    ``fn`` and reuses the graph while its guards hold; the two trampolines are different
    functions, so that the gradients' graphs and the updates' are cached apart. Keyed by
    ``torch.compile`` itself, so a replaced one (a test's) is used."""
    if fullgraph:
        return compile(_call_whole, fullgraph=True)
    return compile(_call)
