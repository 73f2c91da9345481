"""The plan of a submission, with no network and no job client: config -> what the job runs.

Owns the checks (``validate``: the config loaded exactly as the job will load it, its model
section and the search space), the paths a remote job cannot see (``path_fixes``), the runtime
env (``build_runtime_env``: what ships, which dependencies install) and ``plan_job``: the
entrypoint (``python -m fearec_dist train|tune --config … --set …``), the job id and where its
outputs land. ``submit.py`` (the job client) adds the address, the token and the ``ray`` CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fearec_dist.config import ExperimentConfig, deep_merge, load_config
from fearec_dist.storage import is_remote

# Never shipped: VCS data, the local venv and local outputs (.gitignore is honoured as well).
EXCLUDES = [".git", ".venv", "runs/", "sweeps/", "prepared/", "__pycache__"]


class SubmitError(RuntimeError):
    """A usage problem found before anything is sent (bad path, missing token file…)."""


@dataclass
class JobPlan:
    """What the job runs and where its outputs land; pure data, nothing sent yet."""

    entrypoint: list[str]
    runtime_env: dict[str, Any]
    working_dir: Path
    job_id: str
    outputs: str
    notes: list[str] = field(default_factory=list)


def _inside(path: str, root: Path, what: str) -> str:
    p = Path(path).resolve()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(
            f"{what} {path} is not inside the working dir {root}: the job only sees files "
            "shipped with --working-dir"
        ) from None


def path_fixes(
    cfg: ExperimentConfig, kind: str, local: bool, root: Path, notes: list[str]
) -> list[str]:
    """Relative paths in the config resolve inside the job's copy of the working dir, which Ray
    deletes later. On a local head they are made absolute; for a remote cluster, a warning."""
    keys = {
        "data.path": cfg.data.path if cfg.data.format != "synthetic" else "",
        "data.prepared_path": cfg.data.prepared_path,
        "data.attributes": cfg.data.attributes or "",
        "run.storage_path": cfg.run.storage_path,
    }
    if kind == "tune":
        keys["tune.storage_path"] = cfg.tune.storage_path
    fixes = []
    for key, value in keys.items():
        if not value or is_remote(value):
            continue
        plain = value.removeprefix("file://")
        if local and not os.path.isabs(plain):
            fixes.append(f"{key}={os.path.abspath(plain)}")
            notes.append(f"local head: {key} {value} -> {os.path.abspath(plain)}")
        elif not local and key.endswith("storage_path"):
            notes.append(
                f"warning: {key} is the local path {value}; on a remote cluster outputs land on "
                "the head node only (relative paths: inside the job's working dir, which Ray "
                "deletes). Use an s3:// URI."
            )
        elif not local and not (root / plain).resolve().is_relative_to(root):
            notes.append(f"warning: {key} {value} must exist at that path on every cluster node")
    return fixes


def validate(cfg_path: str, overrides: list[str], space: str | None) -> ExperimentConfig:
    """Loads the config exactly as the job will, and checks the model keys and the space.

    The model registry imports torch; without it (a laptop with only the ray CLI) that check is
    skipped here and runs on the cluster instead.
    """
    cfg = load_config(cfg_path, overrides)
    try:
        from fearec_dist.models import validate_model_section
    except ImportError as err:
        print(f"[fearec-dist] note: model keys not checked locally ({err})", file=sys.stderr)
    else:
        validate_model_section(cfg.model.name, cfg.model.params, cfg.data.max_seq_len)
        if space:
            try:
                from fearec_dist.tune import read_space, validate_space
            except ImportError as err:
                print(f"[fearec-dist] note: space not checked locally ({err})", file=sys.stderr)
            else:
                validate_space(read_space(space), cfg, space)
    return cfg


def pinned_dependencies(root: Path) -> list[str]:
    """``[project].dependencies`` of the shipped pyproject.toml, minus ray (the cluster's own)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise SubmitError("--deps pip needs Python >= 3.11 (tomllib)") from None
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        raise SubmitError(f"--deps pip: {pyproject} does not exist")
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    name = lambda spec: re.match(r"[A-Za-z0-9_.-]+", spec).group().lower()  # noqa: E731
    return [d for d in deps if name(d) != "ray"]


def build_runtime_env(root: Path, deps: str, extra_json: str | None) -> dict[str, Any]:
    """The runtime env besides ``working_dir`` (passed to the CLI as ``--working-dir``)."""
    env: dict[str, Any] = {"excludes": list(EXCLUDES)}
    if deps == "pip":
        env["pip"] = {"packages": pinned_dependencies(root), "pip_check": False}
    if extra_json:
        try:
            extra = json.loads(extra_json)
        except json.JSONDecodeError as err:
            raise SubmitError(f"--runtime-env-json: not valid JSON ({err})") from None
        if not isinstance(extra, dict):
            raise SubmitError("--runtime-env-json: expected a JSON object")
        env = deep_merge(env, extra)
    return env


def plan_job(args: argparse.Namespace, local_head: bool) -> JobPlan:
    """Validates the config and returns the job's plan.

    Args:
        args: the ``submit`` command's arguments.
        local_head: the cluster's head runs on this machine (relative paths are made absolute
            instead of warned about).
    """
    kind = "tune" if args.tune else "train"
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"run.workers={args.workers}")
    if args.gpu or args.cpu:
        overrides.append(f"run.use_gpu={'true' if args.gpu else 'false'}")
    cfg = validate(args.config, overrides, args.tune)

    root = Path(args.working_dir).resolve()
    if not root.is_dir():
        raise SubmitError(f"--working-dir {root} is not a directory")
    config_rel = _inside(args.config, root, "config")
    space_rel = _inside(args.tune, root, "search space") if args.tune else None
    stem = Path(args.config).stem
    job_id = args.submission_id or f"fearec-{kind}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"

    notes: list[str] = []
    overrides += path_fixes(cfg, kind, local_head, root, notes)
    # A fixed name makes the output directory known now (and resubmitting it resumes).
    if kind == "train" and not cfg.run.name:
        overrides.append(f"run.name={job_id}")
    if kind == "tune" and not cfg.tune.name:
        overrides.append(f"tune.name={job_id}")
    final = load_config(args.config, overrides)  # what the job will load, paths fixed
    if kind == "train":
        outputs = f"{final.run.storage_path.rstrip('/')}/{final.run.name}"
    else:
        outputs = f"{final.tune.storage_path.rstrip('/')}/{final.tune.name}"

    entrypoint = [args.python, "-m", "fearec_dist", kind, "--config", config_rel]
    if space_rel:
        entrypoint += ["--space", space_rel]
    for item in overrides:
        entrypoint += ["--set", item]
    runtime_env = build_runtime_env(root, args.deps, args.runtime_env_json)
    return JobPlan(entrypoint, runtime_env, root, job_id, outputs, notes)
