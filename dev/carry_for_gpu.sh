#!/usr/bin/env bash
# Build .carry/ for a GPU machine that has torch and torchvision but no package index (an air-gapped cluster
# node, or a borrowed benchmark machine): Ray and the few packages it lacks as wheels, and a
# subset of the real ISIC 2018 sample for dev/gpu_bench.py. Run from the repository root; .carry/ is ignored.
#
#   dev/carry_for_gpu.sh [PYTHON_VERSION=3.12] [IMAGES=40]
#
# Ray's wheel is 79 MB, 32 MB of it a Java jar that Python never loads: it is dropped so that everything fits in
# 64 MiB. The dashboard's extra packages are not carried: dev/gpu_bench.py starts Ray without the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
images="${2:-40}"
data="${DERMRAY_TEST_DATA:-../shared/data}/isic2018-sample"
carry=.carry
if [ ! -x .venv/bin/python ]; then
  echo "carry_for_gpu: no .venv here; install first (README Quick start), its versions are the ones carried" >&2
  exit 2
fi
if [ ! -f "$data/labels.csv" ]; then
  echo "carry_for_gpu: no $data/labels.csv; set DERMRAY_TEST_DATA to the shared data folder" >&2
  exit 2
fi
rm -rf "$carry" && mkdir -p "$carry/whl" "$carry/isic2018/images"

# The versions this checkout's virtual environment resolved, so the GPU machine runs what the tests ran.
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for package in ray pydantic pydantic_core annotated-types typing-inspection jsonschema jsonschema-specifications \
               referencing rpds-py tensorboardX; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" -d "$carry/whl" "$package==$(version "$package")"
done

# Ray without its Java jar (and without the jar's line in RECORD, which pip reads when it installs).
ray_wheel=$(ls "$carry"/whl/ray-*.whl)
python3 - "$ray_wheel" <<'PY'
import sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as source:
    entries = [(info, source.read(info)) for info in source.infolist() if not info.filename.startswith("ray/jars/")]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
    for info, data in entries:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"ray/jars/"))
        target.writestr(info, data)
PY

# The first N images of the sample (by name) and their labels: real 600x450 dermoscopy JPEGs.
python3 - "$data" "$carry/isic2018" "$images" <<'PY'
import csv, shutil, sys
from pathlib import Path
data, out, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
with open(data / "labels.csv", newline="") as f:
    rows = list(csv.DictReader(f))
rows = sorted(rows, key=lambda row: row["file"])[:count]
with open(out / "labels.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
for row in rows:
    shutil.copy(data / "images" / row["file"], out / "images" / row["file"])
PY

total=$(du -sb "$carry" | cut -f1)
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "carry: $((total / 1024 / 1024)) MiB, tracked tree: $((tree / 1024)) KiB (the limit for both together: 64 MiB)" >&2
if (( total + tree > 64 * 1024 * 1024 )); then
  echo "too large to carry: pass fewer images (second argument)" >&2
  exit 1
fi
