"""The data settings of a run (which folder or labels CSV, how it is split, what to do with bad images)."""

from __future__ import annotations

from dataclasses import dataclass

from transferlab.core.errors import ConfigError
from transferlab.core.fields import option
from transferlab.data.folders import load_splits
from transferlab.data.splits import ImageSplits

ON_BAD_IMAGE = ("error", "skip")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split."""

    data: str = option("", "image folder with train/<class>/* (val/, test/ optional)")
    val_split: str = option("val", "validation folder name")
    test_split: str = option("test", "test folder name")
    valid_frac: float = option(0.2, "fraction of train carved out as validation when there is no val folder")
    split_seed: int = option(0, "seed of the carved validation split and of --max-per-class")
    max_per_class: int | None = option(None, "cap train (+ carved val) images per class")
    on_bad_image: str = option("error", "undecodable image files (and files a labels CSV lists that do not exist): "
                              "list them and stop, or skip them", choices=ON_BAD_IMAGE)

    def load(self) -> ImageSplits:
        """The splits these settings describe (:func:`transferlab.data.folders.load_splits`)."""
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError("on_bad_image", self.on_bad_image, "expected error or skip")
        return load_splits(self.data, self.val_split, self.test_split, self.valid_frac, self.split_seed, self.max_per_class,
                           self.on_bad_image)
