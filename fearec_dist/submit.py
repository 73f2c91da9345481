"""`fearec-dist submit`: the job client. Checks a config here, then hands the run to a Ray
cluster's Jobs API.

Owns the address, the auth token, the ``ray job submit`` call and waiting (Jobs REST API, log
stream); the pure plan (checks, entrypoint, runtime env) is ``submit_plan.py``.

    fearec-dist submit jobs/configs/demo.yaml --address http://127.0.0.1:8265
    fearec-dist submit jobs/configs/beauty-s3.yaml --workers 4 --gpu --no-wait
    fearec-dist submit jobs/configs/sweep-beauty-s3.yaml --tune jobs/spaces/fearec.yaml
    fearec-dist submit jobs/configs/demo.yaml --dry-run      # print the command, submit nothing

In order:
1. Load the config with the ``--set`` overrides and check the model section (and the search
   space), so a misspelt key fails here in seconds, not minutes later on the cluster.
2. Build ``python -m fearec_dist train|tune --config <path inside the working dir> --set …``: the
   job loads the same file with the same overrides (plus ``--workers``/``--gpu`` and a run name).
3. Build the runtime env: ``working_dir`` ships the package source and ``jobs/``; ``--deps pip``
   also installs the pinned dependencies from ``pyproject.toml`` in a per-job virtualenv.
4. Run ``ray job submit --no-wait`` (the real CLI). The auth token travels in the environment
   (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH``), never on a command line or in a file here.
5. Print the job id and how to follow it; unless ``--no-wait``, stream its logs and wait.

Exit codes: 0 submitted (``--no-wait``) or SUCCEEDED; 1 the job FAILED or was STOPPED; 2 config
or usage error; 3 the cluster refused or could not take the submission; 4 still running at
``--timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fearec_dist.config import ConfigError, add_set_argument
from fearec_dist.submit_plan import SubmitError, plan_job

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

EPILOG = """\
The token comes from --token-path, else $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token, and reaches `ray job submit` through its environment only.
--deps cluster (default): the cluster has the dependencies already; only the source ships
  (offline-safe, starts at once). --deps pip: also pip-install pyproject's pinned dependencies
  (minus ray) per job on every node (needs a package index). See docs/cluster.md.
"""


@dataclass
class AuthToken:
    """How the token reaches the ``ray`` CLI: variables to set and to drop in its environment."""

    set_env: dict[str, str] = field(default_factory=dict)
    drop_env: tuple[str, ...] = ()
    token: str | None = None  # kept in memory only, for the status requests
    source: str = "none"  # where it came from, for messages (never the token itself)


@dataclass
class SubmitPlan:
    """Everything ``ray job submit`` needs; printed as is by ``--dry-run``."""

    command: list[str]
    address: str
    job_id: str
    auth: AuthToken
    outputs: str
    notes: list[str] = field(default_factory=list)

    def child_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if environ is None else environ)
        for key in self.auth.drop_env:
            env.pop(key, None)
        env.update(self.auth.set_env)
        return env


# --------------------------------------------------------------------------------------------------
# arguments


def build_submit_parser(sub: Any = None) -> argparse.ArgumentParser:
    """The ``submit`` parser: standalone, or registered on the CLI's subparsers when given."""
    kwargs: dict[str, Any] = {
        "description": "Validate the config locally, then submit `python -m fearec_dist "
        "train|tune` with the package as the job's working dir; print the job id and how to "
        "follow its logs.",
        "epilog": EPILOG,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    if sub is None:
        p = argparse.ArgumentParser(prog="fearec-dist submit", **kwargs)
    else:
        p = sub.add_parser("submit", help="submit a train or tune job to a Ray cluster", **kwargs)
    p.add_argument("config", help="experiment YAML inside the working dir, e.g. jobs/configs/…")
    p.add_argument(
        "--address",
        help="the cluster's Jobs API (dashboard) URL; default $RAY_API_SERVER_ADDRESS, else "
        f"$RAY_ADDRESS when it is http(s), else {DEFAULT_ADDRESS}",
    )
    p.add_argument("--tune", metavar="SPACE", help="run a sweep over this search-space YAML")
    p.add_argument("--workers", type=int, help="training workers per run (run.workers)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", action="store_true", help="one GPU per worker (run.use_gpu=true)")
    gpu.add_argument("--cpu", action="store_true", help="CPU workers only (run.use_gpu=false)")
    add_set_argument(p, "config override, checked here and passed to the job (repeatable)")
    p.add_argument("--token-path", help="file holding the cluster's auth token")
    p.add_argument("--working-dir", default=".", help="directory shipped to the job (default .)")
    p.add_argument("--deps", choices=("cluster", "pip"), default="cluster", help="see below")
    p.add_argument("--runtime-env-json", metavar="JSON", help="merged into the runtime env")
    p.add_argument("--python", default="python", help="interpreter on the cluster (default python)")
    p.add_argument("--submission-id", help="job id (default fearec-<train|tune>-<config>-<time>)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds to wait (0 = no limit)")
    p.add_argument("--quiet", action="store_true", help="wait without streaming the job's logs")
    p.add_argument("--dry-run", action="store_true", help="print the ray command; submit nothing")
    return p


# --------------------------------------------------------------------------------------------------
# building the plan


def resolve_address(address: str | None, environ: Mapping[str, str]) -> str:
    """The Jobs API URL; a bare ``host:port`` gets ``http://``."""
    addr = address or environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not addr and environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        addr = environ["RAY_ADDRESS"]
    addr = (addr or DEFAULT_ADDRESS).rstrip("/")
    return addr if "://" in addr else f"http://{addr}"


def head_is_this_machine(address: str, token: str | None) -> bool:
    """True when the head runs here. A loopback address is not enough: an SSH tunnel (``ray
    dashboard``) or ``kubectl port-forward`` looks the same, so the head's IP (state API) must be
    one of this machine's too. If the API cannot tell, a loopback address counts as local."""
    if (urlparse(address).hostname or "") not in LOCAL_HOSTS:
        return False
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{address}/api/v0/nodes?detail=true", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            nodes = json.load(response)["data"]["result"]["result"]
        head_ip = next(n["node_ip"] for n in nodes if n.get("is_head_node"))
    except (OSError, ValueError, KeyError, StopIteration):
        return True
    ours = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        ours |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 80))  # no packet is sent; picks the outbound interface
        ours.add(s.getsockname()[0])
    return head_ip in ours


