"""Small models' per-step overhead and the batched path's memory (issue 17, items 1 and 3).

    python benchmarks/step_overhead.py                    # speed (W3) and memory (W1)
    python benchmarks/step_overhead.py --part speed --rounds 40
    python benchmarks/step_overhead.py --part memory
    python benchmarks/step_overhead.py --write docs/benchmarks.md   # also update that page

**Speed (W3).** In one process, interleaved round by round (each round runs every
implementation for ``--steps`` timed steps, in a rotating order, so that the machine's load
falls on all of them alike): our eager ``maml_step`` (vmap) and ``fm.step`` with an
algorithm record, TorchOpt's and higher's meta-step, and ``strategy="compile"``: its
``maml_step`` (update included) against its compiled meta-gradient alone
(``batching.mean_value_and_grad``, the compiled core and nothing else). Reported: medians
over all timed steps and the ratios, plus the operator calls (``aten::`` events under
``torch.profiler``) of one eager step and one eager meta-gradient.

**Memory (W1).** Each strategy in a fresh subprocess, two meta-steps, peak resident
memory (``VmHWM``): the loop, vmap with the whole meta-batch, and vmap with
``chunk_size="auto"`` (the chunk the library picks; printed).

``--write PAGE`` replaces the section between ``<!-- step_overhead -->`` markers in PAGE
(``benchmarks/vmap_vs_loop.py`` keeps that section when it regenerates the page).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_lib import OUTER_LR, Contention, make_module, make_tasks, peak_rss_mb, prepare, workload
from torch.profiler import ProfilerActivity, profile

import functional_meta as fm
from functional_meta.batching import mean_value_and_grad
from functional_meta.losses import maml_loss

BEGIN, END = "<!-- step_overhead -->", "<!-- /step_overhead -->"


def _ours_record(w: Any, tasks: fm.TaskBatch) -> Any:
    """``fm.step`` with an algorithm record built once (as ``fit`` does)."""
    apply, params, buffers = fm.functionalize(make_module(w))
    optimizer = fm.optim.adam(OUTER_LR)
    inner = fm.InnerLoop(lr=w.inner_lr, steps=w.inner_steps)
    algorithm = fm.algorithms.maml(apply, w.loss, inner, batching=fm.Batching("vmap"))
    state = [fm.init_state(algorithm, params, buffers, optimizer)]

    def step() -> None:
        state[0], _ = fm.step(algorithm, state[0], tasks, optimizer)

    return step


def _core(w: Any, tasks: fm.TaskBatch, strategy: str) -> Any:
    """The meta-gradient alone (``batching.mean_value_and_grad``): no checks, no metrics,
    no update."""
    apply, params, buffers = fm.functionalize(make_module(w))
    inner = fm.InnerLoop(lr=w.inner_lr, steps=w.inner_steps)
    meta = {"params": params}

    def task_loss(m: Any, task: Any) -> Any:
        return maml_loss(m["params"], task, apply=apply, buffers=buffers, loss=w.loss, inner=inner)

    return lambda: mean_value_and_grad(task_loss, meta, tasks, fm.Batching(strategy))


def _fused_adam(leaves: list[torch.Tensor]) -> Any:
    """Adam at ``OUTER_LR`` as fused ``_foreach`` kernels updating ``leaves`` in place:
    ``update(grads)``. The floors' outer step (no checks)."""
    mu, nu = [torch.zeros_like(p) for p in leaves], [torch.zeros_like(p) for p in leaves]
    count = [0]

    def update(grads: tuple[torch.Tensor, ...]) -> None:
        count[0] += 1
        with torch.no_grad():
            torch._foreach_lerp_(mu, grads, 0.1)
            torch._foreach_mul_(nu, 0.999)
            torch._foreach_addcmul_(nu, grads, grads, value=0.001)
            denominator = torch._foreach_add(
                torch._foreach_div(torch._foreach_sqrt(nu), (1 - 0.999 ** count[0]) ** 0.5), 1e-8
            )
            torch._foreach_addcdiv_(
                leaves, mu, denominator, value=-OUTER_LR / (1 - 0.9 ** count[0])
            )

    return update


