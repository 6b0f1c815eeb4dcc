"""cluster.yaml passes Ray's own cluster-launcher validation (the schema `ray up` applies, with its defaults
filled in) and names its AMI, head CPU 0 and token auth; the KubeRay manifests validate against KubeRay's real CRD
schemas and the plain CronJob against Kubernetes' schema, unknown fields rejected (the API server would prune
them silently); .rayignore keeps .git and any dermray-store out of a `--working-dir .` upload."""

import copy
import functools
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"
REFERENCE = Path(os.environ.get("DERMRAY_TEST_REFERENCE", REPO.parent / "shared" / "reference"))
CRDS = {"RayJob": "rayjobs.yaml", "RayCronJob": "raycronjobs.yaml", "RayCluster": "rayclusters.yaml"}
CRON = re.compile(r"^(\S+\s+){4}\S+$")


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(config)
    filled = prepare_config(copy.deepcopy(config))  # what `ray up` validates after filling defaults
    validate_config(filled)
    types = filled["available_node_types"]
    assert filled["head_node_type"] == "head" and filled["provider"]["type"] == "aws"
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["gpu_on_demand"]["node_config"]
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert filled["idle_timeout_minutes"] > 0 and types["gpu_spot"]["max_workers"] > 0


def test_rays_validation_catches_a_broken_cluster_yaml():
    """The check above is not vacuous: Ray's validator rejects what it should."""
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_spot"]["max_workers"] = "many"
    with pytest.raises(ValidationError):
        validate_config(config)


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_rayjob_runs_training_on_a_gpu_cluster():
    (job,) = _documents(KUBERAY / "rayjob-train.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/train.py")
    assert spec["shutdownAfterJobFinishes"] is True
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers
               for c in w["template"]["spec"]["containers"])
    assert (REPO / spec["entrypoint"].split()[1]).is_file()


def test_raycronjob_schedules_the_nightly_job():
    (cron,) = _documents(KUBERAY / "raycronjob-nightly.yaml")
    assert cron["apiVersion"] == "ray.io/v1" and cron["kind"] == "RayCronJob"
    assert CRON.match(cron["spec"]["schedule"])
    template = cron["spec"]["jobTemplate"]
    assert template["entrypoint"].startswith("python jobs/nightly.py")
    assert "rayClusterSpec" in template and template["shutdownAfterJobFinishes"] is True
    config = template["entrypoint"].split("--config ")[1].split()[0]
    assert (REPO / config).is_file()