def resolve_token(token_path: str | None, environ: Mapping[str, str]) -> AuthToken:
    """Finds the token as Ray does ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token),
    unless ``--token-path`` names one; a named file that is missing or empty is an error."""
    if not token_path and environ.get("RAY_AUTH_TOKEN", "").strip():
        token = environ["RAY_AUTH_TOKEN"].strip()
        return AuthToken({"RAY_AUTH_MODE": "token"}, (), token, "$RAY_AUTH_TOKEN")
    if token_path:
        label, raw, required = "--token-path", token_path, True
    elif environ.get("RAY_AUTH_TOKEN_PATH"):
        label, raw, required = "$RAY_AUTH_TOKEN_PATH", environ["RAY_AUTH_TOKEN_PATH"], True
    else:
        label, raw, required = "default path", str(DEFAULT_TOKEN_PATH), False
    path = Path(raw).expanduser().resolve()
    token = path.read_text().strip() if path.is_file() else ""
    if not token:
        if required:
            raise SubmitError(f"{label} {path}: no such file, or it is empty")
        return AuthToken()
    # RAY_AUTH_TOKEN would take precedence over the path in the child, so it is dropped there.
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}
    return AuthToken(env, ("RAY_AUTH_TOKEN",), token, f"{label} {path}")


def ray_cli() -> str:
    """The ``ray`` next to this interpreter (same version as the package), else the PATH's."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise SubmitError("the `ray` CLI is not installed (pip install 'ray[default]')")
    return found


def build_plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SubmitPlan:
    """Validates the config and returns the submission; sends nothing (one read-only query
    when the address is loopback, to tell a local head from a tunnel)."""
    environ = os.environ if environ is None else environ
    address = resolve_address(args.address, environ)
    auth = resolve_token(args.token_path, environ)
    job = plan_job(args, head_is_this_machine(address, auth.token))
    command = [
        ray_cli(), "job", "submit",
        "--address", address,
        "--submission-id", job.job_id,
        "--working-dir", str(job.working_dir),
        "--runtime-env-json", json.dumps(job.runtime_env),
        "--no-wait",
        "--", *job.entrypoint,
    ]  # fmt: skip
    return SubmitPlan(command, address, job.job_id, auth, job.outputs, job.notes)


# --------------------------------------------------------------------------------------------------
# submitting and waiting


def job_status(plan: SubmitPlan, timeout: float = 10.0) -> str:
    """The job's status from the Jobs REST API (``GET /api/jobs/<id>``), token in the header."""
    headers = {"Authorization": f"Bearer {plan.auth.token}"} if plan.auth.token else {}
    request = urllib.request.Request(f"{plan.address}/api/jobs/{plan.job_id}", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return str(json.load(response)["status"])


def wait_for_job(plan: SubmitPlan, timeout: float, follow_logs: bool) -> str:
    """Streams ``ray job logs --follow`` (until the job ends) and then polls its status; returns
    the terminal status, or the last one seen when ``timeout`` (> 0) runs out first."""
    deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
    left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
    if follow_logs:
        cmd = [ray_cli(), "job", "logs", "--follow", "--address", plan.address, plan.job_id]
        follower = subprocess.Popen(cmd, env=plan.child_env())
        try:
            follower.wait(timeout=None if timeout <= 0 else left())
        except subprocess.TimeoutExpired:
            pass  # the job keeps running; only the log stream stops
        finally:
            if follower.poll() is None:
                follower.terminate()
                try:
                    follower.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    follower.kill()
    status = "UNKNOWN"
    while True:
        try:
            status = job_status(plan)
        except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
            print(f"[fearec-dist] status check failed ({err}); retrying", file=sys.stderr)
        if status in TERMINAL or left() <= 0:
            return status
        time.sleep(min(2.0, left()))


def _print_next_steps(plan: SubmitPlan) -> None:
    a = shlex.quote(plan.address)
    print(f"[fearec-dist] submitted job {plan.job_id} to {plan.address}")
    print(f"  follow logs: ray job logs --follow --address {a} {plan.job_id}")
    print(f"  status:      ray job status --address {a} {plan.job_id}")
    print(f"  stop:        ray job stop --address {a} {plan.job_id}")
    if "RAY_AUTH_TOKEN_PATH" in plan.auth.set_env:
        path = shlex.quote(plan.auth.set_env["RAY_AUTH_TOKEN_PATH"])
        print(f"  (token: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={path} first)")
    elif plan.auth.token:
        print("  (token: export RAY_AUTH_MODE=token; RAY_AUTH_TOKEN is already set)")
    print(f"  outputs:     {plan.outputs}")
    sys.stdout.flush()


def run_submit(args: argparse.Namespace) -> int:
    """The ``submit`` command; returns the exit code (see the module docstring)."""
    try:
        plan = build_plan(args)
    except ConfigError as err:
        print(f"fearec-dist submit: config error: {err}", file=sys.stderr)
        return 2
    except (SubmitError, FileNotFoundError) as err:
        print(f"fearec-dist submit: error: {err}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"[fearec-dist] {note}", file=sys.stderr)
    if not plan.auth.token:
        print(
            "[fearec-dist] warning: no auth token found (--token-path, $RAY_AUTH_TOKEN, "
            "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); a cluster with token auth refuses this",
            file=sys.stderr,
        )
    if args.dry_run:
        print(shlex.join(plan.command))
        names = " ".join(f"{k}={v}" for k, v in plan.auth.set_env.items())
        print(f"# environment: {names or '(no token: no auth variables)'}")
        return 0
    print(f"[fearec-dist] submitting {plan.job_id} (token from {plan.auth.source})", flush=True)
    try:  # uploading the working dir is the slow part; 5 minutes is plenty
        done = subprocess.run(
            plan.command, env=plan.child_env(), capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        print(f"fearec-dist submit: no answer from {plan.address} in 300 s", file=sys.stderr)
        return 3
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        errors = [ln for ln in lines if "Error" in ln and not ln.startswith(" ")] or lines[-6:]
        print(
            "fearec-dist submit: ray job submit failed:\n" + "\n".join(errors[-3:]), file=sys.stderr
        )
        return 3
    _print_next_steps(plan)
    if args.no_wait:
        return 0
    try:
        status = wait_for_job(plan, args.timeout, follow_logs=not args.quiet)
    except KeyboardInterrupt:
        print(f"\n[fearec-dist] stopped waiting; job {plan.job_id} keeps running")
        return 130
    print(f"[fearec-dist] job {plan.job_id}: {status}")
    if status == "SUCCEEDED":
        print(f"[fearec-dist] outputs in {plan.outputs}")
        return 0
    if status in ("FAILED", "STOPPED"):
        return 1
    print(f"[fearec-dist] still {status} after {args.timeout:.0f} s; the job keeps running")
    return 4


def main(argv: list[str] | None = None) -> int:
    return run_submit(build_submit_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
