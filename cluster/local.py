"""A multi-node Ray cluster on one machine, on 127.0.0.1: a head, store nodes, decoder nodes.

* ``LocalCluster`` (``ray.cluster_utils.Cluster``) is for tests and benchmarks: nodes are
  separate raylets with their own object stores, so objects really move between nodes.
* ``specmoe cluster up --stores 2 --decoders 1`` / ``specmoe cluster down`` are for people: ``up``
  runs the same ``LocalCluster`` in a detached process and prints the head's address, so
  drivers can ``ray.init(address=...)``; ``down`` stops that process, which stops its nodes.
  (``ray start`` cannot be used: on this Ray it either refuses to add a node to a cluster on
  127.0.0.1 or moves every node to the machine's routable address.)

Store nodes carry the ``expert_store`` resource and decoder nodes the ``decoder`` resource;
actors that name them must use ``num_cpus=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STORE_RESOURCE = "expert_store"
DECODER_RESOURCE = "decoder"
HEAD_PORT = 6380
REPO = Path(__file__).resolve().parents[1]


def ray_env() -> None:
    """Keep Ray on the loopback address (a routable address can make a local driver hang).

    Ray reads the variable when it is imported; ``cluster/__init__.py`` sets it first."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@dataclass
class ClusterSpec:
    stores: int = 2
    decoders: int = 1
    head_cpus: int = 1
    decoder_cpus: int = 1
    object_store_mb: int = 256
    port: int | None = None  # the head's GCS port; None: any free port
    temp_dir: str | None = None  # Ray's files; None: Ray's default

    def __post_init__(self):
        if self.stores < 1 or self.decoders < 0:
            raise ValueError(f"need stores >= 1 and decoders >= 0, got {self.stores} and {self.decoders}")
        if self.object_store_mb < 80:
            raise ValueError(f"object_store_mb must be >= 80 (Ray's minimum), got {self.object_store_mb}")


class LocalCluster:
    """Head + ``stores`` store nodes + ``decoders`` decoder nodes, and a driver connected to it."""

    def __init__(self, spec: ClusterSpec | None = None, connect: bool = True):
        self.spec = spec or ClusterSpec()
        self.connect = connect
        self.cluster = None

    def __enter__(self) -> LocalCluster:
        ray_env()
        import ray
        from ray.cluster_utils import Cluster

        s = self.spec
        node = {"object_store_memory": s.object_store_mb * 2**20, "node_ip_address": "127.0.0.1"}
        if s.temp_dir is not None:
            node["temp_dir"] = s.temp_dir
        head = node | {"num_cpus": s.head_cpus, "include_dashboard": False}
        if s.port is not None:
            head["gcs_server_port"] = s.port
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.store_nodes = [
            self.cluster.add_node(num_cpus=0, resources={STORE_RESOURCE: 1}, **node) for _ in range(s.stores)
        ]
        self.decoder_nodes = [
            self.cluster.add_node(num_cpus=s.decoder_cpus, resources={DECODER_RESOURCE: 1}, **node)
            for _ in range(s.decoders)
        ]
        self.cluster.wait_for_nodes()
        if self.connect:
            ray.init(address=self.cluster.address, include_dashboard=False, log_to_driver=False)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()

    @property
    def address(self) -> str:
        return self.cluster.address


def cluster_dir(port: int) -> Path:
    """The files of the cluster whose head listens on ``port``: its state, its log, Ray's files.

    Every process of that cluster names this folder on its command line, which is how
    ``cluster_down`` finds them, and only them (``ray stop`` stops every Ray node of the machine).
    """
    return Path(tempfile.gettempdir()) / f"specmoe-ray-{port}"


def cluster_processes(port: int) -> list[int]:
    """Process ids of the cluster ``cluster_up(port=port)`` started (Linux: reads /proc)."""
    marker = f"{cluster_dir(port)}{os.sep}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # it exited meanwhile, or is not ours to read
            continue
    return pids


