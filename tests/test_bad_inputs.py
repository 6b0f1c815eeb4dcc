"""Bad input through the real command line: each case gets its documented outcome, a one-line error naming the
problem (exit 2, nothing on stdout) or a counted skip, never a traceback. Per-file cases (truncated, CMYK, 16-bit,
bombs...) are in test_imaging.py and test_stage.py; per-row label cases in test_sources.py; configs in
test_config.py."""

import subprocess
import sys

import pytest
from PIL import Image

from dermray.config import load_config
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from dermray.errors import DermrayError
from dermray.train.trainer import train


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
def test_a_run_whose_every_image_became_unreadable_fails_once_in_one_line(ray_local, tmp_path, attached_env):
    """Files still there but all damaged: each is skipped with a warning, and the epoch that read nothing fails
    the run instead of reporting metrics of nothing. That is the input's fault: no run.max_failures retry is spent
    on it (the workers start once), and no worker or controller traceback reaches stderr."""
    _two_class_folder(tmp_path / "img")
    manifest = stage("folder", SourceOptions(out=str(tmp_path / "o"), images=str(tmp_path / "img")))["manifest"]
    for image in (tmp_path / "img").rglob("*.jpg"):
        image.write_bytes(b"\xff\xd8 damaged after staging")
    result = _cli("train", "--set", f"data.manifest={manifest}", "--set", f"run.storage={tmp_path / 'runs'}",
                  "--set", "model.backbone=small_cnn", "--set", "model.image_size=32", "--set", "train.epochs=1",
                  "--set", "train.batch_size=8", "--set", "run.max_failures=2", env=attached_env)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    # Ray's workers' lines reach stderr asynchronously (log_to_driver), so the error line need not be the last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("dermray train: error:")]
    assert len(errors) == 1 and errors[0].startswith("dermray train: error: epoch 1 read no training images")
    assert result.stderr.count("worker(s) on 1 node(s)") == 1, result.stderr  # started once: no retry
    assert "Traceback" not in result.stderr and "Error in training function" not in result.stderr


@pytest.mark.slow
def test_a_pilot_collection_smaller_than_one_batch_trains(ray_local, tmp_path):
    """16 training images and the default batch of 32: the partial batch is all there is, so it is trained on
    (before, it was dropped and the run failed blaming unreadable images)."""
    _two_class_folder(tmp_path / "img")
    summary = stage("folder", SourceOptions(out=str(tmp_path / "o"), images=str(tmp_path / "img")))
    assert summary["splits"]["train"] < 32
    result = train(load_config(None, [
        f"data.manifest={summary['manifest']}", f"run.storage={tmp_path / 'runs'}", "model.backbone=small_cnn",
        "model.image_size=32", "train.epochs=1", "train.batch_size=32",
    ]))
    assert result["epochs_completed"] == 1


def _manifest_without_staging(out, files: list, splits: list[str], classes: list[str]) -> str:
    """A manifest written directly (no Ray): for the checks that must refuse a run before Ray starts."""
    import pyarrow as pa

    from dermray.data.manifest import Manifest, write_manifest

    n = len(files)
    table = pa.table({"image_uri": [str(f) for f in files], "label": pa.array([classes.index(f.parent.name)
                      for f in files], pa.int32()), "label_name": [f.parent.name for f in files],
                      "group_id": [f.stem for f in files], "split": splits, "source": ["folder"] * n,
                      "width": pa.array([40] * n, pa.int32()), "height": pa.array([40] * n, pa.int32())})
    return write_manifest(str(out / "manifest.parquet"), Manifest(table, classes, "folder", None))


def test_a_split_too_small_to_train_is_refused_before_ray_starts(tmp_path):
    files = [tmp_path / "img" / "a" / "a.jpg", tmp_path / "img" / "b" / "b.jpg"]
    for shade, path in zip((10, 200), files):
        path.parent.mkdir(parents=True)
        Image.new("RGB", (40, 40), (shade, 20, 30)).save(path)
    manifest = _manifest_without_staging(tmp_path / "o", files, ["train", "val"], ["a", "b"])
    result = _cli("train", "--set", f"data.manifest={manifest}", "--set", f"run.storage={tmp_path / 'runs'}")
    _assert_one_line_error(result, "'train' split has 1 image(s): too few to train")
    assert not (tmp_path / "runs").exists()  # refused before Ray started and the run was created


@pytest.mark.parametrize("weights", ["other_architecture", "pickled_code"])
def test_a_bad_weights_file_is_refused_before_ray_starts(tmp_path, weights):
    """A weights file of another architecture, or one whose unpickling would run code, used to be refused only
    inside the workers, after the cluster start, then retried run.max_failures times."""
    import torch
    import torchvision

    from tests.test_models import _Exploit

    _two_class_folder(tmp_path / "img")
    path = tmp_path / "weights.pth"
    marker = tmp_path / "pwned"
    if weights == "other_architecture":
        torch.save(torchvision.models.resnet18().state_dict(), path)
    else:
        torch.save({"fc.weight": _Exploit(str(marker))}, path)
    files = sorted((tmp_path / "img").rglob("*.jpg"))
    manifest = _manifest_without_staging(tmp_path / "o", files, ["train", "val"] * (len(files) // 2),
                                         ["benign", "malignant"])
    result = _cli("train", "--set", f"data.manifest={manifest}", "--set", f"run.storage={tmp_path / 'runs'}",
                  "--set", "model.backbone=resnet50", "--set", f"model.weights={path}", "--set", "run.max_failures=2")
    fragment = "does not fit the model" if weights == "other_architecture" else "refused: not a plain tensor file"
    _assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists() and not marker.exists()
