"""Time to accuracy on few-shot Omniglot: test accuracy against training time, resumable.

Meta-trains one configuration for a budget of training time and, at the end of every epoch,
scores the current meta-parameters on the fixed test tasks (the same 600 tasks as the
command line's ``evaluate``). Nothing is tuned on those scores: the configuration is fixed
before the run, and training stops on the time budget alone. The test scores only draw the
curve; their cost is excluded from the training time.

Time is measured two ways, both excluding the test scoring: ``cpu_seconds``, the CPU time
of the process (with ``--threads 1``, the wall time the run would take on an idle core,
whatever else the machine runs), and ``wall_seconds``. Budgets are in CPU minutes.

    python examples/time_to_accuracy.py --name maml-5w1s-q2 --ways 5 --queries 2 \\
        --meta-batch-size 32 --budget-minutes 30
    python examples/time_to_accuracy.py --name ... --resume     # continue after a stop

Writes ``runs/time_to_accuracy/<name>/``: ``curve.jsonl`` (one line per epoch: step,
cpu_seconds, wall_seconds, test accuracy and 95% interval), ``checkpoints/`` (``last.pt``,
resumable), ``config.json``. ``--report`` prints the table of ``docs/results_omniglot.md``
from every run there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from functional_meta import recipes
from functional_meta.checkpoint import load_checkpoint
from functional_meta.evaluation import evaluate
from functional_meta.steps import init_state
from functional_meta.training import fit

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "time_to_accuracy"
TARGETS = {5: (95.0, 97.0, 98.0), 20: (85.0, 90.0, 92.0)}  # issue 18's marks, in percent


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {"algorithm": args.algorithm, "dataset": "omniglot"}
    config |= dict(recipes.DEFAULTS["omniglot"]) | recipes.PROTOCOL_DEFAULTS[args.protocol]
    config |= dict(
        protocol=args.protocol, seed=args.seed, device="cpu", chunk_size=None, clip=None,
        inner_clip=None, data_dir=args.data_dir, cache_dir=args.cache_dir,
        output_dir=str(RUNS / args.name), steps_per_epoch=args.steps_per_epoch, epochs=None,
        steps=args.max_steps, msl_epochs=None, first_order_epochs=None, threads=args.threads,
    )  # fmt: skip
    for key in ("ways", "shots", "queries", "meta_batch_size", "inner_lr", "inner_steps",
                "meta_lr", "val_tasks", "test_tasks", "eval_inner_steps"):  # fmt: skip
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config


def run(args: argparse.Namespace) -> None:
    """Train until the CPU budget is spent, scoring the test tasks at every epoch's end."""
    out = RUNS / args.name
    curve_path, last = out / "curve.jsonl", out / "checkpoints" / "last.pt"
    if out.exists() and not args.resume:
        sys.exit(f"{out} exists: pass --resume to continue it, or another --name")
    resume = load_checkpoint(last) if args.resume and last.is_file() else None
    config = dict(resume.config) if resume else _config(args)
    torch.set_num_threads(config["threads"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    experiment = recipes.build(config)
    tests = experiment.test_tasks(config["test_tasks"])
    curve = []
    if curve_path.is_file():  # keep what the checkpoint covers
        lines = [json.loads(x) for x in curve_path.read_text().splitlines() if x.strip()]
        curve = [r for r in lines if resume and r["step"] <= resume.step]
    curve_path.write_text("".join(json.dumps(r) + "\n" for r in curve))
    spent = dict(cpu=curve[-1]["cpu_seconds"] if curve else 0.0,
                 wall=curve[-1]["wall_seconds"] if curve else 0.0)  # fmt: skip
    clock = dict(cpu=time.process_time(), wall=time.perf_counter())
    budget = args.budget_minutes * 60

    def on_event(event: str, record: dict[str, Any], state: Any) -> bool:
        if event != "epoch":
            return False
        spent["cpu"] += time.process_time() - clock["cpu"]
        spent["wall"] += time.perf_counter() - clock["wall"]
        score = evaluate(experiment.algorithm, state, tests, steps=config["eval_inner_steps"])
        entry = dict(step=record["step"], cpu_seconds=round(spent["cpu"], 2),
                     wall_seconds=round(spent["wall"], 2), accuracy=100 * score.accuracy,
                     accuracy_ci=100 * score.accuracy_ci, tasks=score.num_tasks,
                     train_loss=record.get("loss"))  # fmt: skip
        with curve_path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        print(f"step {entry['step']}: {entry['cpu_seconds'] / 60:.1f} CPU min, test "
              f"{entry['accuracy']:.2f}% ± {entry['accuracy_ci']:.2f}%", flush=True)  # fmt: skip
        clock.update(cpu=time.process_time(), wall=time.perf_counter())
        return spent["cpu"] >= budget

    state = init_state(experiment.algorithm, experiment.params, experiment.buffers,
                       experiment.optimizer)  # fmt: skip
    fit(experiment.algorithm, state, experiment.sample, optimizer=experiment.optimizer,
        epochs=config["steps"] // config["steps_per_epoch"], max_steps=config["steps"],
        steps_per_epoch=config["steps_per_epoch"],
        generator=torch.Generator().manual_seed(config["seed"]), val_tasks=None,
        val_steps=config["eval_inner_steps"], progress=False, callback=on_event,
        checkpoint_dir=out / "checkpoints", config=config, resume=resume)  # fmt: skip


def first_reaching(curve: list[dict[str, Any]], target: float) -> str:
    """CPU minutes at the first test score at or above ``target`` percent, or ``—``."""
    hit = next((r for r in curve if r["accuracy"] >= target), None)
    return f"{hit['cpu_seconds'] / 60:.1f} min (step {hit['step']})" if hit else "—"


def report() -> None:
    """The time-to-accuracy table (markdown) from every run under ``runs/time_to_accuracy``."""
    print(
        "| run | protocol | ways | queries | meta-batch | CPU min | steps | final test accuracy"
        " | first at marks (CPU min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for directory in sorted(RUNS.glob("*/curve.jsonl")):
        config = json.loads((directory.parent / "config.json").read_text())
        curve = [json.loads(x) for x in directory.read_text().splitlines() if x.strip()]
        if not curve:
            continue
        end, ways = curve[-1], config["ways"]
        marks = "; ".join(f"{t:g}%: {first_reaching(curve, t)}" for t in TARGETS.get(ways, ()))
        print(f"| {directory.parent.name} | {config.get('protocol', 'vinyals')} | {ways} | "
              f"{config['queries']} | {config['meta_batch_size']} | {end['cpu_seconds'] / 60:.1f}"
              f" | {end['step']} | {end['accuracy']:.2f}% ± {end['accuracy_ci']:.2f}% | {marks} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="run directory name under runs/time_to_accuracy")
    parser.add_argument("--report", action="store_true", help="print the table and exit")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--algorithm", default="maml")
    parser.add_argument("--protocol", choices=recipes.PROTOCOLS, default="vinyals")
    for key in ("ways", "shots", "queries", "meta_batch_size", "inner_steps",
                "eval_inner_steps", "val_tasks", "test_tasks"):  # fmt: skip
        parser.add_argument(f"--{key.replace('_', '-')}", type=int)
    parser.add_argument("--inner-lr", type=float)
    parser.add_argument("--meta-lr", type=float)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="CPU minutes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(ROOT / ".." / "shared" / "data" / "omniglot"))
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"))
    args = parser.parse_args()
    if args.report:
        report()
    elif not args.name:
        parser.error("--name is required to run")
    else:
        run(args)


if __name__ == "__main__":
    main()