def test_plain_cronjob_and_cron_line_submit_the_nightly_job():
    (cron,) = _documents(KUBERAY / "cronjob-nightly.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert CRON.match(cron["spec"]["schedule"]) and cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"] and "jobs/nightly.py" in command
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    lines = [line for line in (REPO / "deploy" / "cron" / "dermray-nightly.cron").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 1 and CRON.match(" ".join(lines[0].split()[:5]))
    assert "ray job submit" in lines[0] and "jobs/nightly.py" in lines[0]


def test_no_credentials_in_deployment_files():
    for path in [REPO / "cluster.yaml", *KUBERAY.glob("*.yaml"), *(REPO / "deploy" / "cron").glob("*")]:
        text = path.read_text()
        assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|AKIA[0-9A-Z]{16}", text), path


# ---- cluster.yaml: what Ray's validator does not check ----

def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_names_an_ami_keeps_tasks_off_the_head_and_turns_auth_on():
    config = _cluster()
    types = config["available_node_types"]
    gpu_types = [name for name, t in types.items() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu_types, "no GPU node types"
    for name in gpu_types:
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", types[name]["node_config"].get("ImageId", "")), name
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=" in start
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);", start).group(1)
        assert token_path in config["file_mounts"], "the token file is not copied to the nodes"


# ---- KubeRay manifests against the real CRD schemas ----

def _strict(schema):
    """The CRD schema with unknown fields as errors: additionalProperties false wherever an object lists
    properties and neither allows extra ones nor preserves unknown fields; int-or-string as either."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: (_strict(v) if k != "properties" else {n: _strict(p) for n, p in v.items()})
              for k, v in schema.items()}
    if schema.pop("x-kubernetes-int-or-string", False):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        schema.pop("pattern", None)  # a pattern applies to the string form only; keep the check simple
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def _crd_validator(kind: str):
    import jsonschema

    path = REFERENCE / "kuberay" / CRDS[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRD reference not found: {path} (set DERMRAY_TEST_REFERENCE to the shared reference dir)")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: the API server validates it, not the CRD
    return jsonschema.Draft7Validator(schema)


def _kuberay_documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _documents(p)
            if d["apiVersion"] == "ray.io/v1"]


def test_kuberay_manifests_match_the_crd_schemas():
    documents = _kuberay_documents()
    assert {d["kind"] for _, d in documents} == set(CRDS)
    for name, document in documents:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in _crd_validator(document["kind"]).iter_errors(document)]
        assert not errors, f"{name}: {errors[:5]}"


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_validation_rejects_a_misspelt_field(kind):
    (document,) = [d for _, d in _kuberay_documents() if d["kind"] == kind]
    broken = copy.deepcopy(document)
    spec = broken["spec"].get("jobTemplate", broken["spec"])
    cluster = spec.get("rayClusterSpec", spec)
    cluster["workerGroupSpecs"][0]["maxReplica"] = cluster["workerGroupSpecs"][0].pop("maxReplicas")
    assert not list(_crd_validator(kind).iter_errors(document))
    assert any("maxReplica" in e.message for e in _crd_validator(kind).iter_errors(broken))


def _cluster_specs():
    for name, document in _kuberay_documents():
        spec = document["spec"].get("jobTemplate", document["spec"])
        yield name, spec.get("rayClusterSpec", spec)


def test_kuberay_clusters_use_token_auth_autoscale_and_schedule_on_gpu_pools():
    for name, cluster in _cluster_specs():
        assert cluster["authOptions"]["mode"] == "token", name
        assert cluster["enableInTreeAutoscaling"] is True, name
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        groups = {g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}
        gpu = [s for s in groups.values() if any(c["resources"]["limits"].get("nvidia.com/gpu")
                                                 for c in s["containers"])]
        assert gpu and all(any(t["key"] == "nvidia.com/gpu" for t in s["tolerations"]) for s in gpu), name
        assert all("nodeSelector" in s for s in gpu), name
        assert any(not any(c["resources"]["limits"].get("nvidia.com/gpu") for c in s["containers"])
                   for s in groups.values()), f"{name}: no CPU-only worker group for Ray Data"


def test_rayjobs_are_bounded():
    for name, document in _kuberay_documents():
        spec = document["spec"].get("jobTemplate")
        if document["kind"] == "RayJob":
            spec = document["spec"]
        if spec is None:
            continue
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] == 0, name
        assert spec["shutdownAfterJobFinishes"] is True, name
    text = (KUBERAY / "raycronjob-nightly.yaml").read_text()
    assert "RayCronJob=true" in text and "cronjob-nightly.yaml" in text  # the feature gate and the fallback


# ---- the plain CronJob against Kubernetes' own schema ----

def _kubernetes_validate(document: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_plain_cronjob_matches_the_kubernetes_schema():
    (cron,) = _documents(KUBERAY / "cronjob-nightly.yaml")
    _kubernetes_validate(cron)
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0
    (cluster,) = [d for _, d in _kuberay_documents() if d["kind"] == "RayCluster"]
    (volume,) = job["template"]["spec"]["volumes"]
    assert volume["secret"]["secretName"] == cluster["metadata"]["name"], "mounts a secret nothing creates"


def test_kubernetes_validation_rejects_a_misspelt_field():
    from jsonschema.exceptions import ValidationError

    (cron,) = _documents(KUBERAY / "cronjob-nightly.yaml")
    cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSecond"] = 60
    with pytest.raises(ValidationError):
        _kubernetes_validate(cron)


# ---- what `ray job submit --working-dir .` uploads ----

def test_rayignore_keeps_git_and_stores_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import _dir_travel

    (tmp_path / ".rayignore").write_text((REPO / ".rayignore").read_text())
    for relative in (".git/objects/ab", "jobs/dermray-store/runs", "jobs/configs", "dermray"):
        (tmp_path / relative).mkdir(parents=True)
        (tmp_path / relative / "file.txt").write_text("x")
    uploaded: list[str] = []
    _dir_travel(tmp_path, [], lambda p: uploaded.append(str(p.relative_to(tmp_path))), include_gitignore=True)
    assert "jobs/configs/file.txt" in uploaded and "dermray/file.txt" in uploaded
    assert not [p for p in uploaded if p.startswith(".git") or "dermray-store" in p], uploaded
