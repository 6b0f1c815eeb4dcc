"""Typed, validated experiment configuration.

One YAML file per experiment (``jobs/configs/*.yaml``) fills these models; ``--set dotted.key=value`` overrides
any field; unknown keys and bad values are refused with one line naming the key. The resolved config is saved
beside every run (``config.yaml``) so a run can be reproduced and a checkpoint served.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dermray import storage
from dermray.errors import DermrayError

EMBEDDED_IMAGE_SIZE = 64


class _Strict(BaseModel):
    # Each field's docstring becomes its description: docs/config.md is generated from them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class AugmentConfig(_Strict):
    """Train-time augmentation strengths: plain numbers so that Ray Tune can search them."""

    crop: Literal["rrc", "esteva", "none"] = "rrc"
    """rrc: random resized crop; esteva: rotate by any angle, crop the largest inscribed upright rectangle;
    none: the whole image resized (tiny inputs such as 28 px DermaMNIST)."""
    scale_min: float = Field(0.35, gt=0.0, le=1.0)
    """Smallest crop area, as a fraction of the image, for the random resized crop."""
    rotation_degrees: float = Field(0.0, ge=0.0, le=180.0)
    """Rotation drawn from [-r, r]; 180 means any angle (the Esteva recipe)."""
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of a horizontal flip (dermoscopy has no left or right)."""
    vflip_p: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of a vertical flip (lesions have no up or down either)."""
    rot90_p: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of a quarter, half or three-quarter turn (exact: no resampling)."""
    brightness: float = Field(0.1, ge=0.0, le=1.0)
    """Colour jitter: brightness factor drawn from [1 - b, 1 + b]."""
    contrast: float = Field(0.1, ge=0.0, le=1.0)
    """Colour jitter: contrast factor drawn from [1 - c, 1 + c]."""
    saturation: float = Field(0.1, ge=0.0, le=1.0)
    """Colour jitter: saturation factor drawn from [1 - s, 1 + s]."""
    hue: float = Field(0.0, ge=0.0, le=0.5)
    """Colour jitter: hue shift drawn from [-h, h] of a full turn (0 keeps the lesion's colour)."""


class DataConfig(_Strict):
    manifest: str | None = None
    """Manifest URI written by ``dermray stage``; none means the embedded synthetic dataset (staged once)."""
    train_split: str = "train"
    """The manifest split trained on; ``train+test`` trains on both (when another collection is the test set)."""
    val_split: str = "val"
    """The manifest split validated on after every epoch (it ranks checkpoints); never one trained on."""
    resize_ratio: float = Field(0.875, gt=0.0, le=1.0)
    """Eval preset: shorter side resized to image_size / resize_ratio, then centre-cropped."""
    color_constancy: Literal["none", "shades_of_gray"] = "none"
    """shades_of_gray: every image's colour cast removed (Shades of Gray, p = 6) before training and inference
    alike; it travels with the checkpoint. For collections from several cameras or clinics."""
    augment: AugmentConfig = AugmentConfig()
    """Train-time augmentation (the eval preset never augments)."""
    read_threads: int = Field(8, ge=1, le=64)
    """Concurrent object reads inside one Ray Data map task (hides S3 latency)."""
    prefetch_batches: int = Field(2, ge=0, le=64)
    """Batches each worker keeps decoded ahead of the training step."""

    @model_validator(mode="after")
    def _validation_is_held_out(self) -> DataConfig:
        shared = set(self.train_split.split("+")) & set(self.val_split.split("+"))
        if shared:
            raise ValueError(f"data.val_split '{self.val_split}' shares {', '.join(sorted(shared))} with "
                             f"data.train_split '{self.train_split}': validation must be held out")
        return self


