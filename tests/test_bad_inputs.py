"""Bad input through the real command line: each case gets its documented outcome, a one-line error naming the
problem (exit 2, nothing on stdout) or a counted skip, never a traceback. Per-file cases (truncated, CMYK, 16-bit,
bombs...) are in test_imaging.py and test_stage.py; per-row label cases in test_sources.py; configs in
test_config.py."""

import subprocess
import sys

import pytest
from PIL import Image

from dermray.config import load_config
from dermray.errors import DermrayError
from dermray.sources import SourceOptions
from dermray.stage import stage
from dermray.trainer import train


def _cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermray", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


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


def test_the_command_line_parses_without_importing_torch():
    """--help and usage errors answer in under a second: torch (2-3 s to import) loads only for commands that use it."""
    probe = ("import sys; from dermray.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'torchvision', 'ray.train') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


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


def test_only_unreadable_images_is_an_error_with_the_report(tmp_path, attached_env):
    (tmp_path / "img" / "mel").mkdir(parents=True)
    (tmp_path / "img" / "mel" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    result = _cli("stage", "folder", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o"), env=attached_env)
    _assert_one_line_error(result, "no readable, labelled image left", "skipped.csv")
    assert "broken.jpg" in (tmp_path / "o" / "skipped.csv").read_text()


@pytest.mark.slow
def test_a_class_without_training_images_is_reported(ray_local, tmp_path):
    """A declared class with no images trains (its loss weight is 0) and is named in the warning and summary."""
    _two_class_folder(tmp_path / "img")
    summary = stage("folder", SourceOptions(out=str(tmp_path / "o"), images=str(tmp_path / "img"),
                                            classes=("benign", "malignant", "indeterminate")))
    assert summary["per_class"]["train"]["indeterminate"] == 0
    result = train(load_config(None, [
        f"data.manifest={summary['manifest']}", f"run.storage={tmp_path / 'runs'}", "model.backbone=resnet18",
        "model.image_size=32", "train.epochs=1", "train.batch_size=8",
    ]))
    assert result["classes_without_training_images"] == ["indeterminate"]
    assert result["epochs_completed"] == 1


def _two_class_folder(root) -> None:
    for cls, shade in (("benign", 60), ("malignant", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 40), (shade, 40 + i * 5, 90)).save(root / cls / f"{cls}{i}.jpg")


@pytest.mark.slow
def test_images_moved_since_staging_fail_before_training(ray_local, tmp_path):
    _two_class_folder(tmp_path / "img")
    manifest = stage("folder", SourceOptions(out=str(tmp_path / "o"), images=str(tmp_path / "img")))["manifest"]
    (tmp_path / "img").rename(tmp_path / "moved")
    with pytest.raises(DermrayError, match="moved or were deleted since the manifest was staged"):
        train(load_config(None, [f"data.manifest={manifest}", f"run.storage={tmp_path / 'runs'}"]))
    assert not (tmp_path / "runs").exists()  # refused before a run was created


@pytest.mark.slow
def test_a_run_whose_every_image_became_unreadable_fails(ray_local, tmp_path):
    """Files still there but all damaged: each is skipped with a warning, and the epoch that read nothing fails
    the run instead of reporting metrics of nothing."""
    _two_class_folder(tmp_path / "img")
    manifest = stage("folder", SourceOptions(out=str(tmp_path / "o"), images=str(tmp_path / "img")))["manifest"]
    for image in (tmp_path / "img").rglob("*.jpg"):
        image.write_bytes(b"\xff\xd8 damaged after staging")
    with pytest.raises(DermrayError, match="read no training images"):
        train(load_config(None, [
            f"data.manifest={manifest}", f"run.storage={tmp_path / 'runs'}", "model.backbone=small_cnn",
            "model.image_size=32", "train.epochs=1", "train.batch_size=8", "run.max_failures=0",
        ]))
