"""Subprocess half of ``test_multinode.py``: a real 2-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: two raylets, two object stores, one GCS), one train worker per
node, a few FEARec steps through ``run_training(mode="cluster")``.

Run as ``python multinode_run.py STORAGE OUT_JSON [section.key=value ...]`` with its own
``RAY_TMPDIR``. Writes to OUT_JSON: ``results`` (the run's results.json), ``nodes`` (node id ->
``node_a`` / ``node_b``) and ``worker_nodes`` (the node each train worker actor ran on). Both
nodes hold one ``slot`` and each worker asks for one (``run.worker_resources``), so the two
workers can only be placed on two different nodes.
"""

from __future__ import annotations

import json
import socket
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(storage: str, out_path: str, overrides: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from fearec_dist.config import load_config
    from fearec_dist.train.trainer import run_training

    # 2 logical CPUs a node: a worker takes 0.25, and Ray Data's ListFiles tasks take a whole CPU
    # (on 1-CPU nodes the eval datasets' listing never fits beside a worker and the run hangs).
    node = {"num_cpus": 2, "object_store_memory": 100 * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node,
            "resources": {"node_a": 1, "slot": 1},
            # Fixed default ports would collide with other Ray instances on this machine.
            "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(),
        },
    )
    try:
        cluster.add_node(**node, resources={"node_b": 1, "slot": 1})
        cluster.wait_for_nodes(timeout=60)
        # Name this cluster's State API for Train's placement-group cleaner, and query it by
        # address below: auto-detection could pick another Ray instance on this machine.
        api = f"http://{cluster.webui_url}"
        ray.init(
            address=cluster.address,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}},
        )
        nodes = {
            n["NodeID"]: next(k for k in ("node_a", "node_b") if k in n["Resources"])
            for n in ray.nodes()
            if n["Alive"]
        }
        cfg = load_config(
            None,
            [f"run.storage_path={storage}", "run.worker_resources={slot: 1}", *overrides],
        )
        results = run_training(cfg, mode="cluster")  # joins the initialized cluster
        workers = list_actors(
            address=api,
            filters=[("class_name", "=", "RayTrainWorker")],
            detail=True,
            raise_on_missing_output=False,
        )
        out = {
            "results": results,
            "nodes": nodes,
            "worker_nodes": [nodes.get(w.node_id, w.node_id) for w in workers],
        }
        with open(out_path, "w") as f:
            json.dump(out, f, default=str)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
