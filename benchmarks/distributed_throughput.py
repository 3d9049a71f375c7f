"""Data-parallel throughput: meta-steps per second with 1 and 2 processes (gloo on CPU).

    python benchmarks/distributed_throughput.py                  # S1 and S5, 1 and 2 processes
    python benchmarks/distributed_throughput.py --only S1 --steps 200
    python benchmarks/distributed_throughput.py --backend nccl --procs 1   # 1 GPU (nccl)
    python benchmarks/distributed_throughput.py --json out.json

Each configuration runs in fresh processes started with ``functional_meta.distributed.spawn``
(the same code path torchrun uses: ``distributed.step`` = vmapped meta-gradient of this
rank's share of the tasks, one ``all_reduce`` of the gradients, one of the metrics, the
optimizer update). Every rank draws the full meta-batch from the shared seeded stream and
keeps its slice, as in training. After ``--warmup`` steps the ranks meet at a barrier and
``--steps`` meta-steps are timed on rank 0 (to the closing barrier). A 1-process run joins
a process group of one, where the reduction is the identity: that is the plain
single-process step. ``threads`` is ``torch.set_num_threads`` per process; "1 × 2 threads"
gives one process both cores, the fair baseline for "2 × 1 thread" on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import functional_meta as fm  # noqa: E402
from functional_meta import distributed  # noqa: E402

WORKLOADS = {
    # name: (description, meta-batch, inner steps, support = query points)
    "S1": ("sinusoid MAML, MLP 1-40-40-1, 10-shot, meta-batch 32, 1 inner step", 32, 1, 10),
    "S5": ("sinusoid MAML, MLP 1-40-40-1, 10-shot, meta-batch 128, 5 inner steps", 128, 5, 10),
}


def rank_main(ctx, workload: str, warmup: int, steps: int, out: str) -> None:
    _, meta_batch, inner_steps, shots = WORKLOADS[workload]
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(fm.models.mlp((1, 40, 40, 1)))
    learner = fm.algorithms.maml(apply, F.mse_loss, fm.InnerLoop(lr=0.01, steps=inner_steps))
    optimizer = fm.optim.adam(1e-3)
    device = ctx.device
    params = {k: v.to(device) for k, v in params.items()}
    state = distributed.broadcast(fm.init_state(learner, params, buffers, optimizer))
    stream = torch.Generator().manual_seed(1)

    def sample(n, g):
        return fm.data.sinusoid_tasks(n, shots, shots, generator=g)

    def one_step(state):
        tasks = distributed.sample_shard(sample, meta_batch, stream).to(device)
        state, metrics = distributed.step(learner, state, tasks, optimizer)
        return state, metrics

    for _ in range(warmup):
        state, _ = one_step(state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = one_step(state)  # metrics are Python floats: each step synchronises
    dist.barrier()
    elapsed = time.perf_counter() - start
    if ctx.is_main:
        Path(out).write_text(
            json.dumps({"seconds": elapsed, "steps": steps, "loss": metrics["loss"]})
        )


def measure(workload, procs, threads, backend, warmup, steps) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        distributed.spawn(
            rank_main, procs, workload, warmup, steps, out, backend=backend, threads=threads
        )
        result = json.loads(Path(out).read_text())
    result.update(
        workload=workload,
        procs=procs,
        threads=threads,
        backend=backend,
        steps_per_second=result["steps"] / result["seconds"],
    )
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    rows = []
    for workload in args.only:
        for procs in args.procs:
            if args.backend == "nccl" and procs > torch.cuda.device_count():
                print(f"skip {workload} × {procs}: {torch.cuda.device_count()} GPU(s)")
                continue
            layouts = {1}
            if args.backend == "gloo":  # one process may use every core; each of N, cores/N
                layouts = {max(1, cores // procs)} | ({1} if procs == 1 else set())
            for threads in sorted(layouts):
                result = measure(workload, procs, threads, args.backend, args.warmup, args.steps)
                rows.append(result)
                print(
                    f"{workload} {procs} proc × {threads} thread(s) ({args.backend}): "
                    f"{result['steps_per_second']:.1f} meta-steps/s",
                    flush=True,
                )

    print(f"\n{platform.node()}: torch {torch.__version__}, {cores} CPU cores, {args.backend}")
    print(
        "| workload | processes × threads | meta-steps/s | vs 1 × 1 | vs 1 process, same threads |"
    )
    print("|---|---|---|---|---|")
    for row in rows:

        def ratio(procs, threads, row=row):
            base = [r for r in rows if r["workload"] == row["workload"] and
                    (r["procs"], r["threads"]) == (procs, threads)]  # fmt: skip
            return f"{row['steps_per_second'] / base[0]['steps_per_second']:.2f}×" if base else "—"

        print(
            f"| {row['workload']} | {row['procs']} × {row['threads']} | "
            f"{row['steps_per_second']:.1f} | {ratio(1, 1)} | "
            f"{ratio(1, row['procs'] * row['threads'])} |"
        )
    for name in args.only:
        print(f"\n{name}: {WORKLOADS[name][0]}", end="")
    print()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
