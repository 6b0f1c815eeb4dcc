"""Duplicate photos (the same bytes, or the same photo re-encoded and resized) under other names and other lesion
ids: staging finds them in its one probe pass, puts them into one group and so one split, reports them in
duplicates.csv and the summary, and never relabels them. Real HAM10000 photos (ham10000-300) and a real local Ray.
"""

import io
import shutil

import pandas as pd
import pytest
from PIL import Image

from dermray.data.duplicates import NEAR_THRESHOLD, NO_PHASH, find_duplicates, hamming, merge_groups, perceptual_hash
from dermray.data.imaging import probe_thumbnail
from dermray.data.manifest import read_manifest
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from tests.conftest import data_path

EXACT_PAIRS = 8  # at 70/15/15, 8 independent pairs all land together by chance with probability < 1%
NEAR_PAIRS = 4


@pytest.fixture(scope="module")
def ham_photos():
    """Real ham10000-300 photos of distinct lesions: (path, dx) pairs, enough for every case below."""
    folder = data_path("ham10000-300")
    labels = pd.read_csv(folder / "labels.csv").drop_duplicates("lesion_id")
    rows = labels.groupby("dx", group_keys=False).head(6).sample(frac=1.0, random_state=0)
    return [(folder / f, dx) for f, dx in zip(rows["file"], rows["dx"])]


