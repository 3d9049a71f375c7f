"""Shared machinery of the benchmarks: workloads, implementations, gradient checks, timing.

Every implementation of a workload is prepared as a :class:`Prepared` pair of closures:

- ``check_grads()``: the meta-gradient at the initial parameters (no update), as a flat dict
  ``{name: tensor}``, or ``None`` where the implementation exposes none. It is compared with
  a reference before any timing is reported, and it doubles as the first warm-up call.
- ``step()``: one full meta-step (meta-gradient plus optimizer update); state advances.

Implementations: ``ours`` (``functional_meta``'s public step functions, strategies
``vmap``/``chunked``/``loop``/``auto``), ``plain`` (the honest baseline: a plain ``torch.autograd``
loop over tasks, ``autograd.grad(create_graph=True)`` inside, ``backward`` per task),
``compile`` (``torch.compile`` of our step's pure core), and the peers ``higher``,
``learn2learn`` (its MAML wrapper with clone/adapt) and ``torchopt`` (its ``MetaSGD`` loop).

Everyone starts from the same initial parameters (one seeded ``nn.Module``) and the same
task batch. Peers and the plain loop run the native module with ``nn.BatchNorm2d`` in
training mode (batch statistics) and ``track_running_stats=False``: the same math as our
``batch_norm="batch"``, with no running-statistics writes (which never change gradients).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import functional_meta as fm  # noqa: E402

SEED = 0
OUTER_LR = 1e-3
PEERS = ("higher", "learn2learn", "torchopt")
IMPLS = ("plain", "ours", "compile", *PEERS)


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """One benchmark setting. ``net`` is ``"conv4"`` (Omniglot N-way K-shot, 28×28, BN) or
    ``"mlp"`` (sinusoid, 1-40-40-1); ``algo`` is ``maml``, ``fomaml``, ``reptile`` or
    ``metasgd``."""

    name: str
    net: str
    algo: str
    tasks: int
    inner_steps: int
    inner_lr: float
    ways: int = 5
    shots: int = 1
    queries: int = 15
    support: int = 10  # sinusoid K
    query: int = 10

    @property
    def loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return F.cross_entropy if self.net == "conv4" else F.mse_loss

    @property
    def first_order(self) -> bool:
        return self.algo == "fomaml"

    def describe(self) -> str:
        algo = {
            "maml": "second-order MAML",
            "fomaml": "first-order MAML",
            "reptile": "Reptile (adapts on support+query)",
            "metasgd": "Meta-SGD (second order)",
        }[self.algo]
        if self.net == "conv4":
            data = (
                f"Omniglot {self.ways}-way {self.shots}-shot, conv4+BatchNorm 28×28, "
                f"{self.queries} queries/class"
            )
        else:
            data = f"sinusoid, MLP 1-40-40-1, K={self.support} support + {self.query} query"
        return (
            f"{data}, meta-batch {self.tasks}, {self.inner_steps} inner step"
            f"{'s' if self.inner_steps > 1 else ''} (lr {self.inner_lr}), {algo}, float32"
        )

    def with_tasks(self, tasks: int) -> Workload:
        return replace(self, name=f"{self.name.split('@')[0]}@T={tasks}", tasks=tasks)


_W1 = Workload("W1", "conv4", "maml", tasks=32, inner_steps=1, inner_lr=0.4)
_W3 = Workload("W3", "mlp", "maml", tasks=25, inner_steps=1, inner_lr=0.01)
WORKLOADS: dict[str, Workload] = {
    "W1": _W1,
    "W2": replace(_W1, name="W2", inner_steps=5),
    "W3": _W3,
    "W4": replace(_W1, name="W4", algo="fomaml"),
    "R1": replace(_W1, name="R1", algo="reptile", inner_steps=5, inner_lr=0.1),
    "R3": replace(_W3, name="R3", algo="reptile", inner_steps=5),
    "S1": replace(_W1, name="S1", algo="metasgd"),
    "S3": replace(_W3, name="S3", algo="metasgd"),
}


def workload(name: str) -> Workload:
    """``"W1"`` or a sweep point ``"W1@T=64"``."""
    base, _, tasks = name.partition("@T=")
    w = WORKLOADS[base]
    return w.with_tasks(int(tasks)) if tasks else w


# --------------------------------------------------------------------------- availability


def _step_fn(name: str) -> Callable | None:
    """A step/grad function of the library if it exists (the API grows while we measure)."""
    return getattr(fm, name, None)


def unavailable_reason(w: Workload, impl: str) -> str | None:
    """Why ``impl`` cannot run ``w`` here, computed from what is importable; ``None`` if it can."""
    if impl == "ours":
        needed = {"reptile": "reptile_step", "metasgd": "metasgd_step"}.get(w.algo, "maml_step")
        extra = ("metasgd_init",) if w.algo == "metasgd" else ()
        for name in (needed, *extra):
            if _step_fn(name) is None:
                return f"not yet available: functional_meta has no {name}"
        return None
    if impl == "compile":
        return None if w.algo in ("maml", "fomaml") else "compile variant is for MAML only"
    if impl == "plain":
        return None
    if w.algo not in ("maml", "fomaml"):
        return "peers are compared on MAML workloads only"
    if w.algo == "fomaml" and impl != "learn2learn":
        return f"{impl} has no first-order MAML mode comparable to ours"
    return peer_missing(impl)


_PEER_ERRORS: dict[str, str | None] = {}


def peer_missing(impl: str) -> str | None:
    """``None`` when the peer imports, else a one-line reason (cached)."""
    if impl not in _PEER_ERRORS:
        try:
            if impl == "learn2learn":
                load_l2l_maml()
            else:
                importlib.import_module(impl)
            _PEER_ERRORS[impl] = None
        except Exception as error:  # any import failure is a reason to report
            _PEER_ERRORS[impl] = f"not installed/importable: {type(error).__name__}: {error}"[:160]
    return _PEER_ERRORS[impl]


def load_l2l_maml() -> type:
    """learn2learn's ``MAML`` class, loaded without the package ``__init__``.

    ``import learn2learn`` needs gym and torchvision (its data and vision modules), which do
    not install next to the CPU torch here; ``learn2learn/algorithms/maml.py`` itself only
    needs torch and ``learn2learn.utils``, so the two parent packages are stubbed.
    """
    try:
        from learn2learn.algorithms.maml import MAML

        return MAML
    except Exception:
        for key in [k for k in sys.modules if k == "learn2learn" or k.startswith("learn2learn.")]:
            del sys.modules[key]
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'learn2learn'")
    root = spec.submodule_search_locations[0]
    for name, sub in (("learn2learn", ""), ("learn2learn.algorithms", "algorithms")):
        stub = types.ModuleType(name)
        stub.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = stub
    from learn2learn.algorithms.maml import MAML

    return MAML


L2L_NOTE = "learn2learn 0.2.0's algorithms/maml.py loaded without the package __init__ (needs gym, torchvision)"


def peer_version(impl: str) -> str:
    try:
        from importlib.metadata import version

        return version(impl)
    except Exception:
        return "?"


# --------------------------------------------------------------------------- data


def make_module(w: Workload) -> nn.Module:
    torch.manual_seed(SEED)
    return fm.models.conv4(w.ways) if w.net == "conv4" else fm.models.mlp((1, 40, 40, 1))


def make_tasks(w: Workload, device: str) -> tuple[fm.TaskBatch, str]:
    """The workload's task batch and how it was made (the data package or random tensors)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    if w.net == "mlp":
        try:
            from functional_meta.data.sinusoid import sinusoid_tasks

            return sinusoid_tasks(w.tasks, w.support, w.query, generator=gen).to(device), (
                "functional_meta.data.sinusoid"
            )
        except ImportError:
            shapes = ((w.support, 1), (w.query, 1))
            xs = [torch.rand(w.tasks, *s, generator=gen) * 10 - 5 for s in shapes]
            return fm.TaskBatch(xs[0], torch.sin(xs[0]), xs[1], torch.sin(xs[1])).to(
                device
            ), "random tensors"
    try:
        from functional_meta.data.fewshot import FewShotSampler

        pool = torch.rand(w.ways * 5, 20, 1, 28, 28, generator=gen)
        sampler = FewShotSampler(pool, ways=w.ways, shots=w.shots, queries=w.queries)
        return sampler.sample(w.tasks, gen).to(device), (
            "functional_meta.data.fewshot (random pixels)"
        )
    except ImportError:
        labels = torch.arange(w.ways)
        return fm.TaskBatch(
            torch.rand(w.tasks, w.ways * w.shots, 1, 28, 28, generator=gen),
            labels.repeat_interleave(w.shots).repeat(w.tasks, 1),
            torch.rand(w.tasks, w.ways * w.queries, 1, 28, 28, generator=gen),
            labels.repeat_interleave(w.queries).repeat(w.tasks, 1),
        ).to(device), "random tensors"


