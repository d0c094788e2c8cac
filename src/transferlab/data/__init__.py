"""Image data: from a folder tree or a labels CSV to batches of normalised tensors.

One job per module, each importing only :mod:`transferlab.core` and the modules listed before it:

- :mod:`~transferlab.data.splits`: the ``Split`` / ``ImageSplits`` records, sampling and carving, fingerprints
- :mod:`~transferlab.data.decoding`: any image file into 8-bit RGB (``DECODER`` names the rules)
- :mod:`~transferlab.data.csv_labels`: splits from a ``path,label[,split]`` file
- :mod:`~transferlab.data.folders`: splits from ``ROOT/train/<class>/*`` (and val/, test/)
- :mod:`~transferlab.data.config`: ``DataConfig``, the data settings of a run
- :mod:`~transferlab.data.transforms`: ``Preprocessing`` as data, the evaluation and augmented views
- :mod:`~transferlab.data.loader`: the Dataset and DataLoader of decoded images
- :mod:`~transferlab.data.demo`: the offline digits folder

The names below are the package's face: other packages import them from ``transferlab.data``.
"""

from transferlab.data.config import ON_BAD_IMAGE, DataConfig
from transferlab.data.csv_labels import load_csv_splits
from transferlab.data.decoding import (
    BAD_IMAGE_ERRORS,
    DECODER,
    HIGH_DEPTH_MODES,
    IMAGE_EXTENSIONS,
    describe_bad_image,
    load_rgb,
    open_image,
    to_rgb,
)
from transferlab.data.folders import load_splits
from transferlab.data.loader import ChildSignalSafeLoader, ImageDataset, default_num_workers, image_loader
from transferlab.data.splits import ImageSplits, Split, describe_data_change, split_fingerprint
from transferlab.data.transforms import DEFAULT_MIN_SCALE, INTERPOLATIONS, Preprocessing, augmented_view, build_transform

__all__ = [
    "BAD_IMAGE_ERRORS", "DECODER", "DEFAULT_MIN_SCALE", "HIGH_DEPTH_MODES", "IMAGE_EXTENSIONS", "INTERPOLATIONS", "ON_BAD_IMAGE",
    "ChildSignalSafeLoader", "DataConfig", "ImageDataset", "ImageSplits", "Preprocessing", "Split",
    "augmented_view", "build_transform", "default_num_workers", "describe_bad_image", "describe_data_change", "image_loader",
    "load_csv_splits", "load_rgb", "load_splits", "open_image", "split_fingerprint", "to_rgb",
]
