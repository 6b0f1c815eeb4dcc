"""Bad input through the real command line: each case gets its documented outcome, a one-line error naming the
problem (exit 2, nothing on stdout) or a counted skip, never a traceback. Per-file cases (truncated, CMYK, 16-bit,
bombs...) are in test_imaging.py and test_stage.py; per-row label cases in test_sources.py; configs in
test_config.py."""

import subprocess
import sys

import pytest
from PIL import Image

from dermray.config import load_config
from dermray.sources import SourceOptions
from dermray.stage import stage
from dermray.trainer import train


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermray", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["stage", "ham10000"], "required: --out"),
        (["stage", "nosuchsource", "--out", "x"], "invalid choice: 'nosuchsource'"),
        (["stage", "folder", "--out", "x", "--val-fraction", "lots"], "invalid float value: 'lots'"),
        (["train", "--set"], "expected one argument"),
    ],
)
def test_usage_errors_are_one_line(args, fragment):
    _assert_one_line_error(_cli(*args), fragment)


def test_missing_required_source_option_names_it(tmp_path):
    _assert_one_line_error(_cli("stage", "ham10000", "--out", str(tmp_path / "o")), "--labels is required")


def test_split_fractions_that_do_not_add_up(tmp_path):
    result = _cli("stage", "folder", "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                  "--val-fraction", "0.7", "--test-fraction", "0.6")
    _assert_one_line_error(result, "--val-fraction/--test-fraction", "sum to 1")


def test_labels_file_with_only_a_header(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "a.jpg")
    (tmp_path / "labels.csv").write_text("image,label\n")
    result = _cli("stage", "csv", "--labels", str(tmp_path / "labels.csv"), "--images", str(tmp_path / "img"),
                  "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "no readable, labelled image left")


def test_empty_image_folder(tmp_path):
    (tmp_path / "img").mkdir()
    result = _cli("stage", "folder", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "no class sub-folders")


def test_labels_csv_that_is_not_a_csv(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "a.jpg")
    (tmp_path / "labels.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    result = _cli("stage", "csv", "--labels", str(tmp_path / "labels.csv"), "--images", str(tmp_path / "img"),
                  "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""


def test_only_unreadable_images_is_an_error_with_the_report(tmp_path):
    (tmp_path / "img" / "mel").mkdir(parents=True)
    (tmp_path / "img" / "mel" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    result = _cli("stage", "folder", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "no readable, labelled image left", "skipped.csv")
    assert "broken.jpg" in (tmp_path / "o" / "skipped.csv").read_text()


@pytest.mark.slow
def test_a_class_without_training_images_is_reported(ray_local, tmp_path):
    """A declared class with no images trains (its loss weight is 0) and is named in the warning and summary."""
    for cls, shade in (("benign", 60), ("malignant", 200)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 40), (shade, 40 + i * 5, 90)).save(tmp_path / "img" / cls / f"{cls}{i}.jpg")
    summary = stage("folder", SourceOptions(out=str(tmp_path / "o"), images=str(tmp_path / "img"),
                                            classes=("benign", "malignant", "indeterminate")))
    assert summary["per_class"]["train"]["indeterminate"] == 0
    result = train(load_config(None, [
        f"data.manifest={summary['manifest']}", f"run.storage={tmp_path / 'runs'}", "model.backbone=resnet18",
        "model.image_size=32", "train.epochs=1", "train.batch_size=8",
    ]))
    assert result["classes_without_training_images"] == ["indeterminate"]
    assert result["epochs_completed"] == 1
