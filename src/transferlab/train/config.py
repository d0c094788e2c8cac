"""The hyperparameters of one training run, and the two small rules every phase shares: what an
``--ft-augment`` value means and what is minimised to choose (an epoch, a configuration, an interpolation)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from transferlab.core.errors import ConfigError
from transferlab.core.fields import option
from transferlab.features.cut_plan import parse_feature_augment

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "one_cycle")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run (saved beside every run)."""

    lr: float = option(1e-3, "learning rate")
    l2: float = option(0.0, "loss = mean xent + (l2 / n_train) * sum(W_head^2)")
    seed: int = option(0, "head init and batch order")
    epochs: int = option(100, "maximum number of epochs")
    patience: int = option(15, "epochs without a val xent improvement before stopping")
    batch_size: int = option(64, "minibatch size")
    optimizer: str = option("adam", "adam, adamw (Adam with decoupled weight decay) or sgd with momentum",
                            choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "SGD with Nesterov momentum", identity_when_set=True)
    weight_decay: float = option(0.0, "weight decay of the fine-tuned backbone's weight tensors (not biases or "
                                 "normalisation, not the head, whose penalty is --l2): decoupled with adamw, added to "
                                 "the gradient with adam and sgd", identity_when_set=True)
    layer_decay: float = option(1.0, "layer-wise lr decay: a backbone block d blocks before the head's block learns at "
                                "lr * backbone_lr_mult * layer_decay**d (1: one rate for the backbone)", identity_when_set=True)
    # Trainable batch-norm layers: False keeps normalising with the pretrained running statistics
    # (small target sets give noisy batch statistics, and switching a probe's features to them
    # shifts what the head was trained on); True uses and updates batch statistics.
    train_bn: bool = option(False, "trainable batch-norm layers use batch statistics (default: pretrained running statistics)")
    augment: bool = option(False, "random resized crops and flips of training images (runs the backbone every epoch)")
    label_smoothing: float = option(0.0, "cross-entropy against labels smoothed by this much (0: plain)")
    l2sp: float = option(0.0, "L2-SP: + l2sp * sum ||w - w_pretrained||^2 over the fine-tuned backbone tensors (the head keeps --l2)")
    feature_augment: str = option("none", "augmentation on the cached path: none, views:K (K seeded crop+flip views of "
                                  "every training image cached through the frozen part, one drawn per image each "
                                  "epoch) or map (random crops and flips of cached spatial maps)", flag="--ft-augment")
    augment_min_scale: float = option(0.35, "smallest random crop, as a fraction of the image (or map) area")
    backbone_lr_mult: float = option(1.0, "trainable backbone layers learn at lr times this (the head at lr)",
                                     flag="--ft-backbone-lr-mult")
    lr_schedule: str = option("constant", "learning rate over the run: constant, cosine (decay to 0 over --epochs) or "
                              "one_cycle (cosine from lr/25 up to lr over the first 0.3 of the steps, then down to lr/25e4; "
                              "it warms up itself: warmup_epochs is not used)",
                              choices=LR_SCHEDULES)
    warmup_epochs: int = option(0, "linear learning-rate warmup from 0 over this many epochs (constant and cosine)")
    select: str = option("val_xent", "what early stopping (and a sweep's choices) minimise: val_xent or val_err, "
                         "ties broken by the other", choices=("val_xent", "val_err"))
    wise_alphas: tuple[float, ...] = option((), "after a run that starts from another run (LP-then-FT): weight "
                                            "interpolations (1-a)*start + a*trained to try on validation (WiSE-FT)",
                                            flag="--wise")
    layer_order: str = option("forward", "which layers are 'the last k': in the order a forward pass runs them, or by "
                              "parameter definition (the course's rule)", choices=("forward", "definition"))

    def validate(self) -> None:
        """ConfigError naming the field for values that cannot train."""
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be a positive number"),
            (math.isfinite(self.l2) and self.l2 >= 0, "l2", self.l2, "must be zero or positive"),
            (self.epochs >= 0, "epochs", self.epochs, "must be zero or positive"),
            (self.patience >= 1, "patience", self.patience, "must be at least 1"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1"),
            (self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, "expected " + ", ".join(OPTIMIZERS)),
            (not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0), "nesterov", self.nesterov,
             f"needs the sgd optimizer with a momentum above 0 (optimizer is {self.optimizer}, momentum {self.momentum:g})"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
             "must be zero or positive"),
            (math.isfinite(self.layer_decay) and 0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "must be in (0, 1]"),
            (self.layer_order in ("forward", "definition"), "layer_order", self.layer_order, "expected forward or definition"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "must be in [0, 1)"),
            (math.isfinite(self.l2sp) and self.l2sp >= 0, "l2sp", self.l2sp, "must be zero or positive"),
            (parse_feature_augment(self.feature_augment) is not None, "feature_augment", self.feature_augment,
             "expected none, map or views:K with K >= 1"),
            (0.0 < self.augment_min_scale <= 1.0, "augment_min_scale", self.augment_min_scale, "must be in (0, 1]"),
            (math.isfinite(self.backbone_lr_mult) and self.backbone_lr_mult >= 0, "backbone_lr_mult",
             self.backbone_lr_mult, "must be zero or positive"),
            (self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, "expected " + ", ".join(LR_SCHEDULES)),
            (0 <= self.warmup_epochs <= max(self.epochs, 0), "warmup_epochs", self.warmup_epochs,
             f"must be in [0, epochs = {self.epochs}]"),
            (self.select in ("val_xent", "val_err"), "select", self.select, "expected val_xent or val_err"),
            (not (self.augment and self.feature_augment != "none"), "feature_augment", self.feature_augment,
             "cannot be combined with --augment (which already shows new views every epoch)"),
            (all(0.0 <= a <= 1.0 for a in self.wise_alphas), "wise_alphas", ",".join(map(str, self.wise_alphas)),
             "every a must be in [0, 1]"),
        ]
        for ok, name, value, reason in checks:
            if not ok:
                raise ConfigError(name, value, reason)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from its ``dataclasses.asdict`` form read back from JSON (lists become tuples again)."""
        fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)

    def schedule(self) -> tuple:
        """Everything but lr, l2 and patience: runs that share it see identical minibatches."""
        return tuple(v for k, v in dataclasses.asdict(self).items() if k not in ("lr", "l2", "patience"))


def selection_key(select: str, val_xent: float, val_err: float) -> tuple[float, float]:
    """What is minimised to choose an epoch, a configuration or an interpolation: the criterion, then the other."""
    return (val_err, val_xent) if select == "val_err" else (val_xent, val_err)
