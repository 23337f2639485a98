"""Run every benchmark in one command: the micro benchmarks (pytest-benchmark, msgnet
beside its baselines, grouped) and then the end-to-end comparison (benchmarks/e2e.py).

    python -m benchmarks [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    micro = [sys.executable, "-m", "pytest", str(HERE), "--benchmark-only", "-q",
             "-p", "no:cacheprovider", "--benchmark-columns=median,ops,rounds",
             "--benchmark-sort=name", "-o", "python_files=bench_*.py"]
    if quick:
        micro += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
    status = subprocess.call(micro, cwd=HERE.parent)
    e2e = [sys.executable, "-m", "benchmarks.e2e"] + (["--quick"] if quick else [])
    status = status or subprocess.call([*e2e[:2], "benchmarks.reliable", *e2e[3:]], cwd=HERE.parent)
    return status or subprocess.call(e2e, cwd=HERE.parent)


if __name__ == "__main__":
    sys.exit(main())
