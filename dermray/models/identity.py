"""What a checkpoint is a model of, beyond its weights.

Kept apart from ``dermray.models.checkpoint`` (torch, torchvision) because it travels inside every Train run's
``train_loop_config``, which Ray Train's controller unpickles: a light module here keeps torchvision and
scikit-learn out of the controller's start-up, a few seconds on the critical path of every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dermray.taxonomy import melanoma_class, taxonomy_tree

if TYPE_CHECKING:
    from dermray.config import Config


@dataclass(frozen=True)
class ModelIdentity:
    """What a checkpoint is a model of, beyond its weights: written into every checkpoint of a run."""

    classes: list[str]
    taxonomy: dict[str, list[str]] | None
    melanoma_class: str | None
    config: dict  # the resolved experiment config, as JSON

    @classmethod
    def of(cls, config: Config, classes: list[str], taxonomy: str | None) -> ModelIdentity:
        """The identity of a model of ``config`` trained on ``classes`` of a manifest with ``taxonomy``."""
        return cls(classes=classes, taxonomy=taxonomy_tree(taxonomy, classes),
                   melanoma_class=melanoma_class(taxonomy, classes), config=config.model_dump(mode="json"))
