"""`make demo` as a new user runs it: a fresh clone, the install timed apart from the demo, then a screenshot
of the report in headless Chromium.

    .venv/bin/python bench/demo.py [--clone-to /tmp/pathalign_demo] [--keep]

Clones the committed HEAD (uncommitted changes are not measured), runs `make install` (and the
DeepSpeed op warm-up it triggers) and then `make demo` in the clone, reads the clone's runs/demo/demo.json
and writes bench/results/demo.json (wall_s without the install, install_s, plausibility before and
after on held-out noise with their 95% intervals, labels) and bench/results/demo_report.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from bench_common import RESULTS_DIR, write_result

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True)
    return time.perf_counter() - started


def screenshot(report: Path, out: Path) -> None:
    """A full-page PNG of report.html in headless Chromium (Debian's; `make browser` installs it)."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(report.resolve().as_uri())
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clone-to", default="/tmp/pathalign_demo", help="where the fresh clone goes (replaced)")
    parser.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    args = parser.parse_args()
    clone = Path(args.clone_to)
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    install_s = timed(["make", ".venv/.deepspeed-ops"], clone)
    wall_s = timed(["make", "demo"], clone)
    summary = json.loads((clone / "runs" / "demo" / "demo.json").read_text())
    screenshot(clone / "runs" / "demo" / "report.html", RESULTS_DIR / "demo_report.png")
    figures = {
        "commit": commit,
        "wall_s": wall_s,
        "install_s": install_s,
        "plausibility_before": summary["before"]["plausibility"],
        "plausibility_before_ci": summary["before"]["plausibility_ci"],
        "plausibility_after": summary["after"]["plausibility"],
        "plausibility_after_ci": summary["after"]["plausibility_ci"],
        "plausibility_gain_pp": summary["plausibility_gain_pp"],
        "labels": summary["labels"],
        "summary": summary,
    }
    write_result("demo", figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "summary"}, indent=2))
    if not args.keep:
        shutil.rmtree(clone, ignore_errors=True)


if __name__ == "__main__":
    main()
