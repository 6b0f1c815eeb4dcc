# The dermray image for Ray clusters (cluster.yaml, KubeRay manifests in deploy/): Ray's GPU image with the
# project and its pinned dependencies. Ray, torch and torchvision match pyproject.toml and cluster.yaml
# (tests/test_versions.py checks it). No credentials are baked in: S3 access comes from the node's IAM role
# (instance profile, or IRSA on Kubernetes) or from the job's runtime_env at submission time.
# CUDA pairing: the image's CUDA (the -cuXXX tag) and the torch build installed below (PyTorch's own index for the
# same CUDA) must match; tests/test_versions.py checks it from this file. PyPI's torch 2.14.1 is a CUDA 13.0 build
# (driver >= 580) and would not match a CUDA 12 image. CUDA 12.8 needs an NVIDIA driver >= 570 on the host
# (cluster.yaml names the AMI; docs/deployment.md, "CUDA pairing").
FROM rayproject/ray:2.60.0-py311-cu128

WORKDIR /home/ray/dermray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dermray ./dermray
COPY --chown=ray:users jobs ./jobs

# torch and torchvision are pinned as a pair, the CUDA 12.8 builds of PyTorch's index (same versions as
# pyproject.toml); ray stays the image's own 2.60.0.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 "torch==2.14.1" "torchvision==0.29.1" \
 && pip install --no-cache-dir . \
 && python -c "import dermray, ray, torch, torchvision; print(ray.__version__, torch.__version__, torchvision.__version__); assert torch.version.cuda == '12.8', torch.version.cuda"

ENV RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0
