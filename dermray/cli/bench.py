"""``dermray bench``: its arguments, and the call they make."""

from __future__ import annotations

import argparse
import textwrap

from dermray.errors import DermrayError

DESCRIPTION = textwrap.dedent(
    """\
    bench ingest runs, on the same files and the same per-image work (read the bytes from storage, Pillow decode
    with draft mode, the train augmentation preset to N px), (a) the Ray Data pipeline feeding a consumer that does
    nothing, (b) a torch.utils.data.DataLoader with as many worker processes as Ray Data had CPUs, (c) one
    process decoding in a loop (the per-core bound), and with --pack (d) the packed-shard layout through Ray Data.

    bench train measures training images/s of one worker: synthetic in-memory uint8 batches (the compute bound)
    against the real pipeline from a manifest, and their ratio; AMP (bf16) and channels-last on a GPU.
    """
)
EPILOG = textwrap.dedent(
    """\
    examples:
      dermray bench ingest --images ../shared/data/isic2018-sample/images --image-size 224 --pack
      dermray bench ingest --images s3://bucket/isic2018/images --pack --pack-to s3://bucket/scratch
      dermray bench train --backbone resnet50 --image-size 224 --manifest ./dermray-store/datasets/isic2018
    """
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure ingest and training throughput against the alternatives",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="bench", required=True, metavar="{ingest,train}")
    ingest = kinds.add_parser("ingest", help="Ray Data vs DataLoader vs one core (vs packed shards)")
    ingest.add_argument("--images", required=True, help="folder or prefix of images (local or s3://)")
    ingest.add_argument("--image-size", type=int, default=224, help="augmented output side (default 224)")
    ingest.add_argument("--seconds", type=float, default=20.0, help="length of each measurement (default 20)")
    ingest.add_argument("--pack", action="store_true", help="also pack the images and measure the shards")
    ingest.add_argument("--pack-size", type=int, default=256, help="longest side of packed images (default 256)")
    ingest.add_argument("--pack-to", help="folder or prefix for the packed shards, deleted afterwards (default: a "
                        "local temporary folder; give the images' bucket to compare layouts on the same store)")
    ingest.add_argument("--limit", type=int, help="use at most this many images")
    train = kinds.add_parser("train", help="training images/s: synthetic batches vs the real pipeline")
    train.add_argument("--backbone", default="resnet50", help="registry backbone (default resnet50)")
    train.add_argument("--image-size", type=int, default=224, help="input side (default 224)")
    train.add_argument("--manifest", help="a staged manifest for the real-pipeline measurement")
    train.add_argument("--batch-size", type=int, default=32, help="default 32")
    train.add_argument("--seconds", type=float, default=20.0, help="length of each measurement (default 20)")
    train.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                       help="as train.amp: auto (bf16 on GPU, full precision on CPU), bf16 (on CPU too: about 2x "
                       "where the CPU has AMX or AVX512-BF16), off")


def run(args: argparse.Namespace) -> dict:
    if args.seconds <= 0:
        raise DermrayError("bench: --seconds must be positive")
    from dermray.data import bench
    from dermray.models.backbones import BACKBONES

    if args.bench == "train" and args.backbone not in BACKBONES:
        raise DermrayError(f"bench train: unknown backbone '{args.backbone}'; choose one of: {', '.join(BACKBONES)}")
    # Measured around the whole benchmark, Ray's start included: its workers and object store are part of the cost.
    with bench.MachineMemoryPeak() as memory:
        if args.bench == "ingest":
            results = bench.bench_ingest(args.images, args.image_size, args.seconds, args.pack, args.pack_size,
                                         args.limit, pack_to=args.pack_to)
        else:
            results = bench.bench_train(args.backbone, args.image_size, args.manifest, args.seconds,
                                        args.batch_size, amp=args.amp)
    results["peak_memory_gib"] = memory.gib
    bench.print_table(args.bench, results)
    return results
