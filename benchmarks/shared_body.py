"""Does a dense forward through the shared layers pay on this CPU? ANIL against MAML.

    python benchmarks/shared_body.py                      # Omniglot conv net, 5-way 1-shot
    python benchmarks/shared_body.py --meta-batch-size 16 --queries 2 --repeats 5

In ANIL only the head adapts, so every task runs its support and query images through the
same body: under ``vmap`` the body's convolutions see unbatched weights and run as one
dense call over all tasks' images (``T × (N·K + N·Q)`` of them), forward and backward (the
meta-gradient is that of the mean loss, so the body's weight gradient is one dense
backward too). The task loop runs the same arithmetic one task at a time. This script times
one meta-gradient (``record.grad``, process CPU time, one thread, median of ``--repeats``)
for ANIL and MAML under both strategies on the Omniglot conv net, and splits out the time
the convolutions themselves take (forward and backward, from ``torch.profiler``) so that a
difference can be told apart from batch norm and the rest. Random images: only the shapes
matter.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

from functional_meta import algorithms, models
from functional_meta.batching import Batching
from functional_meta.data.tasks import TaskBatch
from functional_meta.inner import InnerLoop
from functional_meta.model import functionalize

CONVOLUTIONS = ("aten::mkldnn_convolution", "aten::convolution_backward")


def tasks(args: argparse.Namespace, generator: torch.Generator) -> TaskBatch:
    """A meta-batch of random 28×28 images, ``--ways``-way 1-shot with ``--queries``."""
    t, n, q = args.meta_batch_size, args.ways, args.queries
    labels = torch.arange(n)
    return TaskBatch(
        torch.rand(t, n, 1, 28, 28, generator=generator),
        labels.expand(t, n).contiguous(),
        torch.rand(t, n * q, 1, 28, 28, generator=generator),
        labels.repeat_interleave(q).expand(t, n * q).contiguous(),
    )


def measure(algorithm: str, strategy: str, args: argparse.Namespace) -> tuple[float, float]:
    """``(median ms per meta-gradient, ms in convolutions in one profiled meta-gradient)``."""
    torch.manual_seed(0)
    apply, params, buffers = functionalize(models.conv4(args.ways))
    # The command line's Omniglot inner loop: one step at rate 0.4, second order.
    record = algorithms.build(algorithm, apply, F.cross_entropy, InnerLoop(lr=0.4, steps=1),
                              batching=Batching(strategy))  # fmt: skip
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
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONVOLUTIONS)
    return statistics.median(times), conv_us / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Omniglot conv net, {args.ways}-way 1-shot, {args.queries} queries, meta-batch "
          f"{args.meta_batch_size}, 1 thread, median of {args.repeats}\n")  # fmt: skip
    print("| algorithm | strategy | ms per meta-gradient | of which convolutions (profiled) |")
    print("|---|---|---|---|")
    for algorithm in ("anil", "maml"):
        for strategy in ("loop", "vmap"):
            step, conv = measure(algorithm, strategy, args)
            print(f"| {algorithm} | {strategy} | {step:.0f} | {conv:.0f} |", flush=True)


if __name__ == "__main__":
    main()
