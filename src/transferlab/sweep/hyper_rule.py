"""The default fine-tuning grid as a rule of the data, written once (as big_transfer's BiT-HyperRule).

What the rule fixes, and where it comes from:

- **What trains: the whole network** (``blocks: all``). Kornblith et al. 2019 ("Do better ImageNet models
  transfer better?") and Kumar et al. 2022 (LP-FT) fine-tune every layer; on sets far from the source
  (sketches, satellite and medical images) the early layers must move too, and that is where fine-tuning
  beats the probe by 8-50 points (VTAB-1k; Kornblith et al.'s Cars and Aircraft).
- **Augmentation: random-resized crops and horizontal flips**, which every reference uses (Kornblith et
  al.'s Inception crops, TLlib's RandomResizedCrop + flip, BiT's random crops + flip). With the trainable
  part at the input they are drawn on the fly, a fresh view every epoch (``views:4`` names them: where a
  deeper cut is chosen by hand, 4 cached views instead). BiT adds MixUp only above 20k images; it is not
  implemented here.
- **Optimiser: AdamW** (decoupled weight decay, Loshchilov & Hutter 2019; timm's fine-tuning recipes),
  weight decay 0.05 on the backbone's weight tensors (timm, ConvNeXt/DeiT fine-tuning), the head
  keeping the probe's l2. Adam-type steps are scaled per parameter, so one short lr grid carries across
  architectures whose gradient scales differ; SGD + Nesterov (``--ft-optimizer sgd --ft-nesterov``,
  Kornblith et al.) needs the wider lr sweep they ran (1e-4..0.1). Another optimizer given without
  ``--ft-weight-decay`` runs without weight decay (0.05 is a decoupled rate, not an L2 coefficient).
- **Learning rates: the head at 1e-3 or 3e-3, the backbone at 0.1 of it** (TLlib's 0.1 backbone
  multiplier; fastai's discriminative rates span the same decade), 1 warmup epoch then cosine decay to 0
  (Kumar et al.: cosine; BiT: warmup), batch 32 (TLlib), pretrained batch-norm statistics kept (small
  target sets give noisy batch statistics).
- **How long: about 8,000 training images seen** (250 steps of 32), at least 5 and at most 15 epochs. BiT's
  rule keeps the number of steps fixed below 20k images (500 steps of 512); this budget is that shape
  scaled to a laptop CPU (one whole-network run of EfficientNet-Lite0 at 224 px takes about 4 minutes
  there), with at least 5 passes so that every image is seen in several crops, so cost grows linearly
  with the data above 1,600 images.
- **One seed per configuration** (seed 0; the probes' seeds would double the cost of runs that each cost
  ~100 probes), and LP-then-FT interpolates with the probe (WiSE-FT, a in 0, 0.25, ..., 1) as before.

Only the length follows the data's size: the lr grid and the augmentation do not (BiT's lr does not
either; its resolution follows the image size, which is the backbone's here).

Every value can be overridden per field (``--ft-lr``, YAML ``ft: {epochs: 20}``); what a user sets is kept
and the rule fills in the rest once the training split's size is known.
"""

from __future__ import annotations

RULE_NAME = "whole-network rule (transferlab 0.3)"

# The rule's values that do not depend on the data (epochs: until the data's size is known, the cap).
FIXED: dict[str, tuple] = {
    "lr": (1e-3, 3e-3), "backbone_lr_mult": (0.1,), "optimizer": ("adamw",), "weight_decay": (0.05,), "nesterov": (False,),
    "layer_decay": (1.0,),
    "feature_augment": ("views:4",), "l2sp": (0.0,), "label_smoothing": (0.0,), "batch_size": (32,),
    "lr_schedule": ("cosine",), "warmup_epochs": (1,), "patience": (5,), "seed": (0,), "epochs": (15,),
    "wise_alphas": ((0.0, 0.25, 0.5, 0.75, 1.0),), "train_bn": (False,),
}
DEFAULT_UNIT: str = "all"  # --ft-blocks when neither it nor --ft-layers is given
IMAGES_SEEN, MIN_EPOCHS, MAX_EPOCHS = 8_000, 5, 15


def weight_decay_for(optimizers: tuple) -> tuple:
    """The rule's weight decay for the fine-tuning optimizers in use: 0.05 is AdamW's (decoupled); with Adam
    or SGD it would be an L2 gradient term of another scale, so another optimizer given without
    ``--ft-weight-decay`` fine-tunes without weight decay."""
    return (0.05,) if tuple(optimizers) == ("adamw",) else (0.0,)


def rule_epochs(n_train: int) -> int:
    """Epochs of a fine-tuning run on `n_train` training images: about IMAGES_SEEN images, within
    [MIN_EPOCHS, MAX_EPOCHS]."""
    return max(MIN_EPOCHS, min(MAX_EPOCHS, round(IMAGES_SEEN / max(n_train, 1))))


def sized(n_train: int) -> dict[str, tuple]:
    """The rule's values that follow from the training split's size."""
    return {"epochs": (rule_epochs(n_train),)}
