"""One name for a :class:`CutInputs` and its :class:`RunSession`, for the callers that still use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferlab.data import ImageSplits
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.cut_plan import check_feature_augment_planned
from transferlab.features.engine import EngineConfig
from transferlab.models import Backbone
from transferlab.train.session import FrozenWeightsChanged, RunSession, TestEvaluation

__all__ = ["EngineConfig", "FrozenWeightsChanged", "TestEvaluation", "Workbench"]


class Workbench(RunSession):
    """A RunSession on CutInputs it makes itself; the inputs' methods and attributes are its own."""

    def __init__(self, backbone: Backbone, splits: ImageSplits, engine: EngineConfig, cache_dir: str | Path | None,
                 on_bad_image: str = "error", share_cut_layers: int | None = None, layer_order: str = "forward"):
        super().__init__(CutInputs(backbone, splits, engine, cache_dir, on_bad_image, share_cut_layers, layer_order))

    def __getattr__(self, name: str) -> Any:  # setup, views, cache_origin, check_feature_augment, backbone, splits, ...
        if name == "inputs":
            raise AttributeError(name)
        return getattr(self.inputs, name)

    def check_feature_augment_planned(self, feature_augment: str, n_trainable_layers: int) -> None:
        """:func:`~transferlab.features.cut_plan.check_feature_augment_planned` on these inputs."""
        inputs = self.inputs
        check_feature_augment_planned(inputs.backbone, inputs.splits, inputs.engine, feature_augment, n_trainable_layers,
                                      inputs.layer_order)
