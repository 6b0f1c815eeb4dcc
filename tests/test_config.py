"""The config schema: defaults, overrides, one-line errors, and every shipped YAML loads against the code."""

from pathlib import Path

import pytest
import yaml

from dermray.config import EMBEDDED_IMAGE_SIZE, Config, load_config, to_yaml
from dermray.errors import DermrayError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "jobs" / "configs").glob("*.yaml"))


def test_defaults_are_the_embedded_default():
    config = load_config()
    assert config.data.manifest is None
    assert config.model.backbone in ("resnet18", "mobilenet_v3_small")
    assert config.run.name


def test_overrides_parse_types():
    config = load_config(None, ["train.epochs=3", "scaling.use_gpu=true", "model.weights=null", "train.lr=3e-4"])
    assert config.train.epochs == 3 and config.scaling.use_gpu is True
    assert config.model.weights is None and config.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "config: train.epoch: unknown key"),
        ("train.epochs=abc", "config: train.epochs: Input should be a valid integer"),
        ("model.backbone=alexnet", "unknown backbone 'alexnet'"),
        ("train.head_epochs=50", "head_epochs (50) exceeds epochs"),
        ("data.augment.hflip_p=2", "config: data.augment.hflip_p: Input should be less than or equal to 1"),
        ("data.color_constancy=gray_world", "config: data.color_constancy: Input should be 'none' or 'shades_of_gray'"),
        ("epochs", "--set 'epochs': expected dotted.key=value"),
        ("data.train_split=train+val", "data.val_split 'val' shares val with data.train_split 'train+val': "
                                       "validation must be held out"),
    ],
)
def test_bad_values_give_one_line(override, message):
    with pytest.raises(DermrayError) as error:
        load_config(None, [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_image_size_defaults_to_the_backbone_on_real_data():
    assert load_config(None, ["model.backbone=inception_v3", "data.manifest=s3://b/m"]).image_size == 299
    assert load_config(None, ["model.backbone=resnet50", "data.manifest=s3://b/m"]).image_size == 224
    assert load_config(None, []).image_size == 64  # the embedded synthetic data


def test_inception_below_299_is_refused():
    with pytest.raises(DermrayError, match="inception_v3 trains at 299 px"):
        load_config(None, ["model.backbone=inception_v3", "model.image_size=224"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["train.epochs=4"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config))
    assert load_config(str(path)) == config


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DermrayError, match="file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(DermrayError, match="not valid YAML"):
        load_config(str(bad))


def test_jobs_configs_exist():
    assert CONFIGS, "jobs/configs/ ships experiment YAMLs"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads(path):
    config = load_config(str(path))
    assert isinstance(config, Config)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) - {"tune"} <= set(Config.model_fields)


def test_the_image_size_follows_the_data_not_a_null_manifest():
    """The trainer pins the size from the manifest it reads. A null data.manifest is not the signal: tune fills in
    the embedded manifest (whose lesions then trained at resnet18's 224 px, 12 times the compute), and a nightly
    config names no manifest at all although its data may be real."""
    embedded = load_config(None)
    assert embedded.data.manifest is None and embedded.image_size == EMBEDDED_IMAGE_SIZE
    synthetic = embedded.with_manifest("/data/synthetic/manifest.parquet", "synthetic")
    assert synthetic.data.manifest == "/data/synthetic/manifest.parquet"
    assert synthetic.model.image_size == EMBEDDED_IMAGE_SIZE == synthetic.image_size
    # The nightly case: no manifest in the config, real images staged from a CSV: the backbone's own size.
    assert embedded.with_manifest("/data/nightly/manifest.parquet", "csv").model.image_size == 224
    inception = load_config(None, ["model.backbone=inception_v3"])
    assert inception.with_manifest("/data/isic/manifest.parquet", "isic2018").image_size == 299
    assert inception.with_manifest("/data/s/manifest.parquet", "synthetic").image_size == 299  # its minimum
    explicit = load_config(None, ["model.image_size=48"])
    assert explicit.with_manifest("/data/isic/manifest.parquet", "isic2018").image_size == 48


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_tune_space_names_real_config_keys(path):
    """A sweep sets each tune.space key on its trials' configs; `dermray tune` checks the space before any trial
    (tune.check_space, tested on a misspelt key in test_tune.py). Every shipped YAML's space passes that check."""
    from dermray.tune.sweep import check_space

    config = load_config(str(path))
    check_space(config.model_dump(mode="json"), config.tune.space)


def test_every_config_key_is_described_and_the_reference_is_current():
    """Each field's docstring is its description (pydantic's use_attribute_docstrings); docs/config.md is generated
    from them, so a key added without a description, or a stale reference, fails here."""
    from pydantic import BaseModel

    from dermray.config import SearchDimension, config_reference

    def undescribed(model: type[BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                missing += undescribed(field.annotation, f"{prefix}{name}.")
        return missing

    assert undescribed(Config, "") + undescribed(SearchDimension, "tune.space.*.") == []
    reference = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert reference == config_reference(), "docs/config.md is stale: run python dev/config_reference.py"
    assert "| `train.lr` | float | `0.002` |" in reference
