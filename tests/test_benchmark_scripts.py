"""The benchmark scripts whose figures the docs quote run end to end (tiny settings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_shared_body_prints_one_row_per_algorithm_and_strategy():
    command = [sys.executable, str(ROOT / "benchmarks" / "shared_body.py"),
               "--meta-batch-size", "2", "--queries", "1", "--repeats", "1"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if line.startswith(("| anil", "| maml"))]
    assert [row.split("|")[1:3] for row in rows] == [
        [" anil ", " loop "], [" anil ", " vmap "], [" maml ", " loop "], [" maml ", " vmap "]
    ]  # fmt: skip
    assert all(float(row.split("|")[3]) > 0 for row in rows)
