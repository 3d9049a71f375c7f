"""Peak memory and time per meta-step: iMAML against second-order MAML as inner steps grow.

    python benchmarks/imaml_memory.py                  # inner steps 1, 5, 20; about 1-2 minutes
    python benchmarks/imaml_memory.py --write docs/benchmarks_imaml.md   # and write the page
    python benchmarks/imaml_memory.py --steps 1 5 20 40 --tasks 4 --repeats 3

Workload: the Omniglot conv net (``models.conv4``, batch norm, 28×28 inputs, random pixels:
memory and time do not depend on the values), 5-way 1-shot with 15 queries per class,
meta-batch 4, the default strategy (a loop over tasks on the CPU), one thread, float32.
MAML differentiates through its inner steps; iMAML runs them first order and solves for
its meta-gradient with ``--cg-steps`` conjugate-gradient steps (λ = 1).

**Memory.** Each (algorithm, inner steps) runs in a fresh process (this script with
``--one``), with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor of 64 KiB or
more is its own mapping, returned to the system when freed. The process builds the model
and the tasks and runs one plain forward and backward of the conv net on a query set (so
that one-time kernel and thread-pool memory is resident), reads its resident set size,
then takes one meta-step; the peak is the process's high-water mark (``ru_maxrss``)
minus that baseline: what the meta-step adds at its peak. **Time** is the best of
``--repeats`` further meta-steps (meta-gradient and Adam update): the machine is shared, and
the fastest repeat is the one least slowed by other work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_lib import peak_rss_mb, rss_mb  # also puts the checkout on sys.path

import functional_meta as fm

ALGORITHMS = ("maml", "imaml")


def omniglot_like_tasks(num_tasks: int, ways: int = 5, shots: int = 1, queries: int = 15):
    g = torch.Generator().manual_seed(0)

    def draw(per_class: int):
        x = torch.rand(num_tasks, ways * per_class, 1, 28, 28, generator=g)
        y = torch.arange(ways).repeat_interleave(per_class).expand(num_tasks, -1).contiguous()
        return x, y

    return fm.TaskBatch(*draw(shots), *draw(queries))


def measure_one(algorithm_name: str, steps: int, tasks: int, repeats: int, cg_steps: int) -> dict:
    """One configuration in this process: peak memory of the first meta-step above the
    baseline, then the best time of ``repeats`` more."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = fm.models.conv4(5)
    apply, params, buffers = fm.functionalize(module)
    batch = omniglot_like_tasks(tasks)
    options = {"cg_steps": cg_steps, "regularization": 1.0} if algorithm_name == "imaml" else {}
    algorithm = fm.algorithms.build(algorithm_name, apply, F.cross_entropy,
                                    fm.InnerLoop(lr=0.1, steps=steps), **options)  # fmt: skip
    optimizer = fm.optim.adam(1e-3)
    state = fm.init_state(algorithm, params, buffers, optimizer)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    warm = F.cross_entropy(apply(leaves, buffers, batch.query_x[0]), batch.query_y[0])
    torch.autograd.grad(warm, list(leaves.values()))
    del leaves, warm
    baseline = rss_mb()
    state, _ = fm.step(algorithm, state, batch, optimizer)
    peak = peak_rss_mb() - baseline
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        state, _ = fm.step(algorithm, state, batch, optimizer)
        times.append(time.perf_counter() - started)
    return {"algorithm": algorithm_name, "steps": steps, "peak_mb": peak,
            "step_ms": 1000 * min(times)}  # fmt: skip


def run_one(name: str, steps: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, str(Path(__file__).resolve()), "--one", name, str(steps),
               "--tasks", str(args.tasks), "--repeats", str(args.repeats),
               "--cg-steps", str(args.cg_steps)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], steps: list[int]) -> str:
    by = {(r["algorithm"], r["steps"]): r for r in rows}
    lines = [
        "| inner steps | MAML peak MB | iMAML peak MB | MAML ms/step | iMAML ms/step | "
        "peak MAML / iMAML |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in steps:
        m, i = by[("maml", k)], by[("imaml", k)]
        lines.append(
            f"| {k} | {m['peak_mb']:.1f} | {i['peak_mb']:.1f} | {m['step_ms']:.0f} | "
            f"{i['step_ms']:.0f} | {m['peak_mb'] / i['peak_mb']:.2f} |"
        )
    first, last = steps[0], steps[-1]
    growth = {a: by[(a, last)]["peak_mb"] / by[(a, first)]["peak_mb"] for a in ALGORITHMS}
    lines.append("")
    lines.append(
        f"Peak memory from {first} to {last} inner steps: MAML ×{growth['maml']:.2f}, "
        f"iMAML ×{growth['imaml']:.2f}."
    )
    return "\n".join(lines)


def page(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    """The markdown page: how it was measured, on what, and the table."""
    import datetime

    from functional_meta.environment import code_version, describe_machine

    machine = describe_machine("cpu")
    command = "python benchmarks/imaml_memory.py " + " ".join(
        [f"--steps {' '.join(map(str, args.steps))}", f"--tasks {args.tasks}",
         f"--repeats {args.repeats}", f"--cg-steps {args.cg_steps}", f"--write {args.write}"]
    )  # fmt: skip
    paragraphs = __doc__.replace("``", "`").split("\n\n")[2:]
    method = "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)
    return "\n".join([
        "# iMAML against MAML: memory and time as inner steps grow",
        "",
        f"Generated by `{command}` on {datetime.datetime.now().isoformat(timespec='seconds')} "
        f"(wall time {seconds / 60:.1f} min). Do not edit by hand: rerun the script.",
        "",
        f"- Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs (shared with other "
        f"work: times are indicative), torch {machine['torch']}, Python {machine['python']}",
        f"- Code measured: {code_version()}",
        "",
        method,
        "",
        table(rows, args.steps),
        "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--tasks", type=int, default=4, help="meta-batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-steps per point")
    parser.add_argument("--cg-steps", type=int, default=5)
    parser.add_argument("--write", metavar="PAGE", help="also write the markdown page there")
    parser.add_argument("--one", nargs=2, metavar=("ALGORITHM", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, steps = args.one[0], int(args.one[1])
        print(json.dumps(measure_one(name, steps, args.tasks, args.repeats, args.cg_steps)))
        return
    rows, started = [], time.perf_counter()
    for steps in args.steps:
        for name in ALGORITHMS:
            rows.append(run_one(name, steps, args))
            row = rows[-1]
            print(f"{name:6} {steps:3} inner steps: peak +{row['peak_mb']:.1f} MB, "
                  f"{row['step_ms']:.0f} ms/step", file=sys.stderr, flush=True)  # fmt: skip
    print(table(rows, args.steps))
    if args.write:
        Path(args.write).write_text(page(rows, args, time.perf_counter() - started))


if __name__ == "__main__":
    main()
