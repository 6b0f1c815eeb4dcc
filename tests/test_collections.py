"""What real collections bring: OS and tool debris, folder links that loop, one file under two paths, and one
diagnosis spelt several ways. Nothing of it becomes a class or a row, nothing is staged twice, nothing is split
into two classes silently; each is counted in the summary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

from dermray.data.listing import list_data_files
from dermray.data.sources import (
    ImageIndex,
    SourceOptions,
    collect_csv,
    collect_folder,
    collect_ham10000,
    fold_spellings,
)
from dermray.evaluation.predict import input_rows
from tests.conftest import REPO, data_path


def jpeg(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (shade % 255, 80, 140)).save(path, quality=90)
    return path


def unzipped_collection(root: Path) -> Path:
    """Two class folders of 4 images each, with what a laptop, a zip, a NAS and a notebook leave beside them."""
    for i in range(4):
        jpeg(root / "mel" / f"m{i}.jpg", i)
        jpeg(root / "nv" / f"n{i}.jpg", 100 + i)
    jpeg(root / ".ipynb_checkpoints" / "m0-checkpoint.jpg")
    jpeg(root / "__MACOSX" / "mel" / "._m0.jpg")
    jpeg(root / "@eaDir" / "m0.jpg" / "SYNOFILE_THUMB_M.jpg")
    jpeg(root / ".Trash-1000" / "files" / "old.jpg")
    jpeg(root / "$RECYCLE.BIN" / "S-1-5-21" / "$R1.jpg")
    jpeg(root / "mel" / "._m1.jpg")  # AppleDouble twin inside a class folder
    (root / "nv" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / "nv" / ".DS_Store").write_bytes(b"\x00" * 64)
    return root


def test_system_folders_and_files_are_never_classes_or_rows(tmp_path):
    root = unzipped_collection(tmp_path / "photos")
    collected = collect_folder(SourceOptions(out=str(tmp_path / "out"), images=str(root)))
    assert collected.classes == ["mel", "nv"]
    assert sorted(Path(r.image_uri).name for r in collected.records) == [f"m{i}.jpg" for i in range(4)] + [
        f"n{i}.jpg" for i in range(4)]
    assert collected.skipped == []  # ignored, not skipped: they were never data
    counts = collected.listing.summary()
    assert counts["system_folders"] == 5 and counts["system_files"] == 5 + 3


def test_a_folder_link_that_loops_is_followed_once_and_no_file_is_staged_twice(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        jpeg(root / "mel" / f"m{i}.jpg", i)
        jpeg(root / "nv" / f"n{i}.jpg", 100 + i)
    os.symlink("..", root / "mel" / "again")  # a link back to the collection's own root: a loop
    os.symlink(os.path.join("..", "nv"), root / "mel" / "nv-link")  # a second path to a real folder
    os.symlink(os.path.join("..", "mel", "m0.jpg"), root / "nv" / "m0.jpg")  # one file in two class folders
    collected = collect_folder(SourceOptions(out=str(tmp_path / "out"), images=str(root)))
    uris = [r.image_uri for r in collected.records]
    assert len(uris) == 8 and len({os.path.realpath(u) for u in uris}) == 8
    # The linked file keeps its first place (mel/m0.jpg) and its second path is a reported skip, not a nv row.
    assert {r.label_name for r in collected.records if r.image_uri.endswith("m0.jpg")} == {"mel"}
    assert [Path(p).name for p, reason in collected.skipped if "same file" in reason] == ["m0.jpg"]
    assert collected.listing.summary()["folder_links_not_followed"] == 2


def test_a_labels_csv_with_one_diagnosis_spelt_five_ways_gives_two_classes_and_says_so(tmp_path):
    spellings = ["mel", "MEL", " Mel ", "nv", "NV", "mel", "nv", "nv"]
    names = [f"img{i}" for i in range(len(spellings))]
    for i, name in enumerate(names):
        jpeg(tmp_path / "images" / f"{name}.jpg", i)
    pd.DataFrame({"image": names, "dx": spellings}).to_csv(tmp_path / "labels.csv", index=False)
    opts = SourceOptions(out=str(tmp_path / "out"), images=str(tmp_path / "images"),
                         labels=str(tmp_path / "labels.csv"), image_col="image", label_col="dx")
    collected = collect_csv(opts)
    assert collected.classes == ["mel", "nv"]
    by_name = {Path(r.image_uri).stem: r.label_name for r in collected.records}
    assert [by_name[n] for n in names] == ["mel", "mel", "mel", "nv", "nv", "mel", "nv", "nv"]
    assert collected.folded == {" Mel ": "mel", "MEL": "mel", "NV": "nv"}
    # With --classes, the variants map onto the declared names; a name that spells none is still refused.
    declared = collect_csv(SourceOptions(**{**opts.__dict__, "classes": ("MEL", "NV")}))
    assert {r.label_name for r in declared.records} == {"MEL", "NV"} and len(declared.records) == 8


def test_folder_names_that_differ_only_by_case_are_one_class(tmp_path):
    root = tmp_path / "photos"
    for i in range(3):
        jpeg(root / "mel" / f"a{i}.jpg", i)
    jpeg(root / "MEL" / "b0.jpg", 9)
    jpeg(root / "nv" / "c0.jpg", 99)
    collected = collect_folder(SourceOptions(out=str(tmp_path / "out"), images=str(root)))
    assert collected.classes == ["mel", "nv"]
    assert sorted(r.label_name for r in collected.records) == ["mel"] * 4 + ["nv"]
    assert collected.folded == {"MEL": "mel"}


def test_ham10000_codes_fold_case_and_spacing(tmp_path):
    metadata = data_path("metadata", "HAM10000_metadata.csv")
    frame = pd.read_csv(metadata).head(6).copy()
    frame["dx"] = [f"  {d.upper()} " if i % 2 else d for i, d in enumerate(frame["dx"])]
    frame.to_csv(tmp_path / "meta.csv", index=False)
    for i, image_id in enumerate(frame["image_id"]):
        jpeg(tmp_path / "images" / f"{image_id}.jpg", i)
    collected = collect_ham10000(SourceOptions(out=str(tmp_path / "out"), images=str(tmp_path / "images"),
                                               labels=str(tmp_path / "meta.csv")))
    truth = pd.read_csv(metadata).head(6)
    assert [r.label_name for r in collected.records] == list(truth["dx"])
    assert len(collected.records) == 6 and collected.folded


def test_fold_spellings_leaves_distinct_labels_alone():
    values, folded = fold_spellings(["bcc", "bkl", "akiec", ""])
    assert values == ["bcc", "bkl", "akiec", ""] and folded == {}
    values, folded = fold_spellings(["Mel", "unknown thing"], ["mel", "nv"])
    assert values == ["mel", "unknown thing"] and folded == {"Mel": "mel"}


def test_object_storage_debris_is_ignored_too(s3_client, bucket):
    for key in ["photos/mel/a.jpg", "photos/mel/._a.jpg", "photos/__MACOSX/mel/._a.jpg", "photos/nv/b.jpg",
                "photos/.ipynb_checkpoints/b-checkpoint.jpg"]:
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    index = ImageIndex(f"s3://{bucket}/photos")
    assert index.files == [f"s3://{bucket}/photos/mel/a.jpg", f"s3://{bucket}/photos/nv/b.jpg"]
    assert index.listing.summary()["system_files"] == 3
    assert index.listing.ignored_folders == [".ipynb_checkpoints", "__MACOSX"]


def test_predict_takes_the_same_listing(tmp_path):
    root = unzipped_collection(tmp_path / "photos")
    os.symlink("..", root / "nv" / "loop")
    table, kind = input_rows(str(root))
    assert kind == "folder" and table.num_rows == 8
    assert list_data_files(str(root)).summary()["folder_links_not_followed"] == 1


def test_stage_cli_reports_what_it_ignored_and_folded(tmp_path, attached_env):
    root = unzipped_collection(tmp_path / "photos")
    os.symlink("..", root / "mel" / "loop")
    jpeg(root / "MEL" / "x.jpg", 50)
    result = subprocess.run(
        [sys.executable, "-m", "dermray", "stage", "folder", "--images", str(root), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=attached_env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["images"] == 9 and summary["classes"] == ["mel", "nv"]
    assert summary["ignored"] == {"system_files": 8, "system_folders": 5, "folder_links_not_followed": 1,
                                  "same_file_twice": 0}
    assert summary["label_spellings_folded"] == {"MEL": "mel"}
    assert "ignored 8 hidden or system file(s)" in result.stderr and "'MEL' -> 'mel'" in result.stderr


def test_the_nightly_fingerprint_ignores_debris_and_survives_a_link_loop(tmp_path):
    """A Finder visit writes .DS_Store and a NAS writes @eaDir thumbnails: not new data, so no retraining. A new
    image is. A folder link that loops is followed once (before, the listing ran to the path length limit)."""
    from dermray.config import NightlyConfig
    from dermray.ops.nightly import source_fingerprint

    root = tmp_path / "photos"
    for i in range(3):
        jpeg(root / "mel" / f"m{i}.jpg", i)
    os.symlink("..", root / "mel" / "loop")
    cfg = NightlyConfig(source="folder", images=str(root))
    before = source_fingerprint(cfg)
    assert before["files"] == 3
    (root / "mel" / ".DS_Store").write_bytes(b"\x00" * 10)
    jpeg(root / "@eaDir" / "m0.jpg" / "SYNOFILE_THUMB_S.jpg")
    assert source_fingerprint(cfg) == before
    jpeg(root / "mel" / "m3.jpg", 3)
    assert source_fingerprint(cfg)["digest"] != before["digest"]
