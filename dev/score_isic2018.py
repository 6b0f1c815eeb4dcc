"""Score a `dermray evaluate` ISIC 2018 submission with ISIC's own scorer (isic-challenge-scoring).

Builds the official ground-truth layout (image + one-hot MEL..VASC) from a labels.csv with `image_id,dx` columns
(as in ../shared/data/isic2018-sample and isic2018-val), then runs the scorer's command line with a Python that has
it installed: `pip install isic-challenge-scoring==5.6.0 "pandas<3"` in a venv of its own (5.6 calls
DataFrame.applymap, which pandas 3 removed); the test suite keeps one under ~/.cache/dermray-test-scorers/.

Usage: python dev/score_isic2018.py SUBMISSION.csv LABELS.csv --scorer-python VENV/bin/python
Prints balanced accuracy, macro AUC and melanoma AUC as the scorer computes them, and the scorer's full JSON to
SUBMISSION's folder as isic_score.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def official_truth(labels_csv: Path, image_ids: list[str], out: Path) -> Path:
    labels = pd.read_csv(labels_csv).set_index("image_id").loc[image_ids, "dx"].str.lower().to_numpy()
    truth = pd.DataFrame({"image": image_ids})
    for column in COLUMNS:
        truth[column] = (labels == column.lower()).astype(float)
    truth.to_csv(out, index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submission", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--scorer-python", required=True)
    args = parser.parse_args()
    images = pd.read_csv(args.submission)["image"].tolist()
    with tempfile.TemporaryDirectory() as scratch:
        truth = official_truth(args.labels, images, Path(scratch) / "truth.csv")
        result = subprocess.run([args.scorer_python, "-m", "isic_challenge_scoring", "-o", "json", "classification",
                                 str(truth), str(args.submission)], capture_output=True, text=True, check=True)
    score = json.loads(result.stdout)
    (args.submission.parent / "isic_score.json").write_text(json.dumps(score, indent=2))
    print(json.dumps({"images": len(images), "balanced_accuracy": score["aggregate"]["balanced_accuracy"],
                      "macro_auc": score["macro_average"]["auc"], "melanoma_auc": score["per_category"]["auc"]["MEL"]}))


if __name__ == "__main__":
    main()