def _floor_step(
    w: Any, tasks: fm.TaskBatch, losses: Any, leaves: list[torch.Tensor]
) -> tuple[Any, list[torch.Tensor]]:
    """A second-order MAML step over every task at once, both derivatives by
    ``torch.autograd.grad`` (no ``torch.func`` transform around them) on the meta-parameters
    ``leaves`` stacked per task, then fused Adam; no check or metric. ``losses(weights, x,
    y) -> [T]`` is the per-task loss of stacked ``[T, ...]`` weights. Returns ``(step,
    leaves)``, the parameters it updates in place."""
    support_x, support_y, query_x, query_y = tasks.tensors()
    adam = _fused_adam(leaves)

    def step() -> None:
        theta = [p.requires_grad_() for p in leaves]
        stacked = [p.expand(len(tasks), *p.shape) for p in theta]
        inner = torch.autograd.grad(
            losses(stacked, support_x, support_y).sum(), stacked, create_graph=True
        )
        adapted = [p - w.inner_lr * g for p, g in zip(stacked, inner, strict=True)]
        adam(torch.autograd.grad(losses(adapted, query_x, query_y).mean(), theta))
        for p in leaves:
            p.requires_grad_(False)

    return step, leaves


def _hand_written(w: Any, tasks: fm.TaskBatch) -> tuple[Any, list[torch.Tensor]]:
    """The eager floor for W3: :func:`_floor_step` with the MLP written by hand,
    ``torch.baddbmm`` over the stacked per-task weights. The fewest operator calls eager
    PyTorch needs for this step, for this one model."""
    _, params, _ = fm.functionalize(make_module(w))

    def losses(weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2, w3, b3 = weights  # [T, out, in] and [T, out]
        h = torch.relu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
        h = torch.relu(torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)))
        out = torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2))
        return ((out - y) ** 2).mean(dim=(1, 2))  # [T]

    return _floor_step(w, tasks, losses, [p.detach().clone() for p in params.values()])


