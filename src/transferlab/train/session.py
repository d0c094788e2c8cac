"""A run session: the model state of one backbone across the runs on its :class:`CutInputs`.

Every run starts from the pristine pretrained weights (captured when the session is made) and a head
initialised from the run's seed, trains on what its config asks of the inputs, and is checked for
changed frozen weights; a chosen run's trained state is loaded back to evaluate the test split once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from transferlab.core.errors import ConfigError
from transferlab.data import Split
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.sources import BatchSource, ImageSource, MapAugmentSource, SplitInputs, TensorSource, ViewSource
from transferlab.models.freezing import FreezePlan, frozen_digest, layer_of, load_state_strict, plan_cut, set_train_mode, trainable_state_keys
from transferlab.models.heads import new_head
from transferlab.train.config import TrainConfig, parse_feature_augment
from transferlab.train.interpolation import wise_interpolate
from transferlab.train.loop import fit, predict_proba
from transferlab.train.results import EpochRecord, FitResult


class FrozenWeightsChanged(RuntimeError):
    """A parameter or buffer that should be frozen changed during training (MoCo's linear-eval check)."""


@dataclass
class TestEvaluation:
    """The chosen model's predictions on the test split (computed once)."""

    accuracy: float
    probs: torch.Tensor  # (N, C) float64
    labels: list[int]
    files: list[str]


class RunSession:
    """Training runs on `inputs`, each from the pristine pretrained weights; then the test evaluation."""

    def __init__(self, inputs: CutInputs):
        """A session on `inputs`; the weights the backbone holds now are the pristine ones every run starts from
        (make it before anything trains the backbone)."""
        self.inputs = inputs
        self.pristine = {k: v.detach().clone() for k, v in inputs.backbone.model.state_dict().items()}

    @property
    def model(self) -> torch.nn.Module:
        """The backbone's model, holding the last run's (or loaded) state."""
        return self.inputs.backbone.model

    def reset(self, seed: int, n_trainable_layers: int = 1) -> torch.nn.Linear:
        """Pristine pretrained weights everywhere, a fresh head initialised from `seed`, the last layers trainable."""
        backbone, placement = self.inputs.backbone, self.inputs.placement
        self.model.load_state_dict(self.pristine)
        head = new_head(backbone.feature_dim, self.inputs.n_classes, seed).to(placement.device, placement.dtype)
        backbone.reset_classifier(head)
        FreezePlan(n_trainable_layers, self.inputs.layer_order).apply(backbone)
        return head

    def train_source(self, cfg: TrainConfig, n_trainable_layers: int) -> BatchSource:
        """What `cfg` trains on: plain inputs, or their augmented views (``--augment``, ``--ft-augment``; views
        of images decoded every epoch, at the input or uncached, are drawn on the fly, as ``--augment`` draws them)."""
        inputs = self.inputs
        train = inputs.setup(n_trainable_layers).sources["train"]
        kind, n_views = parse_feature_augment(cfg.feature_augment) or ("none", 0)
        if cfg.augment:
            if not isinstance(train, ImageSource):
                raise ConfigError("augment", True, "needs the backbone to run on every image every epoch (--no-cache)")
            return train.augmented(cfg.seed, cfg.augment_min_scale)
        if kind == "views" and isinstance(train, ImageSource):  # images decoded every epoch: a fresh view each time
            return train.augmented(cfg.seed, cfg.augment_min_scale)
        if kind == "views":
            views = inputs.views(n_trainable_layers, n_views, cfg.seed, cfg.augment_min_scale)
            return ViewSource(views.inputs, views.labels, inputs.placement, cfg.seed)
        if kind == "map":
            inputs.check_feature_augment("map", n_trainable_layers)
            assert isinstance(train, TensorSource)
            return MapAugmentSource(SplitInputs(train.inputs, train.labels, []), inputs.placement, cfg.seed, cfg.augment_min_scale)
        return train

    def run(self, cfg: TrainConfig, n_trainable_layers: int, start_state: dict | None = None,
            on_epoch: Callable[[EpochRecord], None] | None = None) -> FitResult:
        """One training run from pristine weights (plus `start_state`, e.g. a probe's best trainable state).

        The frozen part's digest is compared before and after: a change fails the run.
        """
        if cfg.layer_order != self.inputs.layer_order:
            raise ValueError(f"run with layer_order={cfg.layer_order} on inputs ordering layers by {self.inputs.layer_order}")
        setup = self.inputs.setup(n_trainable_layers)
        head = self.reset(cfg.seed, n_trainable_layers)
        if start_state is not None:
            load_state_strict(self.model, {k: v.to(self.inputs.placement.device) for k, v in start_state.items()})
        train = self.train_source(cfg, n_trainable_layers)
        frozen_before = frozen_digest(self.model)
        # The L2-SP anchors: pretrained values of the fine-tuned backbone tensors (not the new head).
        head_prefix = self.inputs.backbone.classifier_name + "."
        pretrained = {n: self.pristine[n] for n, p in self.model.named_parameters()
                      if p.requires_grad and not n.startswith(head_prefix)} if cfg.l2sp else None
        net = self.inputs.net(n_trainable_layers)
        wise = start_state is not None and bool(cfg.wise_alphas) and tuple(cfg.wise_alphas) != (1.0,)  # (1,): no interpolation
        # With interpolation, a = 0 is the start: early stopping picks the best trained epoch (>= 1).
        blocks = [b for _, b in self.inputs.backbone.chain() if next(b.parameters(), None) is not None]
        result = fit(self.model, net, head, train, setup.sources["val"], cfg, on_epoch, pretrained, first_candidate=int(wise),
                     blocks=blocks)
        if wise and result.status == "done":
            result = wise_interpolate(self.model, net, setup.sources["val"], result, cfg.wise_alphas, cfg.select)
        if frozen_digest(self.model) != frozen_before:
            raise FrozenWeightsChanged("a frozen parameter or buffer changed during training")
        return dataclasses.replace(result, start_state=None)  # the start is the caller's already

    def load_trained(self, n_trainable_layers: int, state: dict) -> None:
        """Put a run's trained state (e.g. a FitResult's best_state) into the model for evaluation."""
        self.reset(seed=0, n_trainable_layers=n_trainable_layers)
        required = set(trainable_state_keys(self.model))
        load_state_strict(self.model, {k: v.to(self.inputs.placement.device) for k, v in state.items()}, required)

    def evaluate_test(self, n_trainable_layers: int) -> TestEvaluation | None:
        """The current model on the test split: accuracy and per-image probabilities (None without a test split)."""
        return self.evaluate_split(n_trainable_layers, self.inputs.splits.test)

    def evaluate_split(self, n_trainable_layers: int, test: Split | None) -> TestEvaluation | None:
        """The current model on `test` (the test split, or an extra test set): one pass; None for no split."""
        source = self.inputs.split_source(n_trainable_layers, test)
        if test is None or source is None:
            return None
        set_train_mode(self.model, False)
        probs = predict_proba(self.inputs.net(n_trainable_layers), source)  # one pass over the split
        bad = set(self.inputs.skipped_files.get(test.name, []))
        kept = [i for i, f in enumerate(test.files) if f not in bad]
        labels = [test.labels[i] for i in kept]
        wrong = int((probs.argmax(1) != torch.tensor(labels)).sum())
        accuracy = 1.0 - wrong / len(labels)
        return TestEvaluation(accuracy, probs, labels, [test.files[i] for i in kept])

    def trainable_param_count(self, n_trainable_layers: int) -> int:
        """Parameters trained for `n_trainable_layers` (the head included)."""
        layers = set(plan_cut(self.inputs.backbone, n_trainable_layers, self.inputs.layer_order).trainable_layers)
        return sum(p.numel() for name, p in self.model.named_parameters() if layer_of(name) in layers)
