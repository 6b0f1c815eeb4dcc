"""``dermray explain``: its arguments, and the call they make."""

from __future__ import annotations

import argparse
import textwrap

from dermray.errors import DermrayError

EPILOG = textwrap.dedent(
    """\
    writes to --out (default <checkpoint>/explain-<split>): saliency.png (per class: the image and its
    saliency overlay), tsne.png and tsne.csv (the 2-D embedding of the penultimate features).

    example:
      dermray explain --checkpoint ./dermray-store/runs/default/checkpoint_... \\
                      --manifest ./dermray-store/datasets/synthetic
    """
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="saliency maps and a t-SNE of the features (Esteva et al.)",
        description="Saliency maps (L1 norm over RGB of the loss gradient at the input) for a few images of each "
        "class, and a t-SNE of the penultimate-layer features of a split, coloured by class.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint_* folder of a run (local or s3://)")
    p.add_argument("--manifest", required=True, help="manifest from `dermray stage`")
    p.add_argument("--split", default="test", help="split to explain (default: test)")
    p.add_argument("--out", help="output folder or prefix (default: <checkpoint>/explain-<split>)")
    p.add_argument("--per-class", type=int, default=3, help="saliency examples per class (default: 3)")
    p.add_argument("--tsne-images", type=int, default=2000, help="at most this many images in the t-SNE (2000)")


def run(args: argparse.Namespace) -> dict:
    if args.per_class < 1 or args.tsne_images < 5:
        raise DermrayError("explain: --per-class must be >= 1 and --tsne-images >= 5")
    from dermray.evaluation.explain import explain

    return explain(args.checkpoint, args.manifest, args.out, args.split, args.per_class, args.tsne_images)