class ModelConfig(_Strict):
    backbone: str = "resnet18"
    """A torchvision backbone (resnet18/50, vgg16, inception_v3, efficientnet_b0, convnext_tiny, mobilenet_v3_small)
    or small_cnn; its head is replaced for the manifest's classes."""
    image_size: int | None = Field(None, ge=16, le=1024)
    """Input side in pixels; none means the backbone's default (299 for inception_v3, else 224), or 64 px (at least
    the backbone's minimum) for synthetic data, such as the embedded default's. Decided from the manifest read."""
    weights: str | None = None
    """ImageNet weights: a local file or storage URI (.pth/.pt state dict or .safetensors); none = random init."""
    init_checkpoint: str | None = None
    """Warm start: a dermray checkpoint (folder URI) whose whole model, head included, a new run starts from (the
    nightly challenger starts from the champion). Its classes must be the manifest's. Ignored when resuming."""

    @model_validator(mode="after")
    def _one_starting_point(self) -> ModelConfig:
        if self.weights and self.init_checkpoint:
            raise ValueError("set model.weights (ImageNet backbone) or model.init_checkpoint (a dermray checkpoint), "
                             "not both")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(8, ge=1)
    """Total epochs, phase 1 (head only) included."""
    head_epochs: int = Field(0, ge=0)
    """Phase 1: epochs training only the new head on the frozen backbone (0 skips the phase)."""
    head_lr: float = Field(1e-3, gt=0.0)
    """Learning rate of phase 1 (the new head only)."""
    head_on_cached_features: bool = False
    """Phase 1 on cached features (the VGG16 recipe's source): the frozen backbone's penultimate features of the
    train and val images are computed once by a Ray Data batch-inference pass (eval preset, no augmentation) and
    kept in storage under the run, and the head trains on them without running the backbone again."""
    lr: float = Field(2e-3, gt=0.0)
    """Learning rate of phase 2 (the whole network fine-tuned), at the start of its schedule."""
    batch_size: int = Field(32, ge=1)
    """Per-worker batch size."""
    optimizer: Literal["adamw", "sgd", "rmsprop"] = "adamw"
    """adamw, sgd (with momentum) or rmsprop (the Esteva recipe)."""
    weight_decay: float = Field(1e-4, ge=0.0)
    """Weight decay (decoupled for adamw)."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD and RMSProp momentum."""
    rmsprop_alpha: float = Field(0.9, gt=0.0, lt=1.0)
    """RMSProp decay (Esteva: 0.9)."""
    rmsprop_eps: float = Field(0.1, gt=0.0)
    """RMSProp epsilon (Esteva: 0.1)."""
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "onecycle"
    """Learning-rate schedule of each phase: cosine decay, step decay (step_epochs, step_gamma), one-cycle, or
    constant."""
    step_epochs: int = Field(30, ge=1)
    """Step schedule: decay every this many epochs."""
    step_gamma: float = Field(1 / 16, gt=0.0, le=1.0)
    """Step schedule: multiply the lr by this (Esteva: 1/16 every 30 epochs)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Cross-entropy label smoothing (0: off)."""
    mixup_alpha: float = Field(0.0, ge=0.0)
    """MixUp (Zhang et al. 2018): each training batch blended with itself shifted by one image, the images and
    their labels alike, by a weight drawn from Beta(a, a) per batch (0: off; 0.2-0.4 for short schedules)."""
    cutmix_alpha: float = Field(0.0, ge=0.0)
    """CutMix (Yun et al. 2019): a box of another image of the batch pasted in, the labels mixed by its area, the
    box's area drawn from Beta(a, a) (0: off; 1.0 is the usual). With MixUp too, each batch takes one of the two."""
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    """Exponential moving average of the weights (0: off; 0.998 averages over about the last 500 steps): the
    average, BatchNorm statistics included, is what validation scores, checkpoints rank and inference serves;
    the raw weights keep training. Warmed up as min(decay, (1 + n) / (10 + n)) after n steps."""
    imbalance: Literal["weighted_loss", "balanced_sampling", "none"] = "weighted_loss"
    """Class imbalance: inverse-frequency loss weights, or sampling each class equally often."""
    aux_loss_weight: float = Field(0.4, ge=0.0)
    """Inception v3 auxiliary head loss weight."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """auto: bf16 autocast on GPU, off on CPU. bf16: on CPU too (about 2x on CPUs with AMX, slower without)."""
    seed: int = 0
    """Seeds model initialisation, shuffling and augmentation."""

    @model_validator(mode="after")
    def _phases_fit(self) -> TrainConfig:
        if self.head_epochs > self.epochs:
            raise ValueError(f"head_epochs ({self.head_epochs}) exceeds epochs ({self.epochs})")
        if self.head_on_cached_features and self.head_epochs == 0:
            raise ValueError("head_on_cached_features needs a head phase: set train.head_epochs above 0")
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (DDP processes): one per GPU on a GPU cluster."""
    use_gpu: bool = False
    """Give each worker a GPU (bf16 autocast, channels-last, pinned transfers)."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per Train worker (fractional on small CPU machines)."""
    gpus_per_worker: float = Field(1.0, gt=0.0)
    """GPUs per worker when use_gpu is set."""
    data_cpus: float = Field(1.0, ge=0.0)
    """CPUs kept free for Ray Data's read/decode tasks; workers shrink to fit on small machines (no deadlock)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers: PACK fills nodes, SPREAD spreads them over nodes."""
    torch_threads: int | None = Field(None, ge=1)
    """CPU training: intra-op threads per worker (none: the worker's CPU share, at least 1). More than the share
    pays when decoding is light (tiny images) and the model is the bottleneck."""

    @model_validator(mode="after")
    def _room_for_data(self) -> ScalingConfig:
        if not self.use_gpu and self.data_cpus < 1:
            raise ValueError("scaling.data_cpus must be >= 1 on CPU workers: each Ray Data decode task needs a "
                             "whole free CPU, or training waits forever for data")
        return self


