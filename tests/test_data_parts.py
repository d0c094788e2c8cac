"""Specifications of the data package's parts, each against its definition: sampling and carving
(data.splits), the preprocessing sizes and the augmented view (data.transforms), the SIGCHLD-restoring
wrapper and the bad-file item (data.loader)."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.core.errors import ConfigError, UserError
from transferlab.data.loader import ChildSignalSafeLoader, ImageDataset
from transferlab.data.splits import ImageSplits, Split, check_sampling, take_and_carve
from transferlab.data.transforms import Preprocessing, augmented_view


def _files(per_class: dict[str, int]) -> dict[str, list[str]]:
    return {c: [f"{c}/img_{i:02d}.png" for i in range(n)] for c, n in per_class.items()}


# -- data.splits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, frac", [(2, 0.2), (5, 0.2), (7, 0.5), (10, 0.9), (3, 0.99)])
def test_each_class_gives_round_n_times_frac_to_validation_at_least_one_and_keeps_one_for_train(n, frac):
    classes = ("a", "b")
    files = _files({"a": n, "b": n + 3})
    tr, tr_labels, va, va_labels = take_and_carve(classes, files, 0, None, frac, lambda c, k: "")
    for label, c in enumerate(classes):
        size = len(files[c])
        n_val = min(size - 1, max(1, round(size * frac)))
        val_c = [f for f, y in zip(va, va_labels) if y == label]
        train_c = [f for f, y in zip(tr, tr_labels) if y == label]
        assert len(val_c) == n_val and len(train_c) == size - n_val
        assert sorted(val_c + train_c) == files[c] and not set(val_c) & set(train_c)
        assert val_c == sorted(val_c) and train_c == sorted(train_c)  # file order, not permutation order


def test_without_carving_or_cap_train_is_every_file_in_order():
    files = _files({"a": 4, "b": 3})
    tr, tr_labels, va, va_labels = take_and_carve(("a", "b"), files, 7, None, None, lambda c, k: "")
    assert tr == files["a"] + files["b"] and tr_labels == [0] * 4 + [1] * 3 and va == [] and va_labels == []


def test_the_cap_takes_a_seeded_draw_of_that_many_per_class_before_carving():
    files = _files({"a": 10, "b": 2})
    draw = take_and_carve(("a", "b"), files, 3, 4, 0.25, lambda c, k: "")
    assert draw == take_and_carve(("a", "b"), files, 3, 4, 0.25, lambda c, k: "")
    tr, tr_labels, va, va_labels = draw
    assert (tr_labels.count(0), va_labels.count(0)) == (3, 1)  # 4 drawn, round(4 * 0.25) = 1 carved
    assert (tr_labels.count(1), va_labels.count(1)) == (1, 1)  # only 2 exist
    other_seed = take_and_carve(("a", "b"), files, 4, 4, 0.25, lambda c, k: "")
    assert other_seed != draw


def test_carving_a_class_of_one_raises_the_callers_message():
    with pytest.raises(UserError, match="^b has 1$"):
        take_and_carve(("a", "b"), _files({"a": 3, "b": 1}), 0, None, 0.2, lambda c, k: f"{c} has {k}")


@pytest.mark.parametrize("valid_frac, cap, message", [
    (0.0, None, "valid_frac=0.0: must be between 0 and 1"),
    (1.0, None, "valid_frac=1.0: must be between 0 and 1"),
    (0.2, 0, "max_per_class=0: must be at least 1"),
])
def test_sampling_settings_outside_their_range_name_the_field(valid_frac, cap, message):
    with pytest.raises(ConfigError) as e:
        check_sampling(valid_frac, cap)
    assert str(e.value) == message
    check_sampling(0.5, 1)  # the edges that work


def test_a_subset_keeps_name_and_source_and_counts_cover_every_class():
    split = Split("val", ("x", "y", "z", "w"), (0, 2, 2, 0), "val/")
    assert split.counts(4) == [2, 0, 2, 0]
    sub = split.subset([2, 0])
    assert sub == Split("val", ("z", "x"), (2, 0), "val/") and len(sub) == 2


def test_the_summary_lists_each_split_present_and_the_missing_files_only_when_there_are_some():
    train, val = Split("train", ("a1", "b1", "b2"), (0, 1, 1), "train/"), Split("val", ("a2",), (0,), "carved")
    s = ImageSplits("/r", ("a", "b"), train, val, None, ("/r/train/x.txt",))
    assert s.summary() == {"root": "/r", "classes": ["a", "b"], "n_classes": 2,
                           "train": {"source": "train/", "n": 3, "per_class": [1, 2]},
                           "val": {"source": "carved", "n": 1, "per_class": [1, 0]}, "ignored_files": 1}
    with_missing = ImageSplits("/r", ("a", "b"), train, val, None, (), {"train": ("m1", "m2"), "val": ("m3",)})
    assert with_missing.summary()["missing_files"] == 3


# -- data.transforms ------------------------------------------------------------------------------------
def test_the_resize_side_is_input_over_crop_pct_unless_given_or_squashed():
    assert Preprocessing(224, 0.875).resize_size == 256
    assert Preprocessing(224, 0.875, resize=232).resize_size == 232
    assert Preprocessing(224, 0.875, resize=232, squash=True).resize_size == 224


def _halves(w: int, h: int) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2, 0] = 255  # left half red
    arr[:, w // 2 :, 2] = 255  # right half blue
    return Image.fromarray(arr)


def test_the_augmented_view_is_a_function_of_the_generator_and_has_the_input_size():
    pre = Preprocessing(input_size=16)
    img = _halves(40, 30)
    a = augmented_view(img, pre, torch.Generator().manual_seed(1))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, augmented_view(img, pre, torch.Generator().manual_seed(1)))
    views = [augmented_view(img, pre, torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_a_full_scale_view_of_a_square_is_the_whole_image_or_its_mirror_normalised():
    """min_scale 1: a crop of the whole area fits only at an aspect that rounds to the full square, else
    the fallback is the central square; either way the whole image, then a coin-flip mirror."""
    pre = Preprocessing(input_size=8, interpolation="nearest")
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    upright = (torch.from_numpy(np.asarray(_halves(8, 8), dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std
    mirrored = upright.flip(-1)
    seen = set()
    for seed in range(12):
        x = augmented_view(_halves(32, 32), pre, torch.Generator().manual_seed(seed), min_scale=1.0)
        assert torch.allclose(x, upright, atol=1e-5) or torch.allclose(x, mirrored, atol=1e-5)
        seen.add(torch.allclose(x, mirrored, atol=1e-5))
    assert seen == {True, False}  # both sides of the coin within 12 draws


# -- data.loader ----------------------------------------------------------------------------------------
class _InstallsAHandler:
    """Stands in for a DataLoader that sets a SIGCHLD handler while it is iterated, as torch's does."""

    def __len__(self) -> int:
        return 3

    def __iter__(self):
        signal.signal(signal.SIGCHLD, lambda *a: None)
        yield from range(3)


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="no SIGCHLD on this platform")
def test_the_wrapper_yields_the_loaders_items_and_puts_the_sigchld_handler_back():
    before = signal.getsignal(signal.SIGCHLD)
    wrapped = ChildSignalSafeLoader(_InstallsAHandler())  # type: ignore[arg-type]
    assert len(wrapped) == 3 and list(wrapped) == [0, 1, 2]
    assert signal.getsignal(signal.SIGCHLD) is before


def test_a_file_that_does_not_decode_is_an_item_with_ok_false_and_a_zero_image(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(good)
    bad.write_bytes(b"not an image")
    ds = ImageDataset(Split("test", (str(good), str(bad)), (1, 0)), Preprocessing(input_size=8))
    x, label, index, ok = ds[1]
    assert (label, index, ok) == (0, 1, False) and torch.equal(x, torch.zeros(3, 8, 8))
    x, label, index, ok = ds[0]
    assert (label, index, ok) == (1, 0, True) and x.shape == (3, 8, 8)
