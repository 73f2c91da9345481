"""Every YAML under cluster/ and jobs/ loads and says what a cluster run needs: KubeRay kinds and
apiVersions, GPU resources, CPU/memory requests, token auth from a Secret (never a literal), and
entrypoints naming config files that load with the project's config loader; the daily CronJob
creates a RayJob of the same shape (kept in its ConfigMap) with only the rights it needs. No Ray,
no network."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from fearec_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted(p for d in ("cluster", "jobs") for p in (REPO / d).rglob("*.yaml"))
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
KINDS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "RayService": "ray.io/v1",
    "ServiceAccount": "v1",
    "CronJob": "batch/v1",
    "ConfigMap": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}
DAILY = REPO / "cluster" / "kuberay" / "daily-cronjob.yaml"
GPU = "nvidia.com/gpu"


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[tuple[str, dict]]:
    """Every manifest, and every manifest a ConfigMap carries as a YAML value (the RayJob
    template the daily CronJob creates)."""
    out = [(_rel(p), d) for p in YAMLS for d in _docs(p) if isinstance(d, dict) and "kind" in d]
    for name, doc in list(out):
        if doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                inner = yaml.safe_load(text) if key.endswith((".yaml", ".yml")) else None
                if isinstance(inner, dict) and "kind" in inner:
                    out.append((f"{name}:{key}", inner))
    return out


def _ray_specs() -> list[tuple[str, dict]]:
    """(file, RayClusterSpec) for every RayCluster and every RayJob's cluster."""
    out = []
    for name, doc in _manifests():
        if doc["kind"] == "RayCluster":
            out.append((name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append((name, doc["spec"]["rayClusterSpec"]))
    return out


def _check_config(path: str) -> Any:
    from fearec_dist.models import validate_model_section

    cfg = load_config(REPO / path)
    validate_model_section(cfg.model.name, cfg.model.params, cfg.data.max_seq_len)
    return cfg


def test_every_yaml_loads():
    assert YAMLS, "no YAML under cluster/ or jobs/"
    for path in YAMLS:
        assert _docs(path), f"{_rel(path)} is empty"


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_job_configs_load_with_the_config_loader(path):
    cfg = _check_config(_rel(path))
    if path.stem.endswith("-s3"):  # cluster configs: object storage in and out, GPU workers
        assert cfg.data.path.startswith("s3://") and cfg.run.use_gpu
        out = cfg.tune.storage_path if "sweep" in path.stem else cfg.run.storage_path
        assert out.startswith("s3://"), f"{_rel(path)}: outputs must go to object storage"


def test_the_expected_job_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "beauty.yaml", "beauty-s3.yaml", "large-s3.yaml"} <= names
    assert any("sweep" in n for n in names)
    large = load_config(REPO / "jobs/configs/large-s3.yaml")
    assert large.run.use_gpu and large.run.workers > 1 and large.data.path.startswith("s3://")


def test_manifest_kinds_and_api_versions():
    kinds = [doc["kind"] for _, doc in _manifests()]
    assert "RayCluster" in kinds and kinds.count("RayJob") >= 2
    for name, doc in _manifests():
        assert doc["kind"] in KINDS, f"{name}: unexpected kind {doc['kind']}"
        assert doc["apiVersion"] == KINDS[doc["kind"]], f"{name}: {doc['apiVersion']}"
        assert doc["kind"] != "Secret", f"{name}: secrets are never committed"


def _containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    return [(group, c) for group, g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name,spec", _ray_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_clusters_have_gpus_requests_and_token_auth(name, spec):
    assert spec["rayVersion"].startswith("2.60"), name
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if int(c["resources"]["limits"].get(GPU, 0)) >= 1
    ]  # fmt: skip
    assert gpu_groups, f"{name}: no worker group asks for {GPU}"
    for g in gpu_groups:
        assert g["maxReplicas"] >= max(1, g["minReplicas"]), f"{name}: {g['groupName']}"
    for group, c in _containers(spec):
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and "memory" in limits, f"{name}: {group}"
        assert requests.get(GPU) == limits.get(GPU), f"{name}: {group} GPU request != limit"
        if group == "head":
            assert GPU not in limits, f"{name}: the head needs no GPU"
    assert "dashboard-host" in spec["headGroupSpec"]["rayStartParams"], name

    if spec.get("authOptions", {}).get("mode") == "token":
        return  # KubeRay creates the Secret and sets the variables on every container
    envs = [c.get("env", []) for _, c in _containers(spec)]
    if spec.get("enableInTreeAutoscaling"):
        envs.append(spec.get("autoscalerOptions", {}).get("env", []))
    for env in envs:
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token", name
        token = by_name["RAY_AUTH_TOKEN"]
        assert "value" not in token and "secretKeyRef" in token["valueFrom"], name


def test_standalone_cluster_dashboard_on_localhost():
    for name, doc in _manifests():
        if doc["kind"] == "RayCluster":
            params = doc["spec"]["headGroupSpec"]["rayStartParams"]
            assert params["dashboard-host"] == "127.0.0.1", name


@pytest.mark.parametrize(
    "name,job", [(n, d) for n, d in _manifests() if d["kind"] == "RayJob"], ids=lambda x: x
    if isinstance(x, str) else ""
)  # fmt: skip
def test_rayjob_entrypoints_name_loadable_configs(name, job):
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    if argv[:2] == ["python", "jobs/daily.py"]:  # the daily job's entrypoint
        argv = ["python", "-m", "fearec_dist", "daily", *argv[2:]]
    command = argv[3]
    assert argv[:3] == ["python", "-m", "fearec_dist"], name
    assert command in ("train", "tune", "daily"), name
    config = argv[argv.index("--config") + 1]
    assert config.startswith("jobs/configs/"), name
    cfg = _check_config(config)
    assert cfg.data.path.startswith("s3://") and cfg.run.use_gpu, f"{name}: {config}"
    if command == "daily":
        from fearec_dist.pipeline.daily import check_daily

        check_daily(cfg)  # what the job checks before Ray starts
        assert argv[argv.index("--input") + 1].startswith("s3://"), name
        assert cfg.run.storage_path.startswith("s3://"), f"{name}: the pointer on object storage"
    if command == "tune":
        space = argv[argv.index("--space") + 1]
        assert space.startswith("jobs/spaces/") and (REPO / space).is_file(), name
        if importlib.util.find_spec("fearec_dist.tune") is not None:
            from fearec_dist.tune import read_space, validate_space

            validate_space(read_space(REPO / space), cfg, space)
    assert isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict), name
    assert spec["shutdownAfterJobFinishes"] is True, f"{name}: a finished job keeps its GPUs"