class RunConfig(_Strict):
    name: str = "default"
    """The run's folder under run.storage; launching the same name again resumes it."""
    storage: str = "./dermray-store/runs"
    """Where runs, checkpoints and metrics go: a local path or s3://bucket/prefix."""
    max_failures: int = Field(2, ge=-1)
    """Worker failures survived by restarting from the latest checkpoint (-1: unlimited)."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Top-k retention, ranked by run.checkpoint_metric."""
    checkpoint_metric: Literal["balanced_accuracy", "accuracy", "roc_auc", "loss"] = "balanced_accuracy"
    """The validation metric that ranks checkpoints, for retention and for the summary's best ``checkpoint``
    (loss: lowest wins). Balanced accuracy suits imbalanced dermoscopy classes; a recipe judged on accuracy or
    ROC AUC should rank by that."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking server (e.g. http://mlflow:5000); none: the MLFLOW_TRACKING_URI variable, else no tracking.
    Needs the mlflow extra (pip install -e '.[mlflow]'); see docs/tracking.md."""
    mlflow_experiment: str = "dermray"
    """The MLflow experiment runs, sweeps and evaluations are logged to."""

    @property
    def checkpoint_score(self) -> tuple[str, Literal["max", "min"]]:
        """(the reported metric's name, the order in which it is best)."""
        return f"val_{self.checkpoint_metric}", "min" if self.checkpoint_metric == "loss" else "max"


class SourceFields(_Strict):
    """Where a dataset's images and labels are and how to read them: what ``dermray stage`` takes as flags and
    ``dermray nightly`` as ``nightly.*`` keys (one declaration for both)."""

    images: str | None = None
    """The folder or prefix of the images (for nightly: watched for new or changed files)."""
    labels: str | None = None
    """The labels file the source reads (as for dermray stage --labels)."""
    npz: str | None = None
    """The .npz file of a medmnist source."""
    image_col: str = "image"
    """csv source: the column naming each image file."""
    label_col: str = "label"
    """csv source: the column holding each label."""
    group_col: str | None = None
    """csv source: the column grouping images (lesion or patient) so a group shares a split."""
    classes: list[str] | None = None
    """The class list, in order (none: the source's own or the labels found)."""


