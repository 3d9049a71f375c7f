"""vmap against looped tasks, and against learn2learn, higher and TorchOpt, in one run.

    python benchmarks/vmap_vs_loop.py                 # full default run (writes docs/benchmarks.md)
    python benchmarks/vmap_vs_loop.py --quick         # a few minutes, writes benchmarks/results/
    python benchmarks/vmap_vs_loop.py --only W3 W1    # some workloads (W1 W2 W3 W4 R1 R3 S1 S3 sweep sampling floor)
    python benchmarks/vmap_vs_loop.py --device cuda   # same on a GPU (clocks read after synchronising)
    python benchmarks/vmap_vs_loop.py --malloc both   # each measurement with default and tuned glibc malloc

Every (workload, implementation, strategy) is measured in a fresh subprocess (this script
re-invoked with ``--one``), so that each peak RSS (``ru_maxrss``, monotone per process) is
that measurement's own. Inside it: build the model and the batch, take the meta-gradient at
the initial parameters and compare it with the workload's reference (the plain autograd
loop's, computed by the first measurement of the workload and cached for the run), then
time ``--repeats`` full meta-steps after the warm-up. A peer whose gradient differs is not
timed. Output: a table on stdout, JSON and Markdown files, and a headline snippet.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
ORDER = [
    "plain",
    "ours:loop",
    "ours:vmap",
    "ours:chunked",
    "ours:auto",
    "compile",
    "higher",
    "learn2learn",
    "torchopt",
]
SWEEP = (1, 4, 16, 32, 64)


# --------------------------------------------------------------------------- the plan


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The measurements, in order (the plain loop first in each workload: it is the reference)."""
    from bench_lib import Job

    jobs: list[Job] = []
    quick, c = args.quick, args.chunk_size
    budget = args.budget or (6.0 if quick else 40.0)

    def cost(name: str) -> tuple[int, int]:  # (warm-up, repeats) by workload weight
        if args.repeats:
            return (0 if name[1] != "3" else 3), args.repeats
        if name.startswith(("W3", "R3", "S3")):
            return (2, 8) if quick else (3, 20)
        if name.startswith("W2") or "@T=64" in name or name[0] in "RS":
            return 0, 2
        return 0, 2 if quick else 3

    def add(name: str, impls: list[str], tasks: int | None = None) -> None:
        for spec in impls:
            impl, _, strategy = spec.partition(":")
            if strategy == "chunked" and tasks is not None and tasks <= c:
                continue  # one chunk: the same as vmap
            warmup, repeats = cost(name)
            jobs.append(Job(name, impl, strategy or "-", c, warmup, repeats, args.device, budget))

    ours = ["ours:loop", "ours:vmap", "ours:chunked", "ours:auto"]
    peers = ["higher", "learn2learn", "torchopt"]
    selected = set(args.only or [])

    def want(key: str) -> bool:
        return not selected or key in selected

    if quick:
        # W3 in full; the conv workloads at meta-batch 4 (stated in the table).
        if want("W3"):
            add("W3", ["plain", *ours, *peers])
        if want("W1"):
            add("W1@T=4", ["plain", *ours[:2], *peers], 4)
        if want("R3"):
            add("R3", ["plain", *ours[:2]])
        if want("S3"):
            add("S3", ["plain", *ours[:2]])
        if want("sampling"):
            jobs.append(Job("sampling", "sampling", "-", c, 0, 10, args.device))
        return jobs
    if want("W3"):
        add("W3", ["plain", *ours, *peers] + (["compile"] if not args.no_compile else []))
    for name in ("W1", "W2"):
        if want(name):
            add(name, ["plain", *ours, *peers] + (["compile"] if args.compile_conv else []), 32)
    if want("W4"):
        add("W4", ["plain", *ours, "learn2learn"], 32)
    for name in ("R3", "S3"):
        if want(name):
            add(name, ["plain", *ours])
    for name in ("R1", "S1"):
        if want(name):
            add(name, ["plain", "ours:loop", "ours:vmap", "ours:auto"], 32)
    if want("sweep"):
        for base in ("W3", "W1"):
            for t in SWEEP:
                if base == "W1" and t == 32:
                    continue  # that is W1 itself
                add(f"{base}@T={t}", ours[:3] if t == 64 else ours[:2], t)
    for key in sorted(k for k in selected if "@T=" in k):  # one sweep point, e.g. W1@T=64
        add(key, ours if key.endswith("@T=64") else ours[:2], int(key.split("@T=")[1]))
    if want("sampling"):
        jobs.append(Job("sampling", "sampling", "-", c, 0, 20, args.device))
    if want("profile"):
        jobs.append(Job("W1", "profile", "vmap", c, 0, 1, args.device))
    if want("floor") and args.device == "cpu":
        for name in ("W1", "W2", "R1"):
            jobs.append(Job(name, "floor", "-", c, 0, 5, args.device))
    return jobs


