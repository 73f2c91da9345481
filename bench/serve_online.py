"""The online endpoint (``fearec-dist serve``) under load, beside the in-process ``recommend``.

    .venv/bin/python bench/serve_online.py                     # 12,101, 10⁵ and 10⁶ items
    .venv/bin/python bench/serve_online.py --items 12101 --seconds 3

For each catalogue size a SASRec with random weights (d 64, L 50, 2 layers; built by
``bench/serve.py``'s ``build_export``, with an IVF index: HNSW takes minutes to build at 10⁵+
items on two shared cores) is exported, then

1. **in-process**: ``recommend(export, history, k=10)`` on one torch thread for 100 random
   histories (1..50 ids), exact and IVF: p50 / p99 ms, before Ray starts;
2. **online**: a local Ray instance (2 CPUs) runs the Serve application (one replica, 0.5 CPU,
   one torch thread) on 127.0.0.1, deployed twice per mode: with the default batching
   (``--max-batch-size 32``, 1 ms wait) and with ``--max-batch-size 1``; a load generator in
   this process (asyncio, one keep-alive HTTP/1.1 connection per simulated client) keeps
   ``concurrency`` requests in flight (1, 8, 32) for ``--seconds`` after a short warm-up and
   records p50 / p99 latency, requests/s, errors (any non-200 or a broken connection), CPU
   seconds per request of the Ray processes (GCS, raylet, Serve's controller, proxy and replica:
   every descendant of this process, from psutil) and of the load generator itself, and the
   1-minute load average before and after;
3. **swap** (12,101 items, exact, concurrency 8): the replica follows a pointer file (polled
   every 0.5 s); mid-run the pointer is switched to a second export: errors, p50 / p99 / max
   latency over the run and in the 2 s after the switch, and when answers changed export_id;
4. **direct ingress** (``--direct-items``, 12,101 by default): step 2 again in a second process
   whose Ray instance has ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (Ray 2.60, experimental): the
   replica runs its own HTTP server on 127.0.0.1 and the load goes to it, skipping Serve's
   Python proxy and its two actor calls per request (rows with ``"ingress": "direct"``).

Rows go to ``bench/results/serve_online.json`` as they are measured. The box has 2 cores that
other jobs share: the load average is in every row; compare rows taken under similar load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import MAX_LEN, build_export, latency, random_histories  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve_online.json"
SIZES = (12_101, 100_000, 1_000_000)
CONCURRENCY = (1, 8, 32)
N_HISTORIES = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive HTTP/1.1 connection; ``post`` returns (status, body bytes)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        if chunked:
            data = b""
            while (size := int((await self.reader.readline()).strip(), 16)) > 0:
                data += await self.reader.readexactly(size + 2)
            await self.reader.readline()
        else:
            data = await self.reader.readexactly(length)
        return int(status_line.split()[1]), data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def role_of(p: psutil.Process) -> str:
    """A Ray process's role, from the title Ray gives its workers (``ray::ProxyActor``…)."""
    cmd = " ".join(p.cmdline())
    for role in ("ProxyActor", "ServeReplica", "ServeController", "raylet", "gcs_server"):
        if role in cmd:
            return {"ServeReplica": "replica", "ProxyActor": "proxy"}.get(role, role)
    return "other"