class NightlyConfig(SourceFields):
    """``dermray nightly``: where new data arrives, where the registry lives, and the promotion rule. The other
    sections configure the challenger's training."""

    source: str = "synthetic"
    """A ``dermray stage`` source (csv, folder, ham10000, isic2018/2019/2020, medmnist, synthetic)."""
    synthetic_images_per_class: int = Field(150, ge=1)
    """synthetic source: images drawn per class."""
    dataset: str = "./dermray-store/datasets/nightly"
    """Where the source is re-staged (stable grouped splits: old images keep their split)."""
    registry: str = "./dermray-store/registry"
    """The model registry: champion pointer, decision history, lock, evaluation reports."""
    holdout_split: str = "test"
    """The split champion and challenger are both evaluated on."""
    metric: Literal["balanced_accuracy", "accuracy", "roc_auc_ovr", "malignant_auc", "melanoma_auc"] = (
        "balanced_accuracy"
    )
    """The holdout metric that decides a promotion."""
    margin: float = Field(0.0, ge=0.0)
    """The challenger is promoted only when it beats the champion's metric by at least this much."""
    min_malignant_sensitivity: float = Field(0.0, ge=0.0, le=1.0)
    """...and only when its sensitivity for the malignant class (through the taxonomy) is at least this."""
    lock_ttl_hours: float = Field(12.0, gt=0.0)
    """A lock older than this is taken to belong to a killed run and is taken over."""
    mlflow_model_name: str = "dermray"
    """With MLflow tracking on: the registered model whose alias 'champion' follows every promotion."""

    @model_validator(mode="after")
    def _known_source(self) -> NightlyConfig:
        from dermray.data.sources import SOURCES

        if self.source not in SOURCES:
            raise ValueError(f"nightly.source: unknown source '{self.source}'; choose one of: {', '.join(SOURCES)}")
        return self


class SearchDimension(_Strict):
    """One searched hyperparameter of ``tune.space`` (keyed by its dotted config key, e.g. ``train.lr``)."""

    type: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    """How values are drawn: loguniform/uniform/randint between low and high, choice or grid over values."""
    low: float | None = None
    """Lower bound (loguniform, uniform, randint)."""
    high: float | None = None
    """Upper bound (loguniform, uniform; exclusive for randint)."""
    values: list[Any] | None = None
    """choice: sampled from; grid: every value is tried (times tune.num_samples)."""

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a {self.type} dimension needs a non-empty 'values' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension needs 'low' < 'high'")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("a loguniform dimension needs 'low' > 0")
        return self


def _default_space() -> dict[str, SearchDimension]:
    return {
        "train.lr": SearchDimension(type="loguniform", low=3e-4, high=1e-2),
        "train.weight_decay": SearchDimension(type="loguniform", low=1e-5, high=1e-2),
        "data.augment.rotation_degrees": SearchDimension(type="uniform", low=0.0, high=180.0),
        "data.augment.vflip_p": SearchDimension(type="uniform", low=0.0, high=0.5),
        "data.augment.brightness": SearchDimension(type="uniform", low=0.0, high=0.3),
        "data.augment.scale_min": SearchDimension(type="uniform", low=0.25, high=0.9),
    }