def cluster_up(spec: ClusterSpec, port: int = HEAD_PORT, timeout_s: float = 180.0) -> str:
    """Start ``LocalCluster(spec)`` in a detached process with its head on ``port``; returns the address."""
    root = cluster_dir(port)
    if cluster_processes(port):
        raise ValueError(f"a cluster started by `specmoe cluster up --port {port}` is running; stop it first "
                         f"with `specmoe cluster down --port {port}`, or choose another --port")
    root.mkdir(parents=True, exist_ok=True)
    state, log = root / "cluster.json", root / "up.log"
    state.unlink(missing_ok=True)
    spec = ClusterSpec(**(asdict(spec) | {"port": port, "temp_dir": str(root / "ray")}))
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.local", "--serve", json.dumps(asdict(spec)), str(state), str(root)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while not state.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            cluster_down(port)
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"the cluster did not come up (log: {log}):\n" + "\n".join(tail))
        time.sleep(0.5)
    return json.loads(state.read_text())["address"]


def serve(spec: ClusterSpec, state: Path) -> None:
    """Run the cluster until SIGTERM or SIGINT (the body of ``cluster_up``'s detached process)."""
    stop = threading.Event()
    # Ray records the latest cluster's address in its default folder even when the nodes use
    # another one, and fails if that folder does not exist yet (a fresh machine)
    (Path(tempfile.gettempdir()) / "ray").mkdir(exist_ok=True)
    with LocalCluster(spec, connect=False) as cluster:
        for sig in (signal.SIGTERM, signal.SIGINT):  # after the nodes: Ray's own handler would drain and exit
            signal.signal(sig, lambda *_: stop.set())
        state.write_text(json.dumps({"address": cluster.address, "pid": os.getpid(), "spec": asdict(spec)}))
        stop.wait()


def cluster_down(port: int = HEAD_PORT, grace_s: float = 30.0) -> int:
    """Stop the cluster ``cluster_up(port=port)`` started; returns how many processes were running.

    Its serving process shuts the nodes down; whatever is left after ``grace_s`` is killed, by id.
    """
    pids = cluster_processes(port)
    state = cluster_dir(port) / "cluster.json"
    server = json.loads(state.read_text())["pid"] if state.exists() else None
    if server in pids:
        _signal(server, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in cluster_processes(port):
        _signal(pid, signal.SIGKILL)
    state.unlink(missing_ok=True)
    return len(pids)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has not reaped it yet


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start a head, store nodes and decoder nodes on 127.0.0.1")
    up.add_argument("--stores", type=int, default=2)
    up.add_argument("--decoders", type=int, default=1)
    up.add_argument("--object-store-mb", type=int, default=512, help="object store of every node")
    up.add_argument("--head-cpus", type=int, default=1)
    up.add_argument("--decoder-cpus", type=int, default=1, help="CPUs of every decoder node (store nodes have none)")
    up.add_argument("--port", type=int, default=HEAD_PORT)
    down = sub.add_parser("down", help="stop the nodes that `specmoe cluster up` started (on the same --port)")
    down.add_argument("--port", type=int, default=HEAD_PORT)


def run_cluster(args: argparse.Namespace) -> int:
    if args.action == "down":
        stopped = cluster_down(args.port)
        print(f"[specmoe] cluster on port {args.port}: " + (f"stopped ({stopped} processes)" if stopped else "none running"),
              file=sys.stderr)
        return 0
    spec = ClusterSpec(stores=args.stores, decoders=args.decoders, head_cpus=args.head_cpus,
                       decoder_cpus=args.decoder_cpus, object_store_mb=args.object_store_mb)
    address = cluster_up(spec, args.port)
    print(f"[specmoe] cluster up at {address}: {spec.stores} store node(s), {spec.decoders} decoder node(s); "
          f"`specmoe cluster down --port {args.port}` stops it", file=sys.stderr)
    print(address)
    return 0


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--serve":
    # argv: --serve SPEC_JSON STATE_FILE CLUSTER_DIR (the last one only marks this process as the cluster's)
    serve(ClusterSpec(**json.loads(sys.argv[2])), Path(sys.argv[3]))
