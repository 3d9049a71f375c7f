"""The convolution floor of a meta-step: how fast could this CPU run its convolutions at best?

    python benchmarks/conv_floor.py                    # W1, 2 threads
    python benchmarks/conv_floor.py --workload W2 --threads 1 --out docs/conv_floor_W2.json

Records every convolution of one meta-gradient of the plain autograd task loop (forward,
backward and the convolutions of the double backward; the arithmetic is the same for every
implementation, vmap and the peers included), counts their FLOPs, and replays them:

- **as recorded**: each convolution alone, with its own shapes (5 and 75 images per task on
  W1): the conv time of a task loop without any of the rest of a step;
- **merged**: convolutions that differ only in their batch size merged into one call over
  the summed batch (every task's images in one dense convolution with shared weights, 2400
  query images on W1): the same FLOPs at the most efficient shape these kernels offer.

The merged time is a floor for any implementation that runs the same arithmetic on this
CPU's kernels: per-task weights cannot make a convolution cheaper than one dense call over
all the images. It prints the step times of the plain loop and of ours (``auto``) measured
in the same process, both floors, the achieved GFLOP/s, and step time / floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_lib import prepare, time_steps, workload
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten
CONVOLUTIONS = {aten.convolution.default, aten.convolution_backward.default}
# The arguments that carry the batch in their first dimension.
BATCHED = {aten.convolution.default: (0,), aten.convolution_backward.default: (0, 1)}


class ConvRecorder(TorchDispatchMode):
    """Remembers ``(op, args)`` of every convolution that runs under it (shapes only)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONVOLUTIONS:
            self.calls.append((func, tuple(_shape_of(a) for a in args)))
        return func(*args, **(kwargs or {}))


class Shape(tuple):
    """A tensor argument, recorded by its shape."""


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return Shape(value.shape)
    return tuple(value) if isinstance(value, list) else value


def _flops(func: Any, args: tuple) -> int:
    """FLOPs of one recorded call, by torch's own flop counter (run on meta tensors)."""
    materialised = [torch.empty(a, device="meta") if isinstance(a, Shape) else a for a in args]
    with FlopCounterMode(display=False) as counter:
        func(*materialised)
    return counter.get_total_flops()


def merge(calls: list[tuple[Any, tuple]]) -> list[tuple[Any, tuple]]:
    """Calls that differ only in the batch dimension of their batched arguments, merged into
    one call over the summed batch."""
    groups: dict[tuple, int] = defaultdict(int)
    for func, args in calls:
        key_args = tuple(
            Shape(a[1:]) if i in BATCHED[func] and isinstance(a, Shape) else a
            for i, a in enumerate(args)
        )
        groups[(func, key_args)] += args[BATCHED[func][0]][0]
    merged = []
    for (func, key_args), batch in groups.items():
        args = tuple(
            Shape((batch, *a)) if i in BATCHED[func] else a for i, a in enumerate(key_args)
        )
        merged.append((func, args))
    return merged


def replay_ms(calls: list[tuple[Any, tuple]], repeats: int) -> float:
    """Median over ``repeats`` of the milliseconds to run every call once (inputs made once)."""
    prepared: list[tuple[Callable, list]] = []
    for func, args in calls:
        real = [torch.randn(a) if isinstance(a, Shape) else a for a in args]
        prepared.append((func, real))
    for func, real in prepared:  # warm-up: kernels chosen, memory touched
        func(*real)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for func, real in prepared:
            func(*real)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_floor(w: Any, repeats: int) -> dict[str, Any]:
    """The convolutions of one meta-gradient of workload ``w`` (the plain autograd loop's):
    ``{"gflop", "calls", "merged_calls", "recorded_ms", "floor_ms"}``."""
    plain, _ = prepare(w, "plain", "loop", "cpu", 8)
    recorder = ConvRecorder()
    with recorder:
        plain.check_grads()
    calls = recorder.calls
    merged = merge(calls)
    gflop = sum(_flops(f, a) for f, a in calls) / 1e9
    assert abs(sum(_flops(f, a) for f, a in merged) / 1e9 - gflop) < 1e-6 * gflop
    return {
        "gflop": gflop,
        "calls": len(calls),
        "merged_calls": len(merged),
        "recorded_ms": replay_ms(calls, repeats),
        "floor_ms": replay_ms(merged, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, help="meta-batch size (default: the workload's)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w = workload(args.workload)
    if args.tasks:
        w = w.with_tasks(args.tasks)
    figures: dict[str, Any] = {"workload": args.workload, "threads": args.threads,
                               "torch": torch.__version__}  # fmt: skip
    figures |= measure_floor(w, args.repeats)
    gflop, floor = figures["gflop"], figures["floor_ms"]
    print(f"{args.workload}: {figures['calls']} convolution calls, {gflop:.1f} GFLOP per "
          f"meta-gradient; merged into {figures['merged_calls']} calls", flush=True)  # fmt: skip
    rows = {
        "convolutions as recorded": figures["recorded_ms"],
        "convolutions merged (floor)": floor,
    }
    for label, impl, strategy in (("plain loop step", "plain", "loop"),
                                  ("ours (auto) step", "ours", "auto")):  # fmt: skip
        prepared, _ = prepare(w, impl, strategy, "cpu", 8)
        rows[label] = figures[f"{impl}_ms"] = statistics.median(
            time_steps(prepared, "cpu", 1, args.repeats)
        )
    for label, ms in rows.items():
        print(f"  {label:30s} {ms:8.0f} ms  {gflop / ms * 1000:6.1f} GFLOP/s  "
              f"{ms / floor:5.2f}× the floor", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