class TuneSection(_Strict):
    """``dermray tune``: the search space and the sweep; each trial is a full ``dermray train`` run."""

    name: str = "sweep"
    """The sweep's folder under run.storage (trials' runs, results table, plot, best config); the same name
    resumes an interrupted sweep."""
    space: dict[str, SearchDimension] = Field(default_factory=_default_space)
    """Searched config keys (dotted, e.g. train.lr) and how each is drawn."""
    num_samples: int = Field(6, ge=1)
    """Trials drawn from the space (with grid dimensions: repeats of the grid)."""
    metric: str = "val_balanced_accuracy"
    """Any metric a training epoch reports: val_balanced_accuracy, val_accuracy, val_roc_auc, val_loss, ..."""
    mode: Literal["max", "min"] = "max"
    """Whether tune.metric is best high (max) or low (min)."""
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    """asha: stops trials that trail the others at each rung (after grace_period epochs, then x reduction_factor).
    pbt: population-based training; every perturbation_interval epochs a trial in the bottom quantile_fraction
    continues from the checkpoint of one in the top, with that trial's hyperparameters perturbed (a schedule of
    learning rate and augmentation strengths, not one fixed value). Works best when every trial runs at once."""
    grace_period: int = Field(1, ge=1)
    """asha: epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """asha: the rung spacing and the share of trials kept at each (1 in reduction_factor)."""
    perturbation_interval: int = Field(2, ge=1)
    """pbt: epochs between a trial's exploit/explore steps."""
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)
    """pbt: the share of trials that copy (bottom) and are copied (top)."""
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)
    """pbt: chance that an explored value is drawn afresh from its dimension instead of multiplied by 0.8 or 1.2
    (choice and grid values move to a neighbouring value); values stay within the dimension's low and high."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """None: as many as the cluster fits (GPUs, or CPUs beyond scaling.data_cpus), given the trial's workers."""
    seed: int = 0
    """Seeds the random search, so the same space and seed draw the same trials."""