def _shrunk_copy(path) -> bytes:
    """The photo resized to half its size and re-encoded at JPEG quality 70: new bytes, the same photo."""
    with Image.open(path) as img:
        small = img.convert("RGB").resize((img.width // 2, img.height // 2), Image.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def _phash(data: bytes) -> str:
    return perceptual_hash(probe_thumbnail(data)[1])


def test_near_copy_found_and_distinct_lesions_not(ham_photos):
    hashes = [_phash(path.read_bytes()) for path, _ in ham_photos]
    for (path, _), original in zip(ham_photos[:5], hashes):
        assert hamming(_phash(_shrunk_copy(path)), original) <= NEAR_THRESHOLD
    # Different lesions: no two photos within the threshold.
    sets = find_duplicates([str(i) for i in range(len(hashes))], hashes)
    assert sets == []


def test_flat_images_are_not_near_copies_of_each_other():
    """Solid colours have no perceptual content: two blank frames of different colours are not copies."""
    blue, red = Image.new("RGB", (64, 48), (40, 60, 200)), Image.new("RGB", (64, 48), (200, 60, 40))
    assert perceptual_hash(blue) == perceptual_hash(red) == NO_PHASH
    assert find_duplicates(["a", "b"], [NO_PHASH, NO_PHASH]) == []


def test_merge_groups_joins_transitively_and_keeps_untouched_groups():
    sha = ["a", "a", "b", "c", "b", "d"]
    sets = find_duplicates(sha, ["", "", "", "", "", ""])  # exact matches only
    assert [d.members for d in sets] == [[0, 1], [2, 4]]
    assert merge_groups(["g3", "g1", "g2", "g2", "g1", "g9"], sets) == ["g1", "g1", "g1", "g1", "g1", "g9"]


def _make_collection(tmp_path, ham_photos):
    """A labels CSV and image folder: exact copies and shrunk copies under new names and new lesion ids, a copy
    with a different label, and distinct photos. Returns the CSV path, the image folder and the expected sets."""
    images = tmp_path / "images"
    images.mkdir()
    rows, expected = [], []
    photos = iter(ham_photos)
    for i in range(EXACT_PAIRS):
        path, dx = next(photos)
        shutil.copy(path, images / f"exact{i}.jpg")
        shutil.copy(path, images / f"exact{i}_reupload.jpg")
        rows += [(f"exact{i}.jpg", dx, f"L-exact{i}"), (f"exact{i}_reupload.jpg", dx, f"L-exact{i}-new")]
        expected.append({f"exact{i}.jpg", f"exact{i}_reupload.jpg"})
    for i in range(NEAR_PAIRS):
        path, dx = next(photos)
        shutil.copy(path, images / f"near{i}.jpg")
        (images / f"near{i}_small.jpg").write_bytes(_shrunk_copy(path))
        rows += [(f"near{i}.jpg", dx, f"L-near{i}"), (f"near{i}_small.jpg", dx, f"L-near{i}-new")]
        expected.append({f"near{i}.jpg", f"near{i}_small.jpg"})
    path, first = next(photos)
    other = "mel" if first != "mel" else "nv"
    shutil.copy(path, images / "conflict.jpg")
    shutil.copy(path, images / "conflict_copy.jpg")
    rows += [("conflict.jpg", first, "L-conflict"), ("conflict_copy.jpg", other, "L-conflict-new")]
    expected.append({"conflict.jpg", "conflict_copy.jpg"})
    for i, (path, dx) in enumerate(photos):
        shutil.copy(path, images / f"single{i}.jpg")
        rows.append((f"single{i}.jpg", dx, f"L-single{i}"))
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["file", "dx", "lesion"]).to_csv(labels, index=False)
    return labels, images, expected, {"conflict.jpg": first, "conflict_copy.jpg": other}


def _options(out, labels, images):
    return SourceOptions(out=str(out), images=str(images), labels=str(labels), image_col="file", label_col="dx",
                         group_col="lesion")


def test_stage_puts_duplicates_in_one_split_and_reports_them(tmp_path, ray_local, ham_photos):
    labels, images, expected, conflict_labels = _make_collection(tmp_path, ham_photos)
    summary = stage("csv", _options(tmp_path / "out", labels, images))
    table = read_manifest(summary["manifest"]).table.to_pandas()
    table["name"] = table["image_uri"].map(lambda u: u.rsplit("/", 1)[1])
    by_name = table.set_index("name")

    # Nothing lost: every listed image is in the manifest, and none was relabelled.
    assert summary["images"] == len(pd.read_csv(labels)) and summary["skipped"] == 0
    assert by_name.loc["conflict.jpg", "label_name"] == conflict_labels["conflict.jpg"]
    assert by_name.loc["conflict_copy.jpg", "label_name"] == conflict_labels["conflict_copy.jpg"]
    for names in expected:
        members = by_name.loc[sorted(names)]
        assert members["split"].nunique() == 1, members[["split", "group_id"]]
        assert members["group_id"].nunique() == 1
    # Distinct photos keep a group of their own.
    singles = table[table["name"].str.startswith("single")]
    assert singles["group_id"].nunique() == len(singles)

    report = pd.read_csv(tmp_path / "out" / "duplicates.csv")
    assert list(report.columns) == ["set_id", "image_uri", "kind", "distance", "label", "labels_differ"]
    found = [set(g["image_uri"].map(lambda u: u.rsplit("/", 1)[1])) for _, g in report.groupby("set_id")]
    assert sorted(map(sorted, found)) == sorted(map(sorted, expected))
    named = report.assign(name=report["image_uri"].map(lambda u: u.rsplit("/", 1)[1])).set_index("name")
    assert (named.loc[[f"near{i}_small.jpg" for i in range(NEAR_PAIRS)], "kind"] == "near").all()
    assert (named.loc[[f"near{i}_small.jpg" for i in range(NEAR_PAIRS)], "distance"] <= NEAR_THRESHOLD).all()
    assert (named.loc[[f"exact{i}_reupload.jpg" for i in range(EXACT_PAIRS)], "kind"] == "exact").all()
    assert named.loc["conflict_copy.jpg", "labels_differ"] and not named.loc["exact0.jpg", "labels_differ"]

    dup = summary["duplicates"]
    assert dup["sets"] == EXACT_PAIRS + NEAR_PAIRS + 1 and dup["images"] == 2 * dup["sets"]
    assert dup["exact_copies"] == EXACT_PAIRS + 1 and dup["near_copies"] == NEAR_PAIRS
    assert dup["labels_differ"] == 1 and dup["split_conflicts"] == 0
    assert dup["report"].endswith("duplicates.csv")


def test_restage_keeps_old_splits_and_counts_the_conflict(tmp_path, ray_local, ham_photos):
    """Two photos staged as distinct, then one file replaced by a copy of the other: the old images keep their
    old splits (a re-stage never moves an old image), and the straddling set is counted as a split conflict."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, (path, dx) in enumerate(ham_photos[:24]):
        shutil.copy(path, images / f"p{i}.jpg")
        rows.append((f"p{i}.jpg", dx, f"L{i}"))
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["file", "dx", "lesion"]).to_csv(labels, index=False)
    out = tmp_path / "out"
    first = stage("csv", _options(out, labels, images))
    assert first["duplicates"]["sets"] == 0
    old = read_manifest(out).table.to_pandas()
    old["name"] = old["image_uri"].map(lambda u: u.rsplit("/", 1)[1])
    train = old[old["split"] == "train"]["name"].iloc[0]
    held_out = old[old["split"] != "train"]["name"].iloc[0]
    shutil.copy(images / train, images / held_out)

    second = stage("csv", _options(out, labels, images))
    new = read_manifest(out).table.to_pandas()
    assert (new.set_index("image_uri")["split"] == old.set_index("image_uri")["split"]).all()
    assert second["duplicates"]["sets"] == 1 and second["duplicates"]["split_conflicts"] == 1


def test_real_ham10000_photo_filed_under_two_lesion_ids_shares_a_split(tmp_path, ray_local, ham_photos):
    """HAM10000 itself holds this case: ISIC_0025226 (HAM_0004919) and ISIC_0030074 (HAM_0000140) are one photo,
    colour-shifted (same hairs and satellite spots; distance 10 of 256 bits). Staged with their real lesion ids
    next to photos of other lesions, the two lesions become one group."""
    folder = data_path("ham10000-300")
    real = pd.read_csv(folder / "labels.csv").set_index("image_id").loc[["ISIC_0025226", "ISIC_0030074"]]
    images = tmp_path / "images"
    images.mkdir()
    rows = [(f"{image_id}.jpg", row["dx"], row["lesion_id"]) for image_id, row in real.iterrows()]
    for image_id in real.index:
        shutil.copy(folder / "images" / f"{image_id}.jpg", images / f"{image_id}.jpg")
    for i, (path, dx) in enumerate(ham_photos[:20]):
        shutil.copy(path, images / f"other{i}.jpg")
        rows.append((f"other{i}.jpg", dx, f"L{i}"))
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["file", "dx", "lesion"]).to_csv(labels, index=False)
    summary = stage("csv", _options(tmp_path / "out", labels, images))
    table = read_manifest(summary["manifest"]).table.to_pandas()
    pair = table[table["image_uri"].str.contains("ISIC_00")]
    assert len(pair) == 2 and pair["group_id"].nunique() == 1 and pair["split"].nunique() == 1
    assert summary["duplicates"]["sets"] == 1 and summary["duplicates"]["near_copies"] == 1
