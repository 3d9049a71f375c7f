"""ANIL's shared body on the Omniglot conv net: run once per task, and batched densely?

    python benchmarks/shared_body.py                      # 5-way 1-shot, inner steps 1 and 5
    python benchmarks/shared_body.py --meta-batch-size 16 --queries 2 --inner-steps 1 3 10

In ANIL only the head adapts, so two savings are open to it:

- **once per task**: the body's output on the support set is the same at every inner step,
  so the record runs the body once per task and input and the inner loop on the head alone
  (``functional_meta.body_and_head``); the row ``anil (whole model)`` is the same
  algorithm running the whole model at every inner step, as ANIL did before;
- **dense across tasks**: every task runs the same body, so under ``vmap`` its
  convolutions see unbatched weights and run as one call over all tasks' images, forward
  and backward (the meta-gradient is that of the mean loss).

Times one meta-gradient (``record.grad``, second order, inner rate 0.4; process CPU time,
one thread, median of ``--repeats``) under the task loop and ``vmap``, with MAML beside
it, and the share of the step's operator time spent in convolutions (forward and
backward, ``torch.profiler``).
Random images: only the shapes matter.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.profiler import profile

from functional_meta import algorithms, models
from functional_meta.algorithms.maml import gradient_based
from functional_meta.batching import Batching
from functional_meta.data.tasks import TaskBatch
from functional_meta.inner import InnerLoop
from functional_meta.model import functionalize
from functional_meta.steps import Algorithm

WHOLE = "anil (whole model)"
ROWS = (("anil", "loop"), (WHOLE, "loop"), ("anil", "vmap"), ("maml", "loop"), ("maml", "vmap"))
CONVOLUTIONS = ("aten::mkldnn_convolution", "aten::convolution_backward")


def tasks(args: argparse.Namespace, generator: torch.Generator) -> TaskBatch:
    """A meta-batch of random 28×28 images, 5-way 1-shot with ``--queries``."""
    t, n, q = args.meta_batch_size, 5, args.queries
    labels = torch.arange(n)
    return TaskBatch(
        torch.rand(t, n, 1, 28, 28, generator=generator),
        labels.expand(t, n).contiguous(),
        torch.rand(t, n * q, 1, 28, 28, generator=generator),
        labels.repeat_interleave(q).expand(t, n * q).contiguous(),
    )


def record_for(name: str, steps: int, strategy: str) -> tuple[Algorithm, dict, dict]:
    """``(record, params, buffers)``: ``name`` is an algorithm of the registry, or ``anil
    (whole model)``, ANIL with the whole model run at every inner step."""
    torch.manual_seed(0)
    apply, params, buffers = functionalize(models.conv4(5))
    inner, batching = InnerLoop(lr=0.4, steps=steps), Batching(strategy)
    if name == WHOLE:
        inner = replace(inner, adapted=lambda key: key.startswith("head."))
        return gradient_based("anil", apply, F.cross_entropy, inner, batching), params, buffers
    return algorithms.build(name, apply, F.cross_entropy, inner, batching=batching), params, buffers


def measure(name: str, steps: int, strategy: str, args: argparse.Namespace) -> tuple[float, float]:
    """``(median ms per meta-gradient, share of one profiled meta-gradient's operator time
    spent in convolutions)`` (a share, so that the load of a shared machine cancels)."""
    record, params, buffers = record_for(name, steps, strategy)
    meta_params, buffers = record.init(params, buffers)
    batch = tasks(args, torch.Generator().manual_seed(0))

    def grad() -> None:
        record.grad(meta_params, buffers, batch)

    grad()  # warm-up (first-call checks)
    times = []
    for _ in range(args.repeats):
        start = time.process_time()
        grad()
        times.append(1000 * (time.process_time() - start))
    with profile() as prof:
        grad()
    events = prof.key_averages()
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONVOLUTIONS)
    return statistics.median(times), conv / sum(e.self_cpu_time_total for e in events)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Omniglot conv net, 5-way 1-shot, {args.queries} queries, meta-batch "
          f"{args.meta_batch_size}, 1 thread, median of {args.repeats}\n")  # fmt: skip
    print("| inner steps | algorithm | strategy | ms per meta-gradient | share in convolutions |")
    print("|---|---|---|---|---|")
    for steps in args.inner_steps:
        for name, strategy in ROWS:
            step, conv = measure(name, steps, strategy, args)
            print(f"| {steps} | {name} | {strategy} | {step:.0f} | {conv:.0%} |", flush=True)


if __name__ == "__main__":
    main()
