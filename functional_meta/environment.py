"""What a run ran on, recorded beside its results: CPU model, threads, torch, device, and
the code version."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["code_version", "cpu_name", "describe_machine"]


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """``{"cpu", "logical_cpus", "threads", "torch", "python", "device"}`` (plus ``"gpu"``,
    the card's name, on CUDA): plain values, ready for JSON."""
    device = torch.device(device)
    described: dict[str, Any] = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def code_version() -> str:
    """The git commit of the checkout this package runs from (``+ uncommitted changes`` when
    ``functional_meta/`` differs from it), else the installed package version."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=source, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"functional-meta {version('functional-meta')}"
        except PackageNotFoundError:
            return "unknown"
    return commit + (" + uncommitted changes" if dirty else "")