def _any_model_floor(w: Any, tasks: fm.TaskBatch) -> tuple[Any, list[torch.Tensor]]:
    """The eager floor of a library that takes any model: :func:`_floor_step` with the
    module run through ``functional_call`` (``fm.functionalize``'s ``apply``) under one
    ``vmap`` over the stacked weights, the forward alone batched (no ``torch.func.grad``
    level inside it)."""
    apply, params, buffers = fm.functionalize(make_module(w))
    names = list(params)

    def one(weights: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> Any:
        return w.loss(apply(dict(zip(names, weights, strict=True)), buffers, x), y)

    def losses(weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(one)(tuple(weights), x, y)

    return _floor_step(w, tasks, losses, [p.detach().clone() for p in params.values()])


def _grad(prepared: Any) -> Any:
    """``maml_grad`` (checks and metrics, no update) of a prepared ``ours``."""
    return prepared.check_grads


def op_calls(fn: Any) -> int:
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def speed(args: argparse.Namespace) -> dict[str, Any]:
    w = workload("W3")
    tasks, _ = make_tasks(w, "cpu")
    ours = prepare(w, "ours", "vmap", "cpu", 8)[0]
    impls: dict[str, Any] = {
        "ours maml_step (vmap)": ours.step,
        "ours fm.step (record)": _ours_record(w, tasks),
        "ours maml_grad (no update)": _grad(prepare(w, "ours", "vmap", "cpu", 8)[0]),
        "ours meta-gradient core alone": _core(w, tasks, "vmap"),
        "hand-written batched step (eager floor)": _hand_written(w, tasks)[0],
        "any-model batched step (eager floor)": _any_model_floor(w, tasks)[0],
        "torchopt": prepare(w, "torchopt", "-", "cpu", 8)[0].step,
        "higher": prepare(w, "higher", "-", "cpu", 8)[0].step,
    }
    if not args.no_compile:
        compiled = prepare(w, "compile", "compile", "cpu", 8)[0]
        impls["compile maml_step"] = compiled.step
        impls["compile maml_grad (no update)"] = _grad(compiled)
        impls["compile meta-gradient core alone"] = _core(w, tasks, "compile")
    counts = {"maml_step": op_calls(ours.step), "maml_grad": op_calls(ours.check_grads)}
    for fn in impls.values():  # warm-up (compiles)
        for _ in range(3):
            fn()
    load0 = os.getloadavg()[0]
    with Contention() as contention:
        med = interleaved(impls, args.rounds, args.steps)
        # The compiled ratio again with the pair alone, no peer sharing the caches between
        # their calls.
        pair = ("compile maml_step", "compile meta-gradient core alone")
        alone = (
            {}
            if args.no_compile
            else interleaved({k: impls[k] for k in pair}, args.rounds, args.steps)
        )
    return {
        "median_ms": med,
        "compiled_pair_alone_ms": alone,
        "n": {k: args.rounds * args.steps for k in impls},
        "op_calls": counts,
        "load": [load0, os.getloadavg()[0]],
        "others_cpu": contention.others,
        "threads": torch.get_num_threads(),
    }


def interleaved(impls: dict[str, Any], rounds: int, steps: int) -> dict[str, float]:
    """Median ms per call of each of ``impls``, timed ``steps`` calls at a time over
    ``rounds`` rounds in a rotating order (the machine's load falls on all alike)."""
    times: dict[str, list[float]] = {k: [] for k in impls}
    names = list(impls)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(steps):
                t0 = time.perf_counter()
                impls[k]()
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def rss_child(strategy: str, chunk: str) -> None:
    w = workload("W1")
    tasks, _ = make_tasks(w, "cpu")
    apply, params, buffers = fm.functionalize(make_module(w))
    size = None if chunk == "none" else ("auto" if chunk == "auto" else int(chunk))
    batching = fm.Batching(strategy, size)
    optimizer = fm.optim.adam(OUTER_LR)
    inner = fm.InnerLoop(lr=w.inner_lr, steps=w.inner_steps)
    state = optimizer.init(params)
    chosen: list[int] = []
    choose = fm.batching.auto_chunk_size

    def recorded(*args: Any) -> int:  # the chunk the library picks
        chosen.append(choose(*args))
        return chosen[-1]

    fm.batching.auto_chunk_size = recorded
    base = high_water_mb()
    t0 = time.perf_counter()
    for _ in range(2):
        params, state, _ = fm.maml_step(params, state, tasks, optimizer=optimizer, apply=apply,
                                        buffers=buffers, loss=w.loss, inner=inner,
                                        batching=batching)  # fmt: skip
    print(json.dumps({"peak_mb": high_water_mb(), "before_mb": base,
                      "chunk": chosen[-1] if chosen else size,
                      "ms_per_step": (time.perf_counter() - t0) * 500}))  # fmt: skip


def high_water_mb() -> float:
    """This process's peak resident memory since it started its program (``VmHWM``).
    Unlike ``ru_maxrss``, which Linux carries across ``exec`` from the forked parent (a
    benchmark process that has run the peers is larger than any child's workload), it
    counts the child's own memory only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()


def memory(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    runs = [("loop", "loop", "none"), ("vmap (whole batch)", "vmap", "none")]
    runs += [(f"vmap, chunk_size={c}", "vmap", str(c)) for c in args.chunks]
    runs += [('vmap, chunk_size="auto"', "vmap", "auto")]
    for label, strategy, chunk in runs:
        cmd = [sys.executable, __file__, "--rss-child", strategy, chunk]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(label, out[label], flush=True)
    return out


def section(results: list[dict[str, Any]], command: str) -> str:
    """The page section: each run's speed block (a ``--before`` run first), then the
    memory table of the last run that measured it."""
    lines = [BEGIN, "", "## Small models: per-step overhead", ""]
    lines.append(
        f"Written by `{shown(command)}`. W3 ({workload('W3').describe()}), one process per run, "
        "implementations interleaved round by round (so the machine's load falls on all of "
        "them alike), medians; the machine is shared, so ratios within a run, not absolute "
        "times, carry."
    )
    for result in results:
        if result.get("speed"):
            lines += ["", f"### {result['label']}", "", *speed_lines(result)]
    with_memory = [r for r in results if r.get("memory")]
    if with_memory:
        lines += memory_lines(with_memory[-1]["memory"])
    lines += ["", END]
    return "\n".join(lines)


def shown(command: str) -> str:
    """``command`` without its file arguments (``--json``, ``--before``): those files are
    the measuring machine's, not the project's."""
    words, kept = shlex.split(command), []
    for i, word in enumerate(words):
        if word in ("--json", "--before") or (i and words[i - 1] in ("--json", "--before")):
            continue
        kept.append(word)
    return shlex.join(kept)


def speed_lines(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    s = result.get("speed")
    if s:
        m = s["median_ms"]
        ours, rec = m["ours maml_step (vmap)"], m["ours fm.step (record)"]
        lines += [
            f"`{shown(result['command'])}`: {s['threads']} thread(s), medians over "
            f"{min(s['n'].values())}+ steps each. Load average {s['load'][0]:.1f} → "
            f"{s['load'][1]:.1f} on 2 CPUs; other processes used {100 * s['others_cpu']:.0f}% "
            "of the CPUs meanwhile.",
            "",
            "| implementation | ms/step (median) | TorchOpt / this | higher / this |",
            "|---|---|---|---|",
        ]
        for k, v in m.items():
            lines.append(f"| {k} | {v:.2f} | {m['torchopt'] / v:.2f} | {m['higher'] / v:.2f} |")
        lines += [
            "",
            f"Operator calls (`aten::` events under torch.profiler): eager `maml_step` "
            f"{s['op_calls']['maml_step']}, eager `maml_grad` {s['op_calls']['maml_grad']}.",
        ]
        if "compile maml_step" in m:
            step = m["compile maml_step"]
            core = m.get("compile meta-gradient core alone", m.get("compile meta-gradient alone"))
            grad = m.get("compile maml_grad (no update)")
            of_grad = (
                f", **{step / grad:.2f}×** its `maml_grad` (checks and metrics)" if grad else ""
            )
            pair = s.get("compiled_pair_alone_ms") or {}
            alone = (
                f" Timed again as a pair alone (interleaved with each other only): "
                f"{pair['compile maml_step']:.2f} against "
                f"{pair['compile meta-gradient core alone']:.2f} ms, "
                f"**{pair['compile maml_step'] / pair['compile meta-gradient core alone']:.2f}×**."
                if pair
                else ""
            )
            lines += [
                "",
                f'`strategy="compile"`: `maml_step` (checks, metrics, Adam update and its '
                f"finite check) takes **{step / core:.2f}×** its compiled meta-gradient core "
                f"alone{of_grad}.{alone}",
            ]
        core = m.get("ours meta-gradient core alone")
        floor = (
            f" The eager meta-gradient core alone (no checks, metrics or update) is TorchOpt / "
            f"{m['torchopt'] / core:.1f}× and higher / {m['higher'] / core:.1f}×: no per-step "
            "overhead removed can take the eager step past that."
            if core
            else ""
        )
        hand = m.get("hand-written batched step (eager floor)")
        if hand:
            floor += (
                f" The step written by hand for this MLP (fewest eager operators, no checks) "
                f"is TorchOpt / {m['torchopt'] / hand:.1f}×, ours {ours / hand:.2f}× its time."
            )
        generic = m.get("any-model batched step (eager floor)")
        if generic:
            floor += (
                f" The same step for any model (its module through `functional_call` under one "
                f"`vmap`, both derivatives by `torch.autograd`, no checks) is TorchOpt / "
                f"{m['torchopt'] / generic:.1f}×, ours {ours / generic:.2f}× its time."
            )
        lines += [
            "",
            f"Eager: TorchOpt / ours = **{m['torchopt'] / ours:.1f}×** (`maml_step`), "
            f"{m['torchopt'] / rec:.1f}× (`fm.step`); higher / ours = "
            f"**{m['higher'] / ours:.1f}×**, {m['higher'] / rec:.1f}×.{floor}",
        ]
    return lines


def memory_lines(mem: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if mem:
        loop = mem["loop"]["peak_mb"]
        lines += [
            "",
            "### Peak memory of the batched path (W1, meta-batch 32)",
            "",
            "Each in a fresh subprocess, two `maml_step`s, peak resident memory (`VmHWM`, "
            f"includes the interpreter, torch and the data: {mem['loop']['before_mb']:.0f} MB "
            "before the first step):",
            "",
            "| strategy | chunk | peak RSS MB | / loop | ms per step |",
            "|---|---|---|---|---|",
        ]
        for k, v in mem.items():
            lines.append(
                f"| {k} | {v['chunk'] or 'all'} | {v['peak_mb']:.0f} | "
                f"{v['peak_mb'] / loop:.2f} | {v['ms_per_step']:.0f} |"
            )
    return lines


def write(page: Path, text: str) -> None:
    old = page.read_text()
    if BEGIN in old:
        head, _, rest = old.partition(BEGIN)
        new = head + text + rest.partition(END)[2]
    else:
        head, sep, tail = old.partition("## Reproducing")
        new = head + text + "\n\n" + sep + tail if sep else old.rstrip() + "\n\n" + text + "\n"
    page.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("all", "speed", "memory"), default="all")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--chunks", type=int, nargs="*", default=[], help="fixed chunk sizes too")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--write", help="replace the section in this Markdown page")
    parser.add_argument("--from-json", help="only render a section from earlier results")
    parser.add_argument("--before", help="an earlier run's --json (e.g. of main), shown first")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    command = "python benchmarks/step_overhead.py " + shlex.join(sys.argv[1:])
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        result = {"label": args.label, "command": command}
        if args.part in ("all", "speed"):
            result["speed"] = speed(args)
        if args.part in ("all", "memory"):
            result["memory"] = memory(args)
    earlier = [json.loads(Path(args.before).read_text())] if args.before else []
    text = section([*earlier, result], result.get("command", command))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.write:
        write(Path(args.write), text)


if __name__ == "__main__":
    main()