# --------------------------------------------------------------------------- one measurement


def sampling_job(job: Any) -> dict[str, Any]:
    """Time drawing the W1 meta-batch (32 tasks of Omniglot 5-way 1-shot, 15 queries) from an
    Omniglot-sized image set (964 classes × 20 drawings × 4 rotations, random pixels)."""
    import torch
    from bench_lib import peak_rss_mb, summary, sync

    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"job": job.to_dict(), "threads": torch.get_num_threads()}
    try:
        from functional_meta.data.fewshot import ROT90, FewShotSampler

        images = torch.rand(964, 20, 1, 28, 28, generator=gen).to(job.device)
        sampler = FewShotSampler(images, ways=5, shots=1, queries=15, augment=ROT90)

        def draw() -> Any:
            return sampler.sample(32, gen)

        out["data"] = "FewShotSampler(964×20 images, ROT90).sample(32)"
    except ImportError:

        def draw() -> Any:
            return [torch.rand(32, n, 1, 28, 28, generator=gen) for n in (5, 75)]

        out["data"] = "torch.rand of the W1 shapes (functional_meta.data.fewshot not available)"
    draw()
    times = []
    for _ in range(job.repeats):
        t0 = time.perf_counter()
        draw()
        sync(job.device)
        times.append((time.perf_counter() - t0) * 1000)
    stats = summary(times)
    out.update(status="ok", times_ms=times, peak_rss_mb=peak_rss_mb())
    out.update({f"{k}_ms" if k != "n" else "n": v for k, v in stats.items()})
    return out


def profile_job(job: Any) -> dict[str, Any]:
    """One ours-vmap step of the workload under torch.profiler: the top operators."""
    import torch
    from bench_lib import prepare, sync, workload
    from torch.profiler import ProfilerActivity, profile

    prepared, _ = prepare(workload(job.workload), "ours", "vmap", job.device, job.chunk)
    prepared.step()
    sync(job.device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prepared.step()
        sync(job.device)
    averages = list(prof.key_averages())
    events = [e for e in averages if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in averages) / 1000
    events.sort(key=lambda e: -e.self_cpu_time_total)
    ops = [
        {
            "name": e.key,
            "self_ms": e.self_cpu_time_total / 1000,
            "pct": 100 * e.self_cpu_time_total / 1000 / total,
            "calls": e.count,
        }
        for e in events[:12]
    ]
    kinds = {
        "elementwise (mul/add/sub/div/neg/copy/...)": (
            "mul",
            "add",
            "sub",
            "div",
            "neg",
            "copy_",
            "fill_",
            "threshold_backward",
            "clamp_min",
            "rsqrt",
            "pow",
            "sqrt",
            "where",
            "mean",
        ),
        "reductions (sum)": ("sum",),
        "convolution fwd+bwd": (
            "convolution_backward",
            "mkldnn_convolution",
            "_slow_conv2d_forward",
            "_slow_conv2d_backward",
            "_convolution",
            "convolution",
            "conv2d",
        ),
        "matmul (mm/bmm/addmm)": ("mm", "bmm", "addmm"),
    }
    groups = {}
    for label, names in kinds.items():
        ms = sum(e.self_cpu_time_total for e in events if e.key[len("aten::") :] in names) / 1000
        groups[label] = 100 * ms / total
    return {
        "job": job.to_dict(),
        "status": "ok",
        "threads": torch.get_num_threads(),
        "total_ms": total,
        "ops": ops,
        "groups": groups,
    }


def floor_job(job: Any) -> dict[str, Any]:
    """The workload's convolutions replayed alone and merged into dense calls
    (``benchmarks/conv_floor.py``): its FLOPs and this CPU's floor time for them."""
    import torch
    from bench_lib import Contention, workload
    from conv_floor import measure_floor

    out = {"job": job.to_dict(), "status": "ok", "threads": torch.get_num_threads()}
    with Contention() as watch:
        out.update(measure_floor(workload(job.workload), job.repeats))
    out["others_cpu"] = watch.others
    return out


def one(args: argparse.Namespace) -> None:
    """Run one measurement in this process and print its JSON on the last line."""
    import torch
    from bench_lib import Job, run_job

    if args.threads:
        torch.set_num_threads(args.threads)
    job = Job(**json.loads(args.one))
    try:
        if job.impl == "sampling":
            result = sampling_job(job)
        elif job.impl == "profile":
            result = profile_job(job)
        elif job.impl == "floor":
            result = floor_job(job)
        else:
            result = run_job(job, args.ref_dir, args.tol)
    except Exception as error:  # reported in the table, never hidden
        import traceback

        traceback.print_exc()
        result = {
            "job": job.to_dict(),
            "status": "error",
            "note": f"{type(error).__name__}: {error}"[:300],
        }
    print("RESULT " + json.dumps(result), flush=True)


def run_subprocess(job: Any, args: argparse.Namespace, ref_dir: str, malloc: str) -> dict[str, Any]:
    env = dict(os.environ)
    if malloc == "tuned":
        env.update(TUNED_MALLOC)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        json.dumps(job.to_dict()),
        "--ref-dir",
        ref_dir,
        "--tol",
        str(args.tol),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.job_timeout
        )
    except subprocess.TimeoutExpired:
        return {
            "job": job.to_dict(),
            "status": "error",
            "note": f"timed out after {args.job_timeout} s",
            "malloc": malloc,
        }
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        result = json.loads(lines[-1][len("RESULT ") :])
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        result = {
            "job": job.to_dict(),
            "status": "error",
            "note": f"exit {proc.returncode}: {tail[0][:200]}",
        }
    if result.get("status") == "error" and proc.stderr:
        (Path(ref_dir) / "errors.log").open("a").write(f"== {job.label()}\n{proc.stderr[-4000:]}\n")
    result.update(malloc=malloc, wall_s=wall, load_before=load)
    return result


