import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from transferlab.core.errors import UserError
from transferlab.data import build_transform, load_rgb, load_splits
from transferlab.models.registry import PYTORCHCV_PRE


def test_folder_splits_keep_class_order_and_counts(tiny_folder):
    s = load_splits(tiny_folder)
    assert s.classes == ("a", "b", "c")
    assert s.train.counts(3) == [8, 8, 8] and s.val.counts(3) == [3, 3, 3] and s.test.counts(3) == [3, 3, 3]
    assert s.val.source == "val/"
    assert all(f.endswith(".png") for f in s.train.files)


def test_carved_validation_is_stratified_seeded_and_disjoint(tmp_path):
    root = write_image_folder(tmp_path, {"train": {"x": 10, "y": 20, "z": 5}})
    a = load_splits(root, valid_frac=0.2, split_seed=1)
    assert a.test is None
    assert a.val.counts(3) == [2, 4, 1]  # round(0.2 * n) per class
    assert a.train.counts(3) == [8, 16, 4]
    assert not set(a.train.files) & set(a.val.files)
    assert len(set(a.train.files) | set(a.val.files)) == 35
    b = load_splits(root, valid_frac=0.2, split_seed=1)
    c = load_splits(root, valid_frac=0.2, split_seed=2)
    assert a.val.files == b.val.files
    assert a.val.files != c.val.files


def test_test_split_val_carves_validation_from_train(tmp_path):
    root = write_image_folder(tmp_path, {"train": {"ants": 10, "bees": 10}, "val": {"ants": 4, "bees": 5}})
    s = load_splits(root, test_split="val")
    assert s.test.counts(2) == [4, 5] and s.test.source == "val/"
    assert s.val.source.startswith("carved from train/")
    assert s.val.counts(2) == [2, 2] and s.train.counts(2) == [8, 8]


def test_max_per_class_caps_train_before_carving(tmp_path):
    root = write_image_folder(tmp_path, {"train": {"x": 30, "y": 12}})
    s = load_splits(root, max_per_class=10, valid_frac=0.2)
    assert s.train.counts(2) == [8, 8] and s.val.counts(2) == [2, 2]


def test_class_mismatch_names_the_classes(tmp_path):
    root = write_image_folder(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 2, "c": 2}})
    with pytest.raises(UserError, match=r"only in .*train: b; only in .*val: c"):
        load_splits(root)


def test_missing_train_and_empty_class(tmp_path):
    with pytest.raises(UserError, match="missing .*train"):
        load_splits(tmp_path)
    root = write_image_folder(tmp_path, {"train": {"a": 3}})
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images.*empty"):
        load_splits(root)


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    root = write_image_folder(tmp_path, {"train": {"a": 3, "b": 3}})
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "a" / "readme.txt").write_text("x")
    s = load_splits(root)
    assert len(s.train) + len(s.val) == 6
    assert len(s.ignored_files) == 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "1"])
def test_any_mode_decodes_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        img = Image.fromarray(np.linspace(0, 65535, 600).astype(np.uint16).reshape(20, 30))
        path = tmp_path / "x.png"
    else:
        img = rgb.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_rgb(str(path))
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":  # scaled to 8 bits, not clipped: the brightest pixel is near white
        assert np.asarray(out).max() >= 250


def test_transform_resizes_crops_and_normalises(tmp_path):
    img = Image.new("RGB", (300, 227), (124, 116, 104))  # the ImageNet mean colour
    x = build_transform(PYTORCHCV_PRE)(img)
    assert tuple(x.shape) == (3, 224, 224)
    assert float(x.abs().max()) < 0.01


def test_an_image_loader_with_workers_leaves_the_sigchld_handler_as_it_was(tiny_folder):
    # Each in a fresh process: torch installs its SIGCHLD handler once per process, on the first
    # multi-worker loader iterated in the main thread; the bare DataLoader shows that it does.
    import subprocess
    import sys

    script = """
import signal, sys, torch
from transferlab.models.registry import PYTORCHCV_PRE
from transferlab.data import ImageDataset, image_loader, load_splits
train = load_splits(sys.argv[1]).train
before = signal.getsignal(signal.SIGCHLD)
if sys.argv[2] == "ours":
    loader = image_loader(train, PYTORCHCV_PRE, 4, num_workers=2)
else:
    loader = torch.utils.data.DataLoader(ImageDataset(train, PYTORCHCV_PRE), batch_size=4, num_workers=2)
print(sum(len(b[0]) for b in loader), signal.getsignal(signal.SIGCHLD) is before)
"""

    def images_and_unchanged(which):
        out = subprocess.run([sys.executable, "-c", script, str(tiny_folder), which], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert images_and_unchanged("bare") == ["24", "False"]
    assert images_and_unchanged("ours") == ["24", "True"]
