"""Data-parallel MAML on sinusoids with your own loop, launched with torchrun.

    torchrun --standalone --nproc_per_node=2 examples/distributed_sinusoid.py --steps 200
    python examples/distributed_sinusoid.py --steps 200        # the same run, one process

Every rank draws the same meta-batch of ``--meta-batch`` tasks from one seeded stream and
keeps its slice; the meta-gradients and metrics are averaged with ``all_reduce``; every
rank applies the same Adam update. Any number of processes (dividing the meta-batch)
gives the same parameters as one process, to float rounding. Only rank 0 prints.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta import distributed


def main(ctx: distributed.Context, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    apply, params, buffers = fm.functionalize(fm.models.mlp((1, 40, 40, 1)))
    learner = fm.algorithms.maml(apply, F.mse_loss, fm.InnerLoop(lr=0.01, steps=1))
    optimizer = fm.optim.adam(1e-3)
    # Identical start everywhere (here the seed already ensures it; broadcast makes it so).
    state = distributed.broadcast(fm.init_state(learner, params, buffers, optimizer))
    stream = torch.Generator().manual_seed(args.seed)  # the SAME task stream on every rank

    def sample(num_tasks: int, generator: torch.Generator) -> fm.TaskBatch:
        return fm.data.sinusoid_tasks(num_tasks, 10, 10, generator=generator)

    if ctx.is_main:
        share = args.meta_batch // ctx.world_size
        print(
            f"{ctx.world_size} process(es), {ctx.backend or 'no process group'}: {share} tasks each"
        )
    for step in range(1, args.steps + 1):
        tasks = distributed.sample_shard(sample, args.meta_batch, stream)
        state, metrics = distributed.step(
            learner, state, tasks, optimizer, check_sync=args.check_sync
        )
        if ctx.is_main and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step:5d}  loss {metrics['loss']:.4f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--check-sync", action="store_true", help="verify identical parameters every step"
    )
    distributed.run(main, parser.parse_args())
