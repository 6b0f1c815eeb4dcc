# The dermray image for Ray clusters (cluster.yaml, KubeRay manifests in deploy/): Ray's GPU image with the
# project and its pinned dependencies. Ray, torch and torchvision match pyproject.toml and cluster.yaml
# (tests/test_versions.py checks it). No credentials are baked in: S3 access comes from the node's IAM role
# (instance profile, or IRSA on Kubernetes) or from the job's runtime_env at submission time.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/dermray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dermray ./dermray
COPY --chown=ray:users jobs ./jobs

# torch and torchvision are pinned as a pair (the CUDA builds from PyPI); ray stays the image's own 2.60.0.
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
 && pip install --no-cache-dir . \
 && python -c "import dermray, ray, torch, torchvision; print(ray.__version__, torch.__version__, torchvision.__version__)"

ENV RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0