# --------------------------------------------------------------------------- reporting


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from functional_meta.environment import cpu_name

    cpu = cpu_name()
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {mem_gb} GiB RAM",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "device": args.device,
        "allocator": allocator_note(args),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    from functional_meta.environment import code_version

    env["code"] = code_version()
    from bench_lib import peer_missing, peer_version

    env["peers"] = {
        p: (peer_missing(p) or f"{peer_version(p)}") for p in ("higher", "learn2learn", "torchopt")
    }
    return env


def allocator_note(args: argparse.Namespace) -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    base = f"LD_PRELOAD={preload}" if preload else "glibc malloc"
    user = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if user:
        base += " with " + " ".join(f"{k}={v}" for k, v in sorted(user.items()))
    if args.malloc == "default":
        return base + (" (default settings)" if not user else "")
    tuned = " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items())
    return f"{base}; 'tuned' rows add {tuned}"


def key_of(r: dict[str, Any]) -> str:
    j = r["job"]
    return f"{j['impl']}:{j['strategy']}" if j["impl"] == "ours" else j["impl"]


def impl_label(r: dict[str, Any]) -> str:
    j = r["job"]
    if j["impl"] == "ours":
        s = j["strategy"]
        return f"ours {s}" + (f" ({j['chunk']} tasks/chunk)" if s == "chunked" else "")
    return {
        "plain": "plain autograd loop",
        "compile": "ours strategy='compile' (vmap + torch.compile)",
        "learn2learn": "learn2learn MAML clone/adapt",
        "higher": "higher innerloop_ctx",
        "torchopt": "TorchOpt MetaSGD loop",
        "sampling": "task sampling",
        "profile": "torch.profiler of ours vmap",
        "floor": "convolution floor",
    }.get(j["impl"], j["impl"])


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}"


def check_text(r: dict[str, Any]) -> str:
    if "check_rel_err" in r:
        return f"{r['check_rel_err']:.1e}"
    return r.get("check", "—")


def by_workload(results: list[dict[str, Any]], malloc: str) -> dict[str, dict[str, dict[str, Any]]]:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        if r.get("malloc", "default") == malloc:
            table.setdefault(r["job"]["workload"], {})[key_of(r)] = r
    return table


def median(r: dict[str, Any] | None) -> float | None:
    return r.get("median_ms") if r and r.get("status") == "ok" else None


