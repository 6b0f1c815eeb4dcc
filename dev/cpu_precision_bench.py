"""Training steps per second of a torchvision backbone on this CPU: fp32 against bf16 autocast, each in the
default (NCHW) and channels-last memory formats. Answers whether `train.amp=bf16` pays on a given CPU: it does
where oneDNN has native bf16 (AMX or AVX512-BF16: `lscpu | grep -o 'amx_bf16\\|avx512_bf16'`), and costs where it
must emulate it.

Usage: python dev/cpu_precision_bench.py [--backbone resnet18] [--image-size 96] [--batch-size 64] [--threads 2]
Prints one line per variant; the steps are real AdamW steps on random images (the model is what is timed).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from dermray.models.backbones import build_model


def steps_per_second(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bf16: bool,
                     warmup: int = 2, steps: int = 6) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    initial = build_model(args.backbone, 7).state_dict()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 7, (args.batch_size,))
    for channels_last in (False, True):
        for bf16 in (False, True):
            model = build_model(args.backbone, 7)
            model.load_state_dict(initial)
            batch = images
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                batch = images.contiguous(memory_format=torch.channels_last)
            rate = steps_per_second(model, batch, labels, bf16) * args.batch_size
            print(f"{args.backbone} {args.image_size} px batch {args.batch_size}, {args.threads} threads: "
                  f"{'bf16' if bf16 else 'fp32'} {'channels-last' if channels_last else 'NCHW'}: "
                  f"{rate:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
