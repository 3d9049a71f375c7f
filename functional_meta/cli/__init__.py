"""The command line: ``python -m functional_meta`` (or the ``functional-meta`` script).

``functional-meta`` with no arguments runs ``train`` with its defaults: MAML on the
sinusoid task (MLP 1-40-40-1, K = 10, inner lr 0.01, meta-batch 25, Adam 1e-3), printing
the test MSE on 600 fixed tasks after 0, 1 and 10 inner steps before and after
meta-training, and leaving checkpoints, metrics and figures in ``runs/default``.

Under ``torchrun --nproc_per_node=N -m functional_meta train ...`` training runs
data-parallel over tasks (see :mod:`functional_meta.distributed` and docs/scaling.md): each
rank takes its share of every meta-batch, meta-gradients and metrics are averaged, and only
rank 0 prints and writes checkpoints, metrics and plots.

``functional-meta evaluate RUN_DIR_OR_CHECKPOINT`` scores a checkpoint on the test tasks;
``functional-meta train --config RUN/config.json`` repeats a run (:mod:`~functional_meta.cli.replay`).
Modules: :mod:`~functional_meta.cli.arguments` (parser, defaults, checks),
:mod:`~functional_meta.cli.train`, :mod:`~functional_meta.cli.evaluate` and
:mod:`~functional_meta.cli.report` (tables, JSON, figures), :mod:`~functional_meta.cli.replay`.
Bad arguments exit with status 2 and one line on stderr; data and checkpoint errors with
status 1 and one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from functional_meta.cli.arguments import PROG, UsageError, build_parser

__all__ = ["PROG", "UsageError", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m functional_meta`` and ``functional-meta``; returns the
    exit status (0 success, 1 a data/checkpoint/numerical error, 2 a bad argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate", "-h", "--help", "--version"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    from functional_meta.cli.evaluate import cmd_evaluate
    from functional_meta.cli.train import cmd_train
    from functional_meta.distributed import DistributedError
    from functional_meta.validation import NonFiniteError

    try:
        if args.command == "train" and args.config is not None:  # --config: repeat that run
            from functional_meta.cli.replay import replay_argv

            args = build_parser().parse_args(replay_argv(args.config, args, argv[1:]))
        return cmd_train(args) if args.command == "train" else cmd_evaluate(args)
    except UsageError as error:
        print(f"{PROG}: error: {error} (see {PROG} {args.command} --help)", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError, KeyError, NonFiniteError, DistributedError) as error:
        if os.environ.get("FUNCTIONAL_META_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