class Config(_Strict):
    data: DataConfig = DataConfig()
    """What is read: the manifest, its splits, augmentation."""
    model: ModelConfig = ModelConfig()
    """The backbone, input size and starting weights."""
    train: TrainConfig = TrainConfig()
    """Optimisation: epochs, phases, optimizer, schedule, imbalance handling."""
    scaling: ScalingConfig = ScalingConfig()
    """Ray Train workers and their resources."""
    run: RunConfig = RunConfig()
    """Where the run is stored, its name, failure retries, checkpoint retention."""
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)  # (built on use: its check imports the sources)
    """dermray nightly: the watched source, the registry, the promotion rule."""
    tune: TuneSection = TuneSection()
    """dermray tune: the search space, scheduler and trials."""

    @property
    def image_size(self) -> int:
        """The input size before the data is read: a config without a manifest trains on the embedded synthetic
        set. The trainer decides with the manifest in hand (``with_manifest``)."""
        return self.image_size_for("synthetic" if self.data.manifest is None else None)

    def image_size_for(self, source: str | None) -> int:
        """model.image_size when set; else 64 px for synthetic lesions (drawn at 96 px, so larger inputs only cost
        time; at least the backbone's minimum), else the backbone's own size (299 for inception_v3, else 224)."""
        from dermray.models.backbones import BACKBONES

        if self.model.image_size is not None:
            return self.model.image_size
        spec = BACKBONES.get(self.model.backbone)
        if source == "synthetic":
            return max(EMBEDDED_IMAGE_SIZE, spec.min_image_size if spec else 0)
        return spec.default_image_size if spec else 224

    def with_manifest(self, manifest: str, source: str) -> Config:
        """This config reading ``manifest`` (staged from ``source``), with the image size that data implies pinned:
        the saved config and every checkpoint then say what ran. (Derived from a null data.manifest instead, the
        size went wrong whenever a caller filled the manifest in: tune and nightly do.)"""
        return self.model_copy(update={
            "data": self.data.model_copy(update={"manifest": manifest}),
            "model": self.model.model_copy(update={"image_size": self.image_size_for(source)}),
        })

    def with_absolute_paths(self) -> Config:
        """The config with the local paths that workers read made absolute (storage URIs unchanged): Tune trials
        run in working directories of their own, where ``./dermray-store/...`` would name nothing."""

        def absolute(uri: str | None) -> str | None:
            return storage.normalize(uri) if uri else uri

        return self.model_copy(update={
            "data": self.data.model_copy(update={"manifest": absolute(self.data.manifest)}),
            "model": self.model.model_copy(update={"weights": absolute(self.model.weights),
                                                    "init_checkpoint": absolute(self.model.init_checkpoint)}),
            "run": self.run.model_copy(update={"storage": absolute(self.run.storage)}),
        })

    @model_validator(mode="after")
    def _known_backbone(self) -> Config:
        from dermray.models.backbones import BACKBONES

        if self.model.backbone not in BACKBONES:
            raise ValueError(
                f"model.backbone: unknown backbone '{self.model.backbone}'; choose one of: {', '.join(BACKBONES)}"
            )
        minimum = BACKBONES[self.model.backbone].min_image_size
        if self.image_size < minimum:
            raise ValueError(f"model.image_size: {self.model.backbone} trains at {minimum} px or more")
        return self


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] == "extra_forbidden" else f" (got {value!r})"
    more = f" [+{len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    return f"config: {where + ': ' if where else ''}{message}{shown}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML, so numbers, booleans and null work)."""
    if "=" not in text:
        raise DermrayError(f"--set '{text}': expected dotted.key=value, e.g. --set train.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """Set ``data["a"]["b"]["c"] = value`` for the key ``a.b.c``, creating sections as needed."""
    path = key.strip().split(".")
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise DermrayError(f"{key}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(data, ".".join(path), value)
    return data


def config_from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise DermrayError(_one_line(error)) from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The config from a YAML file (local path or storage URI), with ``--set`` overrides applied."""
    data: dict = {}
    if path:
        if not storage.exists(path):
            raise DermrayError(f"config: file not found: {path}")
        try:
            data = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as error:
            raise DermrayError(f"config: {path} is not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise DermrayError(f"config: {path} must hold a mapping of sections (data, model, train, ...)")
    return config_from_dict(apply_overrides(data, overrides or []))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _type_text(field) -> str:
    text = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("Literal", "one of ").replace("NoneType", "None")


def _default_text(field) -> str:
    if field.default_factory is not None:
        return "(see below)" if field.default_factory is _default_space else "[]"
    return "none" if field.default is None else f"`{field.default}`"


def config_reference() -> str:
    """docs/config.md: every config key with its type, default and description, generated from the models
    above (``tests/test_config.py`` checks the file is current: run ``python dev/config_reference.py``)."""
    lines = ["# Config reference", "",
             "Every key of a dermray config (YAML, or `--set section.key=value`), generated from",
             "`dermray/config.py` by `python dev/config_reference.py`. The embedded default is these defaults.", ""]

    def section(model: type[BaseModel], prefix: str, intro: str | None) -> None:
        nested = []
        about = " ".join((model.__doc__ or intro or "").split())
        lines.extend([f"## `{prefix}`", "", about, "",
                      "| key | type | default | description |", "|---|---|---|---|"])
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                nested.append((field.annotation, f"{prefix}.{name}", field.description))
                lines.append(f"| `{prefix}.{name}` | section | | {field.description} (below) |")
                continue
            description = (field.description or "").replace("\n", " ").replace("|", "\\|")
            kind = _type_text(field).replace("|", "or")
            lines.append(f"| `{prefix}.{name}` | {kind} | {_default_text(field)} | {description} |")
        lines.append("")
        for child, child_prefix, child_intro in nested:
            section(child, child_prefix, child_intro)

    for name, field in Config.model_fields.items():
        section(field.annotation, name, field.description)
    lines.extend(["## `tune.space` entries", "", (SearchDimension.__doc__ or "").strip(), "",
                  "| field | type | description |", "|---|---|---|"])
    for name, field in SearchDimension.model_fields.items():
        lines.append(f"| `{name}` | {_type_text(field).replace('|', 'or')} | {field.description} |")
    lines.extend(["", "The default space:", "", "```yaml", yaml.safe_dump(
        {k: v.model_dump(exclude_none=True) for k, v in _default_space().items()}, sort_keys=False).rstrip(), "```"])
    return "\n".join(lines) + "\n"