def ray_cpu_seconds() -> dict[str, float]:
    """user + system CPU seconds of this process's descendants (the local Ray instance), by
    role (proxy, replica, ServeController, raylet, gcs_server, other)."""
    total: dict[str, float] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            role = role_of(p)
            total[role] = total.get(role, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return total


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


async def load(
    port: int,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    warmup_s: float = 0.5,
    on_answer=None,
) -> dict:
    """``concurrency`` clients send ``bodies`` round-robin for ``warmup_s`` + ``seconds``;
    the numbers cover the ``seconds`` after the warm-up."""
    clients = [Client(port) for _ in range(concurrency)]
    times: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds
    marks: dict = {}

    async def run(c: int) -> None:
        i = c
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                status, data = await clients[c].post("/recommend", bodies[i % len(bodies)])
            except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                status, data = -1, repr(err).encode()
                clients[c].close()
                clients[c] = Client(port)
            t1 = time.perf_counter()
            i += concurrency
            if t0 < measure_from:
                if t1 >= measure_from and not marks:
                    marks["cpu0"], marks["own0"] = ray_cpu_seconds(), time.process_time()
                continue
            if status != 200:
                errors.append(f"{status}: {data[:200]!r}")
            else:
                times.append(t1 - t0)
                if on_answer is not None:
                    on_answer(t1, t1 - t0, data)

    marks["cpu0"], marks["own0"] = ray_cpu_seconds(), time.process_time()
    await asyncio.gather(*(run(c) for c in range(concurrency)))
    elapsed = time.perf_counter() - measure_from
    cpu = cpu_delta(marks["cpu0"], ray_cpu_seconds())
    own = time.process_time() - marks["own0"]
    for c in clients:
        c.close()
    n = len(times) + len(errors)
    ms = np.array(times) * 1e3 if times else np.array([np.nan])
    return {
        "requests": n,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "req_per_s": round(n / elapsed, 1),
        "ray_cpu_ms_per_req": round(1e3 * sum(cpu.values()) / max(n, 1), 3),
        "ray_cpu_ms_per_req_by_role": {
            role: round(1e3 * v / max(n, 1), 3) for role, v in sorted(cpu.items())
        },
        "client_cpu_ms_per_req": round(1e3 * own / max(n, 1), 3),
    }


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def in_process(out: Path, n_items: int, histories: list[list[str]]) -> dict[str, dict]:
    from fearec_dist.serve.artifact import load_export

    export = load_export(str(out), with_index=True)
    rows = {}
    for mode, ann in (("exact", False), ("ivf", True)):
        load0 = loadavg()
        lat, _ = latency(export, histories[:100], ann=ann)
        rows[mode] = lat | {"load_avg_1m": [load0, loadavg()]}
        print(f"# in-process {n_items:,} {mode}: {lat}", flush=True)
    return rows


def deploy(config: dict, port: int) -> None:
    from fearec_dist.serve.online import build_app, start_app

    start_app(build_app(config, cpus_per_replica=0.5), "127.0.0.1", port, name="bench")


def replica_port(proxy_port: int) -> int:
    """The port the replica's own HTTP server (direct ingress) listens on, on 127.0.0.1."""
    for p in psutil.Process().children(recursive=True):
        if role_of(p) == "replica":
            for c in p.net_connections(kind="tcp"):
                listening = c.status == "LISTEN" and c.laddr.ip == "127.0.0.1"
                if listening and c.laddr.port != proxy_port:
                    return c.laddr.port
    raise RuntimeError("no replica listening on 127.0.0.1 (direct ingress off?)")


def bench_size(out, n_items, histories, base, port, args, emit) -> None:
    from ray import serve

    bodies = [json.dumps({"history": h, "k": 10}).encode() for h in histories]
    ingress = "direct" if args.direct_ingress else "proxy"
    runs = [(mode, ann, batch, 1.0) for mode, ann in (("exact", False), ("ivf", True))
            for batch in (32, 1)]  # fmt: skip
    if args.direct_ingress and n_items == min(args.items):  # the batch wait, exact
        runs += [("exact", False, 32, wait) for wait in args.wait_sweep]
    for mode, ann, batch, wait in runs:
        t0 = time.time()
        config = {"export": str(out), "ann": ann, "max_batch_size": batch}
        deploy(config | {"batch_wait_ms": wait}, port)
        deploy_s = round(time.time() - t0, 1)
        target = replica_port(port) if args.direct_ingress else port
        for conc in args.concurrency:
            load0 = loadavg()
            got = asyncio.run(load(target, bodies, conc, args.seconds))
            inproc = base[mode]
            emit(
                {
                    "n_items": n_items,
                    "mode": mode,
                    "ingress": ingress,
                    "max_batch_size": batch,
                    "batch_wait_ms": wait,
                    "concurrency": conc,
                    **got,
                    "in_process_p50_ms": inproc["p50_ms"],
                    "in_process_p99_ms": inproc["p99_ms"],
                    "overhead_p50_ms": round(got["p50_ms"] - inproc["p50_ms"], 2),
                    "deploy_s": deploy_s,
                    "load_avg_1m": [load0, loadavg()],
                }
            )
        serve.delete("bench")


def bench_swap(tmp: Path, out: Path, port: int, args, emit) -> None:
    """Concurrency 8 through a pointer-file swap to a second export (12,101 items, exact)."""
    from ray import serve

    other = tmp / "swap-target" / "export"
    build_export(other, 12_101, args.seed + 7, ())
    pointer = tmp / "current.json"
    pointer.write_text(json.dumps({"export": str(out)}))
    deploy({"follow": str(pointer), "poll_s": 0.5}, port)
    histories = random_histories(N_HISTORIES, 12_101, args.seed + 1)
    bodies = [json.dumps({"history": h, "k": 10}).encode() for h in histories]
    seen: list[tuple[float, float, str]] = []
    first_id: list[str] = []

    def on_answer(t: float, dt: float, data: bytes) -> None:
        export_id = json.loads(data)["export"]["export_id"]
        first_id.append(export_id) if not first_id else None
        seen.append((t, dt, export_id))

    async def run() -> dict:
        task = asyncio.ensure_future(load(port, bodies, 8, args.seconds * 2, on_answer=on_answer))
        await asyncio.sleep(0.5 + args.seconds)
        switched = time.perf_counter()
        pointer.write_text(json.dumps({"export": str(other)}))
        got = await task
        return got | {"switched": switched}

    load0 = loadavg()
    got = asyncio.run(run())
    switched = got.pop("switched")
    window = [dt * 1e3 for t, dt, _ in seen if switched <= t <= switched + 2]
    new = [t for t, _, e in seen if e != first_id[0]]
    emit(
        {
            "n_items": 12_101,
            "mode": "exact",
            "max_batch_size": 32,
            "concurrency": 8,
            "ingress": "proxy",
            "swap": True,
            **got,
            "swap_window_p50_ms": round(float(np.percentile(window, 50)), 2) if window else None,
            "swap_window_p99_ms": round(float(np.percentile(window, 99)), 2) if window else None,
            "swap_window_max_ms": round(max(window), 2) if window else None,
            "new_export_after_s": round(min(new) - switched, 2) if new else None,
            "answers_from_new_export": len(new),
            "load_avg_1m": [load0, loadavg()],
        }
    )
    serve.delete("bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, nargs="*", default=list(SIZES))
    p.add_argument("--concurrency", type=int, nargs="*", default=list(CONCURRENCY))
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    p.add_argument("--no-swap", action="store_true")
    p.add_argument(
        "--direct-items",
        type=int,
        nargs="*",
        default=[12_101],
        help="sizes also measured with direct ingress (a second Ray instance; none: skip)",
    )
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="(internal) this process measures RAY_SERVE_ENABLE_DIRECT_INGRESS=1",
    )
    p.add_argument(
        "--wait-sweep",
        type=float,
        nargs="*",
        default=[0.2, 2.0],
        help="direct ingress, smallest size, exact: also these batch waits (ms)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON rows go")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.direct_ingress:  # read by Serve in every Ray process, so set before Ray starts
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        # a deleted replica otherwise keeps draining for 30 s (for a load balancer to notice)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    stamp = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, shared",
        "torch": torch.__version__,
        "hidden_size": 64,
        "max_seq_len": MAX_LEN,
        "k": 10,
    }
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row | stamp)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        torch.set_num_threads(1)
        exports, histories, base = {}, {}, {}
        for n in args.items:  # exports and in-process numbers before Ray starts
            t0 = time.time()
            exports[n] = tmp / f"n{n}" / "export"
            manifest = build_export(exports[n], n, args.seed, ("ivf",))["manifest"]
            manifest = {k: v for k, v in manifest.items() if k not in ("uri", "indexes")} | {
                "index": manifest["indexes"]["ivf"]
            }
            (exports[n] / "manifest.json").write_text(json.dumps(manifest))
            histories[n] = random_histories(N_HISTORIES, n, args.seed + 1)
            base[n] = in_process(exports[n], n, histories[n])
            for mode, lat in base[n].items():
                if not args.direct_ingress:
                    emit({"n_items": n, "mode": mode, "in_process": True, **lat})
            print(f"# export at {n:,} items built in {time.time() - t0:.0f} s", flush=True)

        import ray
        from ray import serve

        from fearec_dist.launch import connect_ray

        connect_ray("local", num_cpus=2, dashboard=False)
        port = free_port()
        try:
            for n in args.items:
                t0 = time.time()
                bench_size(exports[n], n, histories[n], base[n], port, args, emit)
                print(f"# online at {n:,} items done in {time.time() - t0:.0f} s", flush=True)
            if not args.no_swap and not args.direct_ingress and 12_101 in exports:
                bench_swap(tmp, exports[12_101], port, args, emit)
        finally:
            serve.shutdown()
            ray.shutdown()
    if args.direct_items and not args.direct_ingress:
        # direct ingress: the replica serves HTTP itself (Ray 2.60, experimental), no proxy hop
        part = args.out.with_suffix(".direct.json")
        cmd = [sys.executable, __file__, "--direct-ingress", "--no-swap", "--out", str(part)]
        cmd += ["--items", *map(str, args.direct_items), "--seconds", str(args.seconds)]
        cmd += ["--concurrency", *map(str, args.concurrency), "--seed", str(args.seed)]
        cmd += ["--wait-sweep", *map(str, args.wait_sweep)]
        subprocess.run(cmd, check=True, timeout=900)
        for row in json.loads(part.read_text()):
            emit({k: v for k, v in row.items() if k not in stamp})
        part.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
