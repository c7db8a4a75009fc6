"""Progress bars: a Ray worker's progress reaches the driver's console."""

from __future__ import annotations

import time

import pytest


@pytest.mark.ray
def test_a_workers_progress_reaches_the_drivers_bar(ray_cluster, capsys):
    from pathalign_ray.progress import report_progress, watch

    @ray_cluster.remote(num_cpus=0)
    def work(steps: int) -> None:
        for step in range(1, steps + 1):
            report_progress("tiny stage", step, f"loss {1 / step:.2f}")
            time.sleep(0.05)

    with watch("tiny stage", 6, every_s=0.02):
        ray_cluster.get(work.remote(6))
    shown = capsys.readouterr().err
    assert "tiny stage" in shown and "6/6" in shown and "loss 0.17" in shown
    with watch("tiny stage", 2, every_s=0.02):  # watched again: starts from 0, not from the 6 above
        ray_cluster.get(work.remote(2))
    assert "2/2" in capsys.readouterr().err