def headline(results: list[dict[str, Any]], malloc: str) -> dict[str, Any]:
    """The ratios the README quotes, computed from the results."""
    table = by_workload(results, malloc)
    out: dict[str, Any] = {}
    for name, rows in table.items():
        if name == "sampling":
            continue
        loop, vmap, chunked, auto = (
            median(rows.get(f"ours:{s}")) for s in ("loop", "vmap", "chunked", "auto")
        )
        plain = median(rows.get("plain"))
        candidates = {"loop": loop, "vmap": vmap, "chunked": chunked, "auto": auto}
        best_strategy = min(
            (k for k, v in candidates.items() if v), key=candidates.get, default=None
        )
        best = candidates.get(best_strategy) if best_strategy else None
        entry: dict[str, Any] = {
            "vmap_ms": vmap,
            "loop_ms": loop,
            "chunked_ms": chunked,
            "auto_ms": auto,
            "plain_ms": plain,
            "vmap_over_loop": vmap / loop if vmap and loop else None,
            "best_ours_ms": best,
            "best_ours_strategy": best_strategy,
            "best_ours_over_plain": best / plain if best and plain else None,
            "peak_rss_mb": {
                k: round(r["peak_rss_mb"]) for k, r in rows.items() if r.get("peak_rss_mb")
            },
        }
        for peer in ("higher", "learn2learn", "torchopt", "compile"):
            p = median(rows.get(peer))
            if p and best:
                entry[f"{peer}_over_best_ours"] = p / best
        out[name] = entry
    return out


