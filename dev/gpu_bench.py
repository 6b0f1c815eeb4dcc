"""The GPU figure of `dermray bench train`, on a machine with torch but no package index (see
dev/carry_for_gpu.sh, which builds the .carry/ folder this reads).

    python3 dev/gpu_bench.py [--backbone resnet50] [--image-size 224] [--batch-sizes 128] [--seconds 30]

Stages the carried ISIC 2018 images (real 600x450 JPEGs) with `dermray stage csv`, then measures one worker's
training images/s on synthetic in-memory batches and through the real per-image pipeline (the same code as
`dermray bench train`), and prints one JSON line per batch size (also written to $OUT/gpu_bench.jsonl when OUT is
set). Ray starts without its dashboard, so Ray's core wheel is all that has to be carried. On the GPU machine,
from a checkout with .carry/ beside it:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site
    python3 dev/gpu_bench.py --batch-sizes 64,256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="128", help="comma-separated (default: 128)")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per measurement (default: 30)")
    parser.add_argument("--images", default=str(REPO / ".carry" / "isic2018"),
                        help="folder with labels.csv (file, dx) and images/ (default: .carry/isic2018)")
    args = parser.parse_args()
    images = Path(args.images)
    if not (images / "labels.csv").is_file():
        parser.error(f"no {images / 'labels.csv'}: build it with dev/carry_for_gpu.sh, or pass --images")

    import ray
    import torch

    from dermray.data.bench import bench_train
    from dermray.data.sources import SourceOptions
    from dermray.data.stage import stage

    ray.init(include_dashboard=False, logging_level="WARNING")
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
          f" ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}),"
          f" ray {ray.__version__}, {int(ray.cluster_resources()['CPU'])} CPUs", file=sys.stderr, flush=True)
    started = time.monotonic()
    out = tempfile.mkdtemp(prefix="dermray-gpu-")
    summary = stage("csv", SourceOptions(out=out, images=str(images / "images"), labels=str(images / "labels.csv"),
                                         image_col="file", label_col="dx"))
    print(f"staged {summary['images']} images in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    results_path = Path(os.environ["OUT"]) / "gpu_bench.jsonl" if os.environ.get("OUT") else None
    if results_path:
        results_path.parent.mkdir(parents=True, exist_ok=True)
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        result = bench_train(args.backbone, args.image_size, summary["manifest"], args.seconds, batch_size)
        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        result["cpus"] = int(ray.cluster_resources()["CPU"])
        line = json.dumps(result)
        print(line, flush=True)
        if results_path:
            with results_path.open("a") as f:
                f.write(line + "\n")
    shutil.rmtree(out, ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)  # Ray's exit handlers can hang a killed or piped run; every result is written by now


if __name__ == "__main__":
    main()
