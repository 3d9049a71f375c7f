"""The benchmark scripts whose figures the docs quote run end to end (tiny settings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_shared_body_prints_one_row_per_setting():
    command = [sys.executable, str(ROOT / "benchmarks" / "shared_body.py"), "--meta-batch-size",
               "2", "--queries", "1", "--repeats", "1", "--inner-steps", "2"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 2 |")]
    assert [(name.strip(), strategy.strip()) for _, name, strategy, *_ in rows] == [
        ("anil", "loop"), ("anil (whole model)", "loop"), ("anil", "vmap"), ("maml", "loop"),
        ("maml", "vmap"),
    ]  # fmt: skip
    assert all(float(row[3]) > 0 and 0 < float(row[4].strip(" %")) <= 100 for row in rows)
