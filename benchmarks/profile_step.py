"""Where the time of one meta-step goes: a torch.profiler operator breakdown.

    python benchmarks/profile_step.py                       # W1, ours, vmap
    python benchmarks/profile_step.py --workload W1 --impl ours --strategy loop
    python benchmarks/profile_step.py --workload W3 --impl plain --rows 15

One warm-up step (the gradient check's call), then one profiled step; prints the operators
sorted by self CPU time (and CUDA time on a GPU) and the total.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_lib import prepare, sync, workload
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--impl", default="ours")
    parser.add_argument("--strategy", default="vmap")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    w = workload(args.workload)
    prepared, _ = prepare(w, args.impl, args.strategy, args.device, args.chunk_size)
    prepared.step()  # warm-up
    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    sync(args.device)
    t0 = time.perf_counter()
    with profile(activities=activities, profile_memory=True) as prof:
        prepared.step()
        sync(args.device)
    wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=40)
    header = (
        f"{args.workload} {args.impl} {args.strategy}: one profiled step {wall * 1000:.0f} ms wall "
        f"(profiler overhead included), torch {torch.__version__}, {torch.get_num_threads()} threads\n"
        f"{w.describe()}\n"
    )
    print(header + table)
    if args.out:
        Path(args.out).write_text(header + table)


if __name__ == "__main__":
    main()
