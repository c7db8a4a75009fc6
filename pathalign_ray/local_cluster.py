"""A multi-node Ray cluster on one machine, started with `ray start`: for tests and benchmarks of cluster jobs.

It ships in the package, not under tests/, for users as well: the README ("On a Ray cluster") offers it
to try `ray job submit` against two nodes on one machine before renting them.

Each node is a `ray start --block` child process with its own ports and its own --temp-dir, so
other Ray clusters on the machine are never touched. Stopping a node terminates only that child:
with --block it takes the node's Ray processes down with it (they share its fate through
PR_SET_PDEATHSIG), which `ray stop` would not do for one cluster alone: it stops every Ray
process on the machine.

Token authentication stays on: the cluster gets a fresh token through RAY_AUTH_TOKEN, and `ray`
commands run through `cli` send it, as a user's client would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

# A node's start on a loaded 2-core machine (three Ray clusters and a benchmark at once) took over 90 s.
NODE_START_S = 240.0
START_ATTEMPTS = 3  # a node's tries: `ray start` gives up after its own 30 s when a loaded machine is slow
STARTUP_TIMEOUT_MARK = "timed out during startup"  # what `ray start` then logs (ray/_private/node.py)

_WORKER_PORT_SPAN = 200  # ports per node for its worker processes, below the kernel's ephemeral range


@dataclass
class LocalNode:
    name: str
    process: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    log: Path | None = None


def _free_ports(n: int) -> list[int]:
    """n distinct ports that nothing listens on now (bound together, so none repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _free_range(span: int) -> int:
    """The first port of `span` consecutive free ports in 20000-32000."""
    for _ in range(50):
        start = random.randrange(20000, 32000 - span)
        try:
            with ExitStack() as stack:
                for port in range(start, start + span):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
    raise RuntimeError(f"no {span} consecutive free ports in 20000-32000")


class LocalCluster:
    """A head node and worker nodes started with `ray start` on 127.0.0.1, each in ROOT/NAME.

    The head runs the dashboard (job submission) at `dashboard_url`; `address` is its GCS.
    """

    def __init__(self, root: str | Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.token = secrets.token_hex(32)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # jobs run `python`: this one, with Ray and the project installed
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[LocalNode] = []
        self.address = ""
        self.dashboard_url = ""

    def start_head(self, num_cpus: int, resources: dict | None = None, timeout: float = NODE_START_S) -> LocalNode:
        for attempt in range(START_ATTEMPTS):
            gcs, dashboard, client = _free_ports(3)
            self.address, self.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
            head_args = [
                "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            ]  # fmt: skip
            node = self._start("head", head_args, num_cpus, resources, {"gcs": gcs, "dashboard": dashboard})
            if self._came_up(node, 1, timeout, last=attempt == START_ATTEMPTS - 1):
                break
        self._wait_for_dashboard(timeout)
        return node

    def add_node(self, num_cpus: int, resources: dict | None = None, timeout: float = NODE_START_S) -> LocalNode:
        name = f"worker{sum(n.name.startswith('worker') for n in self.nodes) + 1}"
        alive = len(self.alive_nodes())
        for attempt in range(START_ATTEMPTS):
            node = self._start(name, [f"--address={self.address}"], num_cpus, resources, {})
            if self._came_up(node, alive + 1, timeout, last=attempt == START_ATTEMPTS - 1):
                break
        return node

    def _came_up(self, node: LocalNode, alive: int, timeout: float, last: bool) -> bool:
        """Whether `node` joined (`alive` nodes ALIVE). False when `ray start` gave up on a slow machine (its own
        hard-coded 30 s wait for the raylet to register) and an attempt is left: that try's processes are killed."""
        try:
            self.wait_for_nodes(alive, timeout)
            return True
        except RuntimeError:
            gave_up = node.process.poll() is not None and STARTUP_TIMEOUT_MARK in node.log.read_text(errors="replace")
            if last or not gave_up:
                raise
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)  # its own session (start_new_session): its GCS, its raylet
        self.nodes.remove(node)
        return False

    def _start(self, name: str, role_args: list[str], num_cpus: int, resources: dict | None, ports: dict) -> LocalNode:
        names = ["node_manager", "object_manager", "agent_http", "agent_grpc", "metrics", "runtime_env_agent"]
        ports = {**ports, **dict(zip(names, _free_ports(len(names))))}
        ports["min_worker"] = _free_range(_WORKER_PORT_SPAN)
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(Path(sys.executable).with_name("ray")), "start", "--block", *role_args,
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}", f"--temp-dir={temp_dir}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
            f"--dashboard-agent-listen-port={ports['agent_http']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--min-worker-port={ports['min_worker']}", f"--max-worker-port={ports['min_worker'] + _WORKER_PORT_SPAN - 1}",
            "--object-store-memory=200000000", "--disable-usage-stats",
        ]  # fmt: skip
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = LocalNode(name, process, temp_dir, ports, log)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[LocalNode]:
        return [node for node in self.nodes if node.process.poll() is None]

    def remove_node(self, node: LocalNode, graceful: bool = False, timeout: float = 90) -> None:
        """Take one node away, SIGKILL (its Ray processes die with it, as when a machine is lost) or
        SIGTERM, and wait until the GCS counts it dead."""
        node.process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        node.process.wait(timeout=timeout)
        self.wait_for_nodes(len(self.alive_nodes()), timeout)

    def shutdown(self) -> None:
        """Stop every node this cluster started, workers first, each by its own process."""
        for node in reversed(self.alive_nodes()):
            node.process.terminate()
            try:
                node.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=30)

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """`ray ARGS` against this cluster's dashboard, with its token; output captured as text."""
        command = [str(Path(sys.executable).with_name("ray")), *args]
        result = subprocess.run(
            command,
            env={**self.env, "RAY_ADDRESS": self.dashboard_url},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def _get(self, path: str) -> dict:
        """GET a dashboard API path with the cluster's token: a cheap poll, where each `ray` CLI call costs ~3 s of CPU."""
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def node_table(self) -> list[dict]:
        """The GCS's view of the nodes: dicts with node_id, state, resources_total, ... (via the dashboard API)."""
        return self._get("/api/v0/nodes?limit=100")["data"]["result"]["result"]

    def job_status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, STOPPED or FAILED, from the job submission API."""
        return self._get(f"/api/jobs/{submission_id}")["status"]

    def wait_for_nodes(self, n: int, timeout: float) -> None:
        """Until n nodes are ALIVE in the GCS, or RuntimeError naming the node logs."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [
                node.name for node in self.nodes if node.process.poll() not in (None, -signal.SIGKILL, -signal.SIGTERM)
            ]
            if dead:
                raise RuntimeError(f"ray start exited for {dead}: see {self.root}/*.log")
            try:
                if self.dashboard_url and sum(row["state"] == "ALIVE" for row in self.node_table()) == n:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"fewer than {n} nodes alive after {timeout} s: see {self.root}/*.log")

    def _wait_for_dashboard(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.cli("job", "list", check=False, timeout=60).returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"the dashboard at {self.dashboard_url} does not answer job requests")

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