def floor_section(results: list[dict[str, Any]]) -> list[str]:
    """The convolution floor of each measured workload against the same run's step times."""
    floors = [r for r in results if r["job"]["impl"] == "floor" and r.get("status") == "ok"]
    if not floors:
        return []
    table = by_workload(results, "default")
    lines = [
        "",
        "## The convolution floor",
        "",
        "`benchmarks/conv_floor.py` records every convolution of one meta-gradient (forward, "
        "backward, and those of the double backward: the same arithmetic for every "
        "implementation), counts its FLOPs, and replays the convolutions alone, in two "
        "layouts: per task as recorded, and merged (calls that differ only in batch size "
        "fused into one dense call over all tasks' images). The faster of the two is the "
        "floor: no implementation of the workload on this CPU's convolution kernels spends "
        "less on its convolutions, and everything else a step does (batch norm, ReLU, the "
        "loss, autograd, the update) comes on top.",
        "",
        "| workload | GFLOP | conv calls (merged) | conv alone per task ms | merged ms | floor ms (GFLOP/s) | plain loop ms | ours auto ms | fastest peer ms | ours / floor | fastest peer / floor | 2× faster than the fastest peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in floors:
        rows = table.get(f["job"]["workload"], {})
        peers = {k: median(rows.get(k)) for k in ("higher", "learn2learn", "torchopt")}
        peer_name, peer = min(((k, v) for k, v in peers.items() if v), key=lambda kv: kv[1],
                              default=("", None))  # fmt: skip
        plain, auto = median(rows.get("plain")), median(rows.get("ours:auto"))
        floor = min(f["recorded_ms"], f["floor_ms"])
        need = f"{peer / 2:.0f} ms = {peer / 2 / floor:.2f}× the floor" if peer else "—"
        lines.append(
            f"| {f['job']['workload']} | {f['gflop']:.1f} | {f['calls']} ({f['merged_calls']}) | "
            f"{f['recorded_ms']:.0f} | {f['floor_ms']:.0f} | {floor:.0f} ({f['gflop'] / floor * 1000:.0f}) | "
            f"{fmt_ms(plain)} | {fmt_ms(auto)} | {fmt_ms(peer)} {peer_name} | {fmt_ratio(auto, floor)} | "
            f"{fmt_ratio(peer, floor)} | {need} |"
        )
    return lines


def markdown(
    results: list[dict[str, Any]],
    env: dict[str, Any],
    args: argparse.Namespace,
    wall: float,
    updates: list[dict[str, Any]] = (),
) -> str:
    from bench_lib import workload

    lines = [
        "# Benchmarks: vmap against looped tasks, and against the peers",
        "",
        f"Generated by `{env['command']}` on {env['date']} (total wall time {wall / 60:.1f} min). "
        "Do not edit by hand: rerun the script.",
        "",
        f"- Machine: {env['machine']}" + (f"; GPU {env['gpu']}" if env.get("gpu") else ""),
        f"- Python {env['python']}, torch {env['torch']}, {env['threads']} threads, device `{env['device']}`",
        f"- Code measured: {env.get('code', '?')}",
        f"- Allocator: {env['allocator']}",
        "- Peers: " + ", ".join(f"{k} {v}" for k, v in env["peers"].items()),
        "- Each measurement runs in its own subprocess; times are ms per full meta-step "
        "(meta-gradient + Adam update) after warm-up, median and [min–max] over the repeats; "
        "peak RSS is that subprocess's `ru_maxrss` (includes ~300–450 MB of Python, torch and imports)"
        + ("; CUDA max allocated where a GPU was used." if env["device"] != "cpu" else "."),
        "- Grad check: max |g − g_ref| / max |g_ref| of the meta-gradient at the initial parameters "
        "against the workload's reference (the plain autograd loop, or our loop in the sweep), "
        f"required ≤ {args.tol:g} (10× that for Reptile's pseudo-gradient θ − φ, a small "
        "difference of O(1) tensors) before timing. Everyone starts from the same initial "
        "parameters and the same batch; the plain loop and the peers run native `nn.BatchNorm2d` "
        "in training mode (batch statistics, `track_running_stats=False`), as our "
        '`batch_norm="batch"` does from primitives.',
        "- The machine is shared. `others' CPU` is the share of all CPUs that other processes "
        "used during the timed steps (from `/proc/stat`, minus this measurement's own CPU time); "
        f"a measurement above {100 * args.contended:.0f}% was repeated once and the less contended "
        "run kept, and is starred (*) in the summary where it stayed above. `load` is the 1-minute "
        "load average when the measurement started.",
    ]
    lines += [f"- Rerun later and merged: `{u['command']}` on {u['date']}" for u in updates]
    lines.append("")
    malloc_modes = [m for m in ("default", "tuned") if any(r.get("malloc") == m for r in results)]
    names: list[str] = []
    for r in results:
        n = r["job"]["workload"]
        if n not in names and n != "sampling":
            names.append(n)
    for malloc in malloc_modes:
        table = by_workload(results, malloc)
        suffix = "" if len(malloc_modes) == 1 else f" — malloc {malloc}"
        lines += [f"## Summary{suffix}", ""]
        lines += [
            "| workload | vmap ms | chunked ms | loop ms | auto ms (default) | **vmap/loop** | plain loop ms | higher | learn2learn | TorchOpt | compile | peak RSS MB vmap / loop / plain |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in names:
            if "@T=" in n and not args.quick:
                continue  # in the sweep table below
            rows = table.get(n, {})
            vmap, loop = median(rows.get("ours:vmap")), median(rows.get("ours:loop"))

            def cell(key: str, rows: dict = rows) -> str:
                r = rows.get(key)
                if r is None:
                    return ""
                if r.get("status") != "ok":
                    return r.get("status", "?")
                return fmt_ms(r["median_ms"]) + ("*" if contended(r, args.contended) else "")

            rss = " / ".join(
                str(round(rows[k]["peak_rss_mb"])) if rows.get(k, {}).get("peak_rss_mb") else "—"
                for k in ("ours:vmap", "ours:loop", "plain")
            )
            lines.append(
                f"| {n} | {cell('ours:vmap')} | {cell('ours:chunked')} | {cell('ours:loop')} | "
                f"{cell('ours:auto')} | "
                f"**{fmt_ratio(vmap, loop)}** | {cell('plain')} | {cell('higher')} | "
                f"{cell('learn2learn')} | {cell('torchopt')} | {cell('compile')} | {rss} |"
            )
        lines += [
            "",
            "vmap/loop < 1: batching the tasks with vmap is faster than the Python loop over tasks.",
            "",
        ]
    lines += ["## Workloads", ""]
    for n in names:
        lines.append(f"- **{n}**: {workload(n).describe()}")
    lines += ["", "## All measurements", ""]
    lines += [
        "| workload | implementation | malloc | ms/step median | [min–max] | n | peak RSS MB | grad check | others' CPU | load | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        j = r["job"]
        if j["impl"] in ("profile", "floor"):
            continue  # their own sections below
        spread = (
            f"[{fmt_ms(r.get('min_ms'))}–{fmt_ms(r.get('max_ms'))}]"
            if r.get("status") == "ok"
            else ""
        )
        note = r.get("note") or ""
        if r.get("status") != "ok":
            note = f"**{r.get('status')}**: {note}"
        if r.get("cuda_peak_mb"):
            note += f" CUDA peak {r['cuda_peak_mb']:.0f} MB."
        if j["impl"] == "sampling":
            note = (note + " " + r.get("data", "")).strip()
        others = f"{100 * r['others_cpu']:.0f}%" if "others_cpu" in r else "—"
        lines.append(
            f"| {j['workload']} | {impl_label(r)} | {r.get('malloc', 'default')} | "
            f"{fmt_ms(median(r))} | {spread} | {r.get('n', '')} | "
            f"{round(r['peak_rss_mb']) if r.get('peak_rss_mb') else '—'} | {check_text(r)} | "
            f"{others} | {r.get('load_before', float('nan')):.1f} | {note.replace('|', '/')} |"
        )
    sweep = [n for n in names if "@T=" in n and not args.quick]
    if sweep:
        lines += [
            "",
            "## Meta-batch sweep (malloc default)",
            "",
            "| T | W1 vmap ms | W1 chunked ms | W1 loop ms | W1 vmap/loop | W1 peak RSS MB vmap / loop "
            "| W3 vmap ms | W3 chunked ms | W3 loop ms | W3 vmap/loop |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        table = by_workload(results, "default")
        for t in SWEEP:
            cells = []
            for base, default_t in (("W1", 32), ("W3", 25)):
                name = base if t == default_t else f"{base}@T={t}"
                rows = table.get(name, {})
                v, lo = median(rows.get("ours:vmap")), median(rows.get("ours:loop"))

                def star(key: str, rows: dict = rows) -> str:
                    r = rows.get(key)
                    return "*" if r and contended(r, args.contended) else ""

                cells += [
                    fmt_ms(v) + star("ours:vmap"),
                    fmt_ms(median(rows.get("ours:chunked"))) + star("ours:chunked"),
                    fmt_ms(lo) + star("ours:loop"),
                ]
                cells.append(fmt_ratio(v, lo))
                if base == "W1":
                    cells.append(
                        " / ".join(
                            str(round(rows[k]["peak_rss_mb"]))
                            if rows.get(k, {}).get("peak_rss_mb")
                            else "—"
                            for k in ("ours:vmap", "ours:loop")
                        )
                    )
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            f"(W1 at T=32 is the W1 row; W3's own row is T=25, so T=32 is a sweep point; "
            f"chunked = {args.chunk_size} tasks per chunk, measured where T > {args.chunk_size} "
            "in W1/W3 and at T=64 in the sweep; * = taken while other processes used more than "
            f"{100 * args.contended:.0f}% of the CPUs: rerun that point before quoting it.)"
        )
    samp = [r for r in results if r["job"]["impl"] == "sampling" and r.get("status") == "ok"]
    w1 = median(by_workload(results, "default").get("W1", {}).get("ours:vmap"))
    if samp:
        s = samp[0]
        share = f", {100 * s['median_ms'] / w1:.2f}% of a W1 vmap step" if w1 else ""
        lines += [
            "",
            "## Task sampling",
            "",
            f"Drawing the W1 meta-batch: {s['median_ms']:.2f} ms median{share} ({s.get('data', '')}).",
        ]
    lines += floor_section(results)
    prof = [r for r in results if r["job"]["impl"] == "profile" and r.get("status") == "ok"]
    if prof:
        p = prof[-1]
        lines += [
            "",
            f"## Where the time goes: one {p['job']['workload']} ours-vmap step under torch.profiler",
            "",
            f"Self CPU time by operator, total {p['total_ms']:.0f} ms (profiler overhead included; "
            "`python benchmarks/profile_step.py` prints the full table).",
            "",
            "| operator | self CPU ms | % | calls |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{o['name']}` | {o['self_ms']:.0f} | {o['pct']:.1f} | {o['calls']} |"
            for o in p["ops"]
        ]
        groups = p.get("groups", {})
        if groups:
            lines += ["", "Grouped: " + ", ".join(f"{k} {v:.0f}%" for k, v in groups.items()) + "."]
    lines += [
        "",
        "## Reproducing",
        "",
        "- `python benchmarks/vmap_vs_loop.py` (full, writes this page, "
        "`benchmarks/vmap_vs_loop.json` and `docs/benchmarks_headline.md`); `--quick` for a "
        "few-minute check; `--malloc both` to add the tuned-glibc rows; `--device cuda` on a GPU; "
        "`--compile-conv` to add `torch.compile` on W1/W2 (cold compile takes minutes); "
        "`--only W3 --update benchmarks/vmap_vs_loop.json` to rerun some measurements into this page; "
        "`pytest benchmarks/ --benchmark-only` for the pytest-benchmark view.",
        "- Peers (`pip install -e .[bench]`, or by hand without touching torch): "
        "`pip install higher==0.2.1`; `pip install --no-deps torchopt optree graphviz` (its compiled "
        "extension does not load against this torch; only `use_accelerated_op=True` needs it). "
        "learn2learn 0.2.0 does not build from PyPI on Python 3.11 (its generated C includes "
        "`longintrepr.h`): unpack the sdist, regenerate `learn2learn/data/{meta_dataset,task_dataset,"
        "transforms}.c` with `cython -3`, then `pip install --no-build-isolation --no-deps .`; "
        "`import learn2learn` still fails here (it needs gym and a torchvision that matches the CPU "
        "torch), so the benchmark loads `learn2learn/algorithms/maml.py` with the two parent "
        "packages stubbed (the MAML wrapper itself needs only torch).",
        "",
    ]
    return "\n".join(lines)


def headline_markdown(head: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        f"<!-- generated by benchmarks/vmap_vs_loop.py on {env['date']}; paste into the README -->",
        f"Measured on {env['machine']}, torch {env['torch']}, {env['threads']} threads, "
        f"{env['allocator']} (full table: docs/benchmarks.md):",
        "",
    ]
    for name, h in head.items():
        if "@T=" in name:
            continue
        bits = []
        if h.get("vmap_over_loop"):
            r = h["vmap_over_loop"]
            bits.append(
                f"vmap {1 / r:.1f}× faster than the task loop"
                if r < 1
                else f"vmap {r:.1f}× slower than the task loop"
            )
        if h.get("best_ours_over_plain"):
            bits.append(
                f"our best ({h['best_ours_strategy']}) takes {h['best_ours_over_plain']:.2f}× "
                "the plain autograd loop's time"
            )
        peers = [
            f"{peer} {h[f'{peer}_over_best_ours']:.2f}×"
            for peer in ("higher", "learn2learn", "torchopt")
            if h.get(f"{peer}_over_best_ours")
        ]
        if peers:
            bits.append("peers' time over ours: " + ", ".join(peers))
        rss = h.get("peak_rss_mb", {})
        if rss.get("ours:vmap") and rss.get("ours:loop"):
            bits.append(f"peak RSS vmap {rss['ours:vmap']} MB vs loop {rss['ours:loop']} MB")
        if bits:
            lines.append(f"- **{name}**: " + "; ".join(bits) + ".")
    return "\n".join(lines) + "\n"


def contended(r: dict[str, Any], threshold: float) -> bool:
    return r.get("status") == "ok" and r.get("others_cpu", 0.0) > threshold


def print_line(k: int, n: int, r: dict[str, Any], job: Any) -> None:
    status = r.get("status")
    if status == "ok" and "median_ms" not in r:
        extra = "done"
    elif status == "ok":
        extra = (
            f"{fmt_ms(r['median_ms'])} ms/step, peak {r.get('peak_rss_mb', 0):.0f} MB, "
            f"check {check_text(r)}, others' CPU {100 * r.get('others_cpu', 0):.0f}%"
        )
    else:
        extra = f"{status}: {r.get('note', '')}"
    print(
        f"[{k}/{n}] {job.label()} ({r.get('malloc')}) -> {extra}  [{r.get('wall_s', 0):.0f} s]",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="W3 and W1 at meta-batch 4 only (a few minutes)"
    )
    parser.add_argument(
        "--only", nargs="+", help="workloads: W1 W2 W3 W4 R1 R3 S1 S3 sweep sampling profile floor"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument(
        "--malloc",
        choices=("default", "tuned", "both"),
        default="default",
        help="glibc malloc settings for the measurements (tuned: the MALLOC_* env of docs/performance.md)",
    )
    parser.add_argument("--chunk-size", type=int, default=8, help="tasks per chunk for 'chunked'")
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed steps per measurement (default by workload)"
    )
    parser.add_argument(
        "--compile-conv",
        action="store_true",
        help="also torch.compile W1/W2 (cold compile takes minutes)",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile variant of W3"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="seconds of timed steps after which a measurement stops repeating (min 2 steps)",
    )
    parser.add_argument(
        "--contended",
        type=float,
        default=0.25,
        help="share of the CPUs used by other processes above which a measurement is repeated",
    )
    parser.add_argument(
        "--retries", type=int, default=1, help="times to repeat a contended measurement"
    )
    parser.add_argument("--tol", type=float, default=3e-3, help="relative meta-gradient tolerance")
    parser.add_argument("--job-timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument(
        "--out", help="output stem (default docs/benchmarks, or benchmarks/results/quick)"
    )
    parser.add_argument(
        "--render", metavar="JSON", help="only re-render the reports from a results JSON"
    )
    parser.add_argument(
        "--update",
        metavar="JSON",
        help="rerun the selected measurements and replace them in this results JSON",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--ref-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return one(args)

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    modes = ["default", "tuned"] if args.malloc == "both" else [args.malloc]
    stem = (
        Path(args.out)
        if args.out
        else (HERE / "results" / "quick" if args.quick else ROOT / "docs" / "benchmarks")
    )
    json_path = stem.with_suffix(".json") if args.out or args.quick else HERE / "vmap_vs_loop.json"
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        return write_reports(payload, stem, json_path if args.render != str(json_path) else None)
    jobs = plan(args)
    env = environment(args)
    total = len(jobs) * len(modes)
    print(
        f"{total} measurements; torch {env['torch']}, {env['threads']} threads, {env['allocator']}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    k = 0
    for malloc in modes:
        ref_dir = HERE / "results" / f"ref-{args.device.replace(':', '')}-{malloc}"
        if not args.update:  # a fresh run recomputes its references
            shutil.rmtree(ref_dir, ignore_errors=True)
        ref_dir.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            k += 1
            print(f"[{k}/{total}] {job.label()} ({malloc}) ...", flush=True)
            r = run_subprocess(job, args, str(ref_dir), malloc)
            for _ in range(args.retries):
                if not contended(r, args.contended):
                    break
                print_line(k, total, r, job)
                print(f"[{k}/{total}] contended: measuring {job.label()} again ...", flush=True)
                again = run_subprocess(job, args, str(ref_dir), malloc)
                if again.get("status") == "ok" and again["others_cpu"] < r["others_cpu"]:
                    again["attempts"] = r.get("attempts", 1) + 1
                    r = again
                else:
                    r["attempts"] = r.get("attempts", 1) + 1
            results.append(r)
            print_line(k, total, r, job)
            partial = HERE / "results" / "partial.json"
            partial.write_text(json.dumps({"environment": env, "results": results}, indent=1))
        log = Path(ref_dir, "errors.log")
        if log.exists():
            print(log.read_text(), file=sys.stderr)
            log.unlink()
    wall = time.perf_counter() - start
    settings = {
        "tol": args.tol,
        "quick": args.quick,
        "chunk_size": args.chunk_size,
        "contended": args.contended,
    }
    if args.update:
        payload = json.loads(Path(args.update).read_text())
        fresh = {(key_of(r), r["job"]["workload"], r.get("malloc")) for r in results}
        kept = [
            r
            for r in payload["results"]
            if (key_of(r), r["job"]["workload"], r.get("malloc")) not in fresh
        ]
        for r in results:
            r["rerun"] = env["date"]
        payload["results"] = _ordered(kept + results)
        payload["wall_s"] = payload.get("wall_s", 0) + wall
        payload.setdefault("settings", {})["tol"] = args.tol  # earlier rows passed it or less
        payload.setdefault("updates", []).append({"command": env["command"], "date": env["date"]})
        json_path = Path(args.update)
    else:
        payload = {"environment": env, "settings": settings, "wall_s": wall, "results": results}
    write_reports(payload, stem, json_path)


def _ordered(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results in plan order: by first appearance of the workload, then implementation."""
    seen: dict[str, int] = {}
    for r in results:
        seen.setdefault(r["job"]["workload"], len(seen))
    rank = {k: i for i, k in enumerate(ORDER)}
    return sorted(
        results,
        key=lambda r: (
            seen[r["job"]["workload"]],
            rank.get(key_of(r), len(rank)),
            r.get("malloc", ""),
        ),
    )


def _kept_section(text: str) -> str:
    """The section another script writes into the page (between its markers), or ""."""
    begin, end = "<!-- step_overhead -->", "<!-- /step_overhead -->"
    if begin not in text or end not in text:
        return ""
    return begin + text.partition(begin)[2].partition(end)[0] + end


def write_reports(payload: dict[str, Any], stem: Path, json_path: Path | None) -> None:
    """The JSON (when ``json_path``), the Markdown table and the headline snippet."""
    results, env = payload["results"], payload["environment"]
    settings = {"tol": 3e-3, "quick": False, "chunk_size": 8, "contended": 0.25}
    settings.update(payload.get("settings", {}))
    modes = [m for m in ("default", "tuned") if any(r.get("malloc") == m for r in results)]
    payload["headline"] = {m: headline(results, m) for m in modes}
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(
        results, env, argparse.Namespace(**settings), payload["wall_s"], payload.get("updates", [])
    )
    if json_path is not None:
        json_path.write_text(json.dumps(payload, indent=1) + "\n")
    page = stem.with_suffix(".md")
    kept = _kept_section(page.read_text()) if page.exists() else ""
    if kept:  # benchmarks/step_overhead.py's section, measured by that script
        head, sep, tail = md.partition("## Reproducing")
        md = head + kept + "\n\n" + sep + tail
    page.write_text(md)
    head_path = stem.parent / f"{stem.name}_headline.md"
    head_path.write_text(headline_markdown(payload["headline"][modes[0]], env))
    print()
    print(md)
    print(head_path.read_text())
    print(f"wrote {stem.with_suffix('.md')}, {json_path or '(json unchanged)'}, {head_path}")


if __name__ == "__main__":
    main()
