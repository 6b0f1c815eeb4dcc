"""Ray, torch and torchvision are pinned to the same versions in pyproject.toml, the Dockerfile, cluster.yaml and
the KubeRay manifests, and those versions are the ones installed here."""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dependency in dependencies:
        match = re.fullmatch(r"([a-z_]+)(?:\[[^\]]*\])?==([\w.]+)", dependency.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def test_pyproject_pins_ray_torch_torchvision_and_they_are_installed():
    pins = _pins()
    assert {"ray", "torch", "torchvision"} <= set(pins)
    for name in ("ray", "torch", "torchvision"):
        assert version(name).split("+")[0] == pins[name], name


def test_dockerfile_uses_the_same_versions_and_no_credentials():
    pins, dockerfile = _pins(), (REPO / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pins['ray'])}-py311-cu\d+$", dockerfile, re.M)
    assert f'"torch=={pins["torch"]}"' in dockerfile and f'"torchvision=={pins["torchvision"]}"' in dockerfile
    assert not re.search(r"AWS_(ACCESS|SECRET|SESSION)|aws_secret|password|token\s*=", dockerfile, re.I)


def _image_versions(image: str) -> tuple[str, str, str]:
    match = re.search(r":[\w.]+-ray([\d.]+)-torch([\d.]+)-torchvision([\d.]+)$", image)
    assert match, f"image tag does not name its versions: {image}"
    return match.groups()


def test_cluster_yaml_and_kuberay_images_name_the_same_versions():
    pins = _pins()
    expected = (pins["ray"], pins["torch"], pins["torchvision"])
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert _image_versions(cluster["docker"]["image"]) == expected
    images = []
    for path in sorted((REPO / "deploy" / "kuberay").glob("*.yaml")):
        images += re.findall(r"image:\s*(\S+)", path.read_text())
    assert images and all(_image_versions(image) == expected for image in images)
    for path in sorted((REPO / "deploy" / "kuberay").glob("ray*.yaml")):
        (document,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        spec = document["spec"].get("jobTemplate", document["spec"])
        assert str(spec.get("rayClusterSpec", spec)["rayVersion"]) == pins["ray"], path.name  # RayCluster: spec


def _cuda_pairing(dockerfile: str) -> tuple[str, str]:
    """(CUDA of the base image's tag, CUDA of the torch build the Dockerfile installs), e.g. ("128", "128")."""
    base = re.search(r"^FROM rayproject/ray:[\w.]+-py\d+-(\w+)$", dockerfile, re.M)
    assert base, "no rayproject/ray base image"
    assert base.group(1) != "gpu", "-gpu is an alias whose CUDA the tag does not say: name the -cuXXX tag"
    image_cuda = re.fullmatch(r"cu(\d+)", base.group(1))
    assert image_cuda, f"base image tag names no CUDA: {base.group(1)}"
    install = re.search(r"pip install[^\n]*\"torch==", dockerfile)
    assert install, "the Dockerfile installs no pinned torch"
    index = re.search(r"--index-url https://download\.pytorch\.org/whl/cu(\d+)", install.group(0))
    # Without PyTorch's index, pip takes PyPI's torch 2.14.1: a CUDA 13.0 build (measured, ENVIRONMENT.md).
    return image_cuda.group(1), index.group(1) if index else "130"


def test_dockerfile_torch_build_matches_the_image_cuda():
    dockerfile = (REPO / "Dockerfile").read_text()
    image_cuda, torch_cuda = _cuda_pairing(dockerfile)
    assert image_cuda == torch_cuda, f"image CUDA {image_cuda} vs torch CUDA {torch_cuda}"
    assert f"torch.version.cuda == '{torch_cuda[:-1]}.{torch_cuda[-1]}'" in dockerfile  # the build checks it too


def test_cuda_pairing_check_catches_a_mismatch():
    good = (REPO / "Dockerfile").read_text()
    mismatched = re.sub(r"--index-url https://download\.pytorch\.org/whl/cu\d+ ", "", good)  # PyPI's cu130 torch
    image_cuda, torch_cuda = _cuda_pairing(mismatched)
    assert image_cuda != torch_cuda