def native_module(module: nn.Module, device: str) -> nn.Module:
    """A copy with native BatchNorm in training mode on batch statistics, no running stats."""
    m = copy.deepcopy(module).to(device)
    for sub in m.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.track_running_stats = False
            sub.running_mean = None
            sub.running_var = None
            sub.num_batches_tracked = None
    return m.train()


def flat(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors as one ``{"a/b": tensor}`` dict, detached."""
    if isinstance(tree, dict):
        out: dict[str, torch.Tensor] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}/" if isinstance(value, dict) else prefix + key))
        return out
    return {prefix.rstrip("/"): tree.detach()}


# --------------------------------------------------------------------------- implementations


@dataclass
class Prepared:
    check_grads: Callable[[], dict[str, torch.Tensor] | None]
    step: Callable[[], Any]
    note: str = ""


def prepare_ours(
    w: Workload, tasks: fm.TaskBatch, device: str, strategy: str, chunk: int
) -> Prepared:
    apply, params, buffers = fm.functionalize(make_module(w))
    params = {k: v.to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    optimizer = fm.optim.adam(OUTER_LR)
    opts: dict[str, Any] = dict(
        apply=apply,
        buffers=buffers,
        loss=w.loss,
        batching=fm.Batching(
            strategy if strategy in ("loop", "auto", "compile") else "vmap",
            chunk if strategy == "chunked" else None,
        ),
    )
    inner = fm.InnerLoop(lr=w.inner_lr, steps=w.inner_steps, first_order=w.first_order)
    if w.algo == "metasgd":
        meta = _step_fn("metasgd_init")(params, w.inner_lr)
        grad_fn, step_fn = _step_fn("metasgd_grad"), _step_fn("metasgd_step")
        opts.update(inner=fm.InnerLoop(steps=w.inner_steps))
    elif w.algo == "reptile":
        meta = params
        grad_fn, step_fn = _step_fn("reptile_grad"), _step_fn("reptile_step")
        opts.update(inner=inner, use_query=True)
    else:
        meta = params
        grad_fn, step_fn = _step_fn("maml_grad"), _step_fn("maml_step")
        opts.update(inner=inner)
    state = {"meta": meta, "opt": optimizer.init(meta)}

    def check_grads() -> dict[str, torch.Tensor] | None:
        if grad_fn is None:
            return None
        grads, _ = grad_fn(state["meta"], tasks, **opts)
        return flat(grads)

    def step() -> Any:
        state["meta"], state["opt"], metrics = step_fn(
            state["meta"], state["opt"], tasks, optimizer=optimizer, **opts
        )
        return metrics

    return Prepared(check_grads, step)


def _task(tasks: fm.TaskBatch, i: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[i] for t in tasks.tensors())


def prepare_torch_loop(w: Workload, tasks: fm.TaskBatch, device: str, impl: str) -> Prepared:
    """The plain autograd loop and the peers: one task at a time, ``backward`` per task,
    ``torch.optim.Adam`` for the outer update."""
    model = native_module(make_module(w), device)
    names = [n for n, _ in model.named_parameters()]
    loss_fn, lr, steps, T = w.loss, w.inner_lr, w.inner_steps, len(tasks)
    second = not w.first_order
    extra: list[torch.Tensor] = []
    note = ""

    if impl == "plain":
        from torch.func import functional_call

        params = dict(model.named_parameters())
        rates = None
        if w.algo == "metasgd":
            rates = {n: torch.full_like(p, lr).requires_grad_() for n, p in params.items()}
            extra = list(rates.values())

        def fwd(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, p, (x,))

        def accumulate() -> None:
            for i in range(T):
                sx, sy, qx, qy = _task(tasks, i)
                if w.algo == "reptile":
                    x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
                    fast = {n: p.detach().requires_grad_() for n, p in params.items()}
                    for _ in range(steps):
                        gs = torch.autograd.grad(loss_fn(fwd(fast, x), y), list(fast.values()))
                        fast = {
                            n: (v - lr * g).detach().requires_grad_()
                            for (n, v), g in zip(fast.items(), gs, strict=True)
                        }
                    for n, p in params.items():
                        delta = (p.detach() - fast[n].detach()) / T
                        p.grad = delta if p.grad is None else p.grad + delta
                    continue
                fast = dict(params)
                for _ in range(steps):
                    gs = torch.autograd.grad(
                        loss_fn(fwd(fast, sx), sy), list(fast.values()), create_graph=second
                    )
                    fast = {
                        n: v - (rates[n] if rates else lr) * g
                        for (n, v), g in zip(fast.items(), gs, strict=True)
                    }
                (loss_fn(fwd(fast, qx), qy) / T).backward()

        def grads_of() -> dict[str, torch.Tensor]:
            out = {
                f"params/{n}" if rates else n: p.grad.detach().clone() for n, p in params.items()
            }
            if rates:
                out.update({f"inner_lr/{n}": r.grad.detach().clone() for n, r in rates.items()})
            return out

    elif impl == "higher":
        import higher

        inner_opt = torch.optim.SGD(model.parameters(), lr=lr)

        def accumulate() -> None:
            for i in range(T):
                sx, sy, qx, qy = _task(tasks, i)
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                    fmodel,
                    diffopt,
                ):
                    for _ in range(steps):
                        diffopt.step(loss_fn(fmodel(sx), sy))
                    (loss_fn(fmodel(qx), qy) / T).backward()

    elif impl == "learn2learn":
        maml = load_l2l_maml()(model, lr=lr, first_order=not second)
        note = L2L_NOTE

        def accumulate() -> None:
            for i in range(T):
                sx, sy, qx, qy = _task(tasks, i)
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(loss_fn(learner(sx), sy))
                (loss_fn(learner(qx), qy) / T).backward()

    elif impl == "torchopt":
        import torchopt

        inner_opt = torchopt.MetaSGD(model, lr=lr)
        net_state = torchopt.extract_state_dict(model)
        opt_state = torchopt.extract_state_dict(inner_opt)

        def accumulate() -> None:
            for i in range(T):
                sx, sy, qx, qy = _task(tasks, i)
                for _ in range(steps):
                    inner_opt.step(loss_fn(model(sx), sy))
                (loss_fn(model(qx), qy) / T).backward()
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)

    else:
        raise ValueError(f"unknown implementation {impl!r}")

    leaves = list(dict(model.named_parameters()).values()) + extra
    outer = torch.optim.Adam(leaves, lr=OUTER_LR)
    if impl != "plain":

        def grads_of() -> dict[str, torch.Tensor]:
            return {
                n: p.grad.detach().clone() for n, p in zip(names, model.parameters(), strict=True)
            }

    def check_grads() -> dict[str, torch.Tensor]:
        outer.zero_grad(set_to_none=True)
        accumulate()
        grads = grads_of()
        outer.zero_grad(set_to_none=True)
        return grads

    def step() -> None:
        outer.zero_grad(set_to_none=True)
        accumulate()
        outer.step()

    return Prepared(check_grads, step, note)


def prepare(w: Workload, impl: str, strategy: str, device: str, chunk: int) -> tuple[Prepared, str]:
    tasks, source = make_tasks(w, device)
    if impl == "ours":
        return prepare_ours(w, tasks, device, strategy, chunk), source
    if impl == "compile":  # strategy="compile": the first gradient compiles
        prepared = prepare_ours(w, tasks, device, "compile", chunk)
        t0 = time.perf_counter()
        prepared.check_grads()
        sync(device)
        prepared.note = f"strategy='compile', cold compile {time.perf_counter() - t0:.1f} s"
        return prepared, source
    return prepare_torch_loop(w, tasks, device, impl), source


# --------------------------------------------------------------------------- measuring


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """``max |got − ref| / max |ref|`` over all entries (keys must match)."""
    if set(got) != set(ref):
        raise KeyError(f"gradient keys differ: {sorted(set(got) ^ set(ref))}")
    diff = max(float((got[k].double().cpu() - ref[k].double().cpu()).abs().max()) for k in ref)
    scale = max(float(ref[k].double().abs().max()) for k in ref)
    return diff / max(scale, 1e-30)


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def cpu_busy_s() -> float:
    """Seconds all CPUs of the machine have been busy since boot (``/proc/stat``), or NaN."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Contention:
    """The share of the machine's CPU time used by *other* processes over a window: the
    machine's busy time minus this process's CPU time, over wall time × CPUs. On a shared
    machine this says whether a timing was taken while someone else was computing."""

    def __enter__(self) -> Contention:
        self.t0, self.own0, self.busy0 = time.perf_counter(), time.process_time(), cpu_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        others = (cpu_busy_s() - self.busy0) - (time.process_time() - self.own0)
        self.others = max(0.0, others) / max(wall * (os.cpu_count() or 1), 1e-9)


def time_steps(
    prepared: Prepared, device: str, warmup: int, repeats: int, budget_s: float = float("inf")
) -> list[float]:
    """Milliseconds of each of ``repeats`` steps after ``warmup`` untimed ones; stops early
    once ``budget_s`` seconds of timed steps have passed and at least 2 steps were timed."""
    for _ in range(warmup):
        prepared.step()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepared.step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
        if len(times) >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def time_steps_watched(
    prepared: Prepared, device: str, warmup: int, repeats: int, budget_s: float
) -> tuple[list[float], float]:
    """:func:`time_steps` and the other processes' CPU share during the timed steps."""
    for _ in range(warmup):
        prepared.step()
    with Contention() as watch:
        times = time_steps(prepared, device, 0, repeats, budget_s)
    return times, watch.others


def summary(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    n = len(s)

    def q(f: float) -> float:
        pos = f * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"median": q(0.5), "min": s[0], "max": s[-1], "q1": q(0.25), "q3": q(0.75), "n": n}


@dataclass
class Job:
    workload: str
    impl: str
    strategy: str = "-"
    chunk: int = 8
    warmup: int = 0
    repeats: int = 3
    device: str = "cpu"
    budget_s: float = 60.0

    def label(self) -> str:
        strategy = "" if self.strategy == "-" else f" {self.strategy}"
        if self.strategy == "chunked":
            strategy += f"({self.chunk})"
        return f"{self.workload} {self.impl}{strategy}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_job(job: Job, ref_dir: str | None, tol: float) -> dict[str, Any]:
    """Prepare, check against the reference, time; everything in this process."""
    w = workload(job.workload)
    out: dict[str, Any] = {"job": job.to_dict(), "threads": torch.get_num_threads()}
    reason = unavailable_reason(w, job.impl)
    if reason:
        return {**out, "status": "unavailable", "note": reason}
    if job.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    prepared, source = prepare(w, job.impl, job.strategy, job.device, job.chunk)
    out.update(data=source, rss_setup_mb=rss_mb(), note=prepared.note)
    grads = prepared.check_grads()
    out["first_call_s"] = time.perf_counter() - t_start
    ref_path = Path(ref_dir, f"{job.workload}.pt") if ref_dir else None
    if grads is None:
        out["check"] = "n/a (no gradient exposed)"
    elif ref_path is not None and ref_path.exists():
        ref = torch.load(ref_path)
        err = rel_err(grads, ref["grads"])
        out.update(check_rel_err=err, check_ref=ref["source"])
        if w.algo == "reptile":
            # θ − φ after 5 steps: a small difference of two O(1) tensors, so float32
            # rounding of the parameters shows up ~10× larger relative to the result.
            tol = 10 * tol
        if not err <= tol:
            out.update(
                status="mismatch",
                note=f"meta-gradient differs from {ref['source']}: rel err {err:.2e} > {tol:g}; not timed",
            )
            return out
    elif ref_path is not None:
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"grads": {k: v.cpu() for k, v in grads.items()}, "source": job.label()}, ref_path
        )
        out.update(check="reference", check_ref=job.label())
    times, others = time_steps_watched(prepared, job.device, job.warmup, job.repeats, job.budget_s)
    out.update(
        status="ok",
        others_cpu=others,
        times_ms=times,
        **{f"{k}_ms" if k != "n" else "n": v for k, v in summary(times).items()},
        peak_rss_mb=peak_rss_mb(),
    )
    if job.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
