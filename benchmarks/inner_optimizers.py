"""Time per meta-step of second-order MAML with inner SGD, SGD with momentum and Adam.

    python benchmarks/inner_optimizers.py                  # sinusoid MLP, meta-batch 25, 5 steps
    python benchmarks/inner_optimizers.py --rounds 200 --threads 2

The MAML paper's sinusoid MLP (1-40-40-1), ``vmap`` over a meta-batch of 25 tasks, 5 inner
steps, one full ``fm.step`` (meta-gradient and outer Adam update) per round. The three inner
updates take turns on the same task batches in one process, so a loaded machine slows all
of them alike; it prints each one's median and its ratio to plain SGD.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta.data import sinusoid_tasks

INNER = {
    "sgd": lambda lr, steps: fm.InnerLoop(lr=lr, steps=steps),
    "momentum": lambda lr, steps: fm.InnerLoop(
        steps=steps, optimizer=fm.optim.sgd(lr, momentum=0.9)
    ),
    "adam": lambda lr, steps: fm.InnerLoop(steps=steps, optimizer=fm.optim.adam(lr)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=80, help="timed steps per inner update")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="inner steps")
    parser.add_argument("--meta-batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(fm.models.mlp((1, 40, 40, 1)))
    outer = fm.optim.adam(1e-3)
    records, states, times = {}, {}, {}
    for name, make in INNER.items():
        records[name] = fm.algorithms.maml(apply, F.mse_loss, make(0.01, args.steps),
                                           batching=fm.Batching("vmap"))  # fmt: skip
        states[name] = fm.init_state(records[name], params, buffers, outer)
        times[name] = []
    generator = torch.Generator().manual_seed(0)
    batches = [sinusoid_tasks(args.meta_batch_size, generator=generator) for _ in range(8)]
    for round_ in range(args.warmup + args.rounds):
        for name in INNER:  # interleaved: the same batch, one after another
            started = time.perf_counter()
            states[name], _ = fm.step(records[name], states[name], batches[round_ % 8], outer)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["sgd"])
    print(f"MAML, sinusoid MLP, meta-batch {args.meta_batch_size}, {args.steps} inner steps, "
          f"vmap, {args.threads} thread(s), {args.rounds} rounds")  # fmt: skip
    for name in INNER:
        median = statistics.median(times[name])
        print(
            f"  inner {name:8s} {1000 * median:7.2f} ms per meta-step  ({median / base:.2f}x sgd)"
        )


if __name__ == "__main__":
    main()
