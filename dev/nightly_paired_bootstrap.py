"""How sure was each nightly decision? A paired bootstrap of (challenger - champion) balanced accuracy over the
holdout images both were evaluated on, from the predictions.parquet files a cycle leaves in the registry.

Usage: python dev/nightly_paired_bootstrap.py REGISTRY [--samples 2000]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from dermray import storage


def paired_bootstrap(truth: np.ndarray, ours: np.ndarray, theirs: np.ndarray, samples: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):
        pick = rng.integers(0, len(truth), len(truth))
        draws.append(balanced_accuracy_score(truth[pick], ours[pick])
                     - balanced_accuracy_score(truth[pick], theirs[pick]))
    draws = np.array(draws)
    return {"difference": balanced_accuracy_score(truth, ours) - balanced_accuracy_score(truth, theirs),
            "ci95": (float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))),
            "p_challenger_better": float(np.mean(draws > 0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("registry")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    for run in storage.list_dirs(storage.join(args.registry, "reports")):
        champion_uri = storage.join(run, "champion", "predictions.parquet")
        if not storage.exists(champion_uri):
            continue  # the first night: no champion to compare with
        challenger = pd.read_parquet(storage.join(run, "challenger", "predictions.parquet")).set_index("image_uri")
        champion = pd.read_parquet(champion_uri).set_index("image_uri").loc[challenger.index]
        result = paired_bootstrap(challenger["label_name"].to_numpy(), challenger["predicted"].to_numpy(),
                                  champion["predicted"].to_numpy(), args.samples)
        low, high = result["ci95"]
        print(f"{storage.basename(run)}: {len(challenger)} holdout images, balanced accuracy difference "
              f"{result['difference']:+.4f} (95% CI {low:+.4f} to {high:+.4f}), "
              f"P(challenger better) {result['p_challenger_better']:.3f}")


if __name__ == "__main__":
    main()