def test_every_rayjob_kind_exists():
    jobs = [d["spec"]["entrypoint"] for _, d in _manifests() if d["kind"] == "RayJob"]
    commands = {"daily" if "jobs/daily.py" in e else shlex.split(e)[3] for e in jobs}
    assert commands == {"train", "tune", "daily"}


def test_daily_cronjob_creates_a_rayjob_a_day_with_only_its_rights():
    docs = {d["kind"]: d for d in _docs(DAILY)}
    cron = docs["CronJob"]["spec"]
    assert len(cron["schedule"].split()) == 5 and cron["concurrencyPolicy"] == "Forbid"
    job = cron["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    # the pod mounts the ConfigMap holding the RayJob and creates it from there
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (key,) = docs["ConfigMap"]["data"]
    script = container["args"][0]
    assert f"kubectl create -f {mount['mountPath']}/{key}" in script
    assert "jobStatus" in script and "SUCCEEDED" in script  # ends with the day's outcome
    rayjob = yaml.safe_load(docs["ConfigMap"]["data"][key])
    assert rayjob["kind"] == "RayJob" and "name" not in rayjob["metadata"]
    assert rayjob["metadata"]["generateName"]  # a fresh name per day: a re-run never collides
    assert rayjob["metadata"]["labels"]["app"] in script  # the cleanup selects its own RayJobs
    assert rayjob["spec"]["activeDeadlineSeconds"] < job["activeDeadlineSeconds"]
    # its identity: a ServiceAccount bound to a Role on rayjobs only
    account = pod["serviceAccountName"]
    assert docs["ServiceAccount"]["metadata"]["name"] == account
    binding = docs["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get"} <= set(rule["verbs"]) and "*" not in rule["verbs"]


def test_daily_job_entrypoint_is_the_cli(capsys):
    import runpy
    import sys

    saved = sys.argv
    sys.argv = ["jobs/daily.py", "--help"]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "jobs" / "daily.py"), run_name="__main__")
    finally:
        sys.argv = saved
    assert done.value.code == 0 and "fearec-dist daily" in capsys.readouterr().out


def test_cluster_launcher_config():
    launchers = [(p, d) for p in YAMLS for d in _docs(p) if isinstance(d, dict) and "provider" in d]
    assert launchers, "no Ray cluster-launcher config under cluster/"
    for path, cfg in launchers:
        types = cfg["available_node_types"]
        assert cfg["head_node_type"] in types, path
        workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
        gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
        assert gpu and all(t["max_workers"] > t["min_workers"] for t in gpu), path
        for node in types.values():  # object storage through instance roles, not keys
            assert "IamInstanceProfile" in node["node_config"], path
        head = " ".join(cfg["head_start_ray_commands"])
        assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head, path
        assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"]), path
        setup = " ".join(cfg["setup_commands"])
        assert re.search(r"pip install .*fearec-dist", setup), f"{path}: package not installed"
        tokens = [local for remote, local in cfg["file_mounts"].items() if "auth_token" in remote]
        for local in tokens:  # the token comes from the user's machine, never from the repo
            assert not Path(local).expanduser().resolve().is_relative_to(REPO), path


def test_no_credentials_in_committed_files():
    pattern = re.compile(r"(aws_secret_access_key|AKIA[0-9A-Z]{16}|RAY_AUTH_TOKEN=\S)", re.I)
    for path in [*YAMLS, REPO / "cluster" / "Dockerfile"]:
        assert not pattern.search(path.read_text()), f"{_rel(path)} holds a credential"


def test_docs_mention_every_cluster_file():
    doc = (REPO / "docs" / "cluster.md").read_text()
    for path in sorted((REPO / "cluster").rglob("*")):
        if path.is_file():
            assert _rel(path) in doc, f"docs/cluster.md does not mention {_rel(path)}"
