"""Fault tests on real Ray clusters, timed: bench/results/faults.json and BENCHMARKS.md ("Faults").

    .venv/bin/python bench/faults.py

Runs, with pytest and outside CI (so the slow ones run too):
  (b) tests/test_serve_faults.py: a reward replica SIGKILLed under load; failed requests and recovery time;
  (c) tests/test_cluster.py: a submitted job stopped with `ray job stop`, submitted again, resumed;
  (d) tests/test_cluster.py: a worker node SIGKILLed mid-run with its run and checkpoints on the bucket, a
      replacement node added, the run resumed from the bucket and finished;
  (e) tests/test_cluster.py: a job's S3 server stopped mid-run: the job fails naming the bucket and key, and
      sent again once the server is back it resumes from the bucket's checkpoint;
and, since they share the two-node cluster, the multi-node `ray job submit` test. (a) is
tests/test_finetune.py's killed Ray Train worker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_result

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_serve_faults.py", "tests/test_cluster.py"]


def run_tests(report: Path) -> float:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    command = [sys.executable, "-m", "pytest", *TESTS, "-q", f"--junitxml={report}", "-o", "junit_logging=system-out"]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=False)
    return time.perf_counter() - started


def read_report(report: Path) -> dict:
    """test name -> {"outcome", "wall_s"}, plus the serve fault's request counts from its printed line."""
    tests = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        outcome = "skipped" if case.find("skipped") is not None else "failed" if failed else "passed"
        tests[case.get("name")] = {"outcome": outcome, "wall_s": round(float(case.get("time")), 1)}
        out = case.findtext("system-out") or ""
        if match := re.search(r"(\d+) requests, (\d+) failed, replica back after ([\d.]+) s", out):
            requests, failed_requests, back = int(match.group(1)), int(match.group(2)), float(match.group(3))
            tests[case.get("name")].update(requests=requests, failed_requests=failed_requests,
                                           failed_share=failed_requests / requests, replica_back_s=back)  # fmt: skip
    return tests


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.xml"
        wall = run_tests(report)
        tests = read_report(report)
    for name, row in tests.items():
        print(f"{row['outcome']:>7} {row['wall_s']:7.1f} s  {name}")
    path = write_result("faults", {"tests": tests, "total_wall_s": round(wall, 1)})
    print(f"wrote {path}")
    if any(row["outcome"] != "passed" for row in tests.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
