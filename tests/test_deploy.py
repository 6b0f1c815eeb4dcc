"""cluster.yaml passes Ray's own cluster-launcher validation (the schema `ray up` applies, with its defaults
filled in); the KubeRay and Kubernetes manifests parse and hold what the scheduler needs."""

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"
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
