"""The fast decoding path against its definition: PIL geometry plus in-place normalising gives torchvision's
ToTensor + Normalize bit for bit, and the turn-taking decoder gives the DataLoader's batches, decodes
only while the consumer waits, stops its threads, and raises a defect instead of hiding it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data import Split, image_loader, load_rgb, to_rgb
from transferlab.data.loader import ImageDataset, threaded_batches
from transferlab.data.transforms import (
    Preprocessing,
    augmented_pixels,
    augmented_view,
    build_transform,
    eval_pixels,
    normalise_into,
    resized_center_crop,
)

PREPROCESSINGS = [
    Preprocessing(),  # bilinear, ImageNet statistics, 256 -> 224
    Preprocessing(interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),  # EfficientNet-Lite
    Preprocessing(input_size=240, crop_pct=0.95, interpolation="bicubic"),
    Preprocessing(resize=232, interpolation="lanczos"),
    Preprocessing(squash=True),
    Preprocessing(input_size=224, resize=200),  # a resize below the crop: CenterCrop pads
    Preprocessing(input_size=7, crop_pct=0.9, interpolation="nearest"),
]


def _normalised(pixels: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    out = torch.empty(3, *pixels.shape[:2])
    return normalise_into(pixels, pre, out)


def test_normalising_is_to_tensor_then_normalize_for_every_byte_in_every_channel():
    from torchvision import transforms

    pre = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=2)
    pixels[:, :, 1] = pixels[:, :, 1][::-1]  # channels differ, so a channel mix-up shows
    expected = transforms.Normalize(pre.mean, pre.std)(transforms.ToTensor()(Image.fromarray(pixels)))
    assert torch.equal(_normalised(pixels, pre), expected)


@pytest.mark.parametrize("pre", PREPROCESSINGS, ids=lambda p: f"{p.input_size}-{p.interpolation}-{p.resize}-{p.squash}")
def test_pixels_then_normalising_equal_the_torchvision_transform_bit_for_bit(pre):
    rng = np.random.default_rng(0)
    for w, h in [(227, 227), (500, 375), (375, 500), (256, 256), (640, 48), (31, 17), (5, 700), (162, 447), (400, 300)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = build_transform(pre)(img)
        got = _normalised(eval_pixels(img, pre), pre)
        assert got.shape == expected.shape and torch.equal(got, expected), (w, h)


def test_only_the_crop_is_resampled_where_that_gives_torchvisions_pixels(monkeypatch):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    resize = Image.Image.resize
    asked: list[tuple[int, int]] = []

    def recorded(self, size, *args, **kwargs):
        asked.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    rng = np.random.default_rng(3)
    cases = [  # (w, h, resize, crop, interpolation, the resampled size: only the crop where positions are exact)
        (227, 227, 256, 224, "bicubic", (224, 224)),  # 227/256 on both axes
        (500, 375, 256, 224, "bilinear", (341, 224)),  # 375/256 exact, 500/341 not: that axis cropped after
        (375, 500, 232, 224, "lanczos", (232, 309)),  # 375/232, 500/309: neither exact
        (300, 300, 256, 256, "bicubic", (256, 256)),  # the crop is the whole resize
        # Rows shrink 447 -> 353 (94) by more than twice the columns' 162 -> 128 (34): Pillow 13 resamples
        # rows first; for the crop alone (162 -> 112) it would not, and the pixels would differ by 1.
        (162, 447, 128, 112, "bicubic", (128, 353)),
        (162, 447, 128, 112, "nearest", (128, 353)),
    ]
    for w, h, size, crop, interpolation, resampled in cases:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        asked.clear()
        got = np.asarray(resized_center_crop(img, size, crop, interpolation))
        assert asked == [resampled], (w, h)
        expected = np.asarray(TF.center_crop(TF.resize(img, size, InterpolationMode(interpolation)), [crop, crop]))
        assert got.shape == expected.shape == (crop, crop, 3) and np.array_equal(got, expected), (w, h)


def test_augmented_pixels_then_normalising_equal_the_augmented_view():
    pre = Preprocessing(input_size=32, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    for seed in range(6):
        expected = augmented_view(img, pre, torch.Generator().manual_seed(seed))
        got = _normalised(augmented_pixels(img, pre, torch.Generator().manual_seed(seed)), pre)
        assert torch.equal(got, expected), seed


def _folder_split(tmp_path, n: int, bad: tuple[int, ...] = ()) -> Split:
    rng = np.random.default_rng(2)
    files = []
    for i in range(n):
        path = tmp_path / f"{i:03d}.jpg"
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    return Split("train", tuple(files), tuple(i % 3 for i in range(n)))


@pytest.mark.parametrize("threads", [1, 3])
def test_turns_give_the_data_loaders_batches_with_bad_files_as_zero_images(tmp_path, threads):
    split, pre = _folder_split(tmp_path, 11, bad=(4,)), Preprocessing(input_size=16)
    chunks = [[10, 0, 3, 4], [7], [1, 2, 5, 6, 8, 9]]
    for seed in (None, 5):
        got = list(threaded_batches(split, pre, chunks, threads=threads, augment_seed=seed))
        ref = list(image_loader(split, pre, 4, 0, batch_sampler=chunks, augment_seed=seed))
        assert len(got) == len(ref) == 3
        for a, b in zip(got, ref):
            assert all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(a, b))
    x, _y, idx, ok = got[0]
    assert ok.tolist() == [True, True, True, False] and not x[3].any()
    plain = list(threaded_batches(split, pre, chunks, threads=threads))
    for (x, _y, idx, ok) in plain:  # the definition: load_rgb, then torchvision's transform
        for row, i, good in zip(x, idx.tolist(), ok.tolist()):
            if good:
                assert row.dtype == torch.float32
                assert torch.equal(row, build_transform(pre)(load_rgb(split.files[i], pre.resize_size)))


def _counting_dataset(monkeypatch) -> list[tuple[str, float]]:
    calls: list[tuple[str, float]] = []
    decode = ImageDataset.decode_into

    def counted(self, i, out):
        calls.append((threading.current_thread().name, time.perf_counter()))
        return decode(self, i, out)

    monkeypatch.setattr(ImageDataset, "decode_into", counted)
    return calls


def test_helpers_decode_only_while_the_consumer_waits_and_all_threads_decode_then(tmp_path, monkeypatch):
    calls = _counting_dataset(monkeypatch)
    split, pre = _folder_split(tmp_path, 40), Preprocessing(input_size=16)
    batches = threaded_batches(split, pre, [list(range(i, i + 20)) for i in (0, 20)], threads=2)
    next(batches)
    assert len(calls) == 20  # the first batch only: nothing decoded ahead
    held = time.perf_counter()
    time.sleep(0.3)  # the consumer "runs the model": the helpers must stay idle
    assert len(calls) == 20
    next(batches)
    assert len(calls) == 40 and min(t for _name, t in calls[20:]) > held
    batches.close()


def test_the_consumer_and_the_helpers_decode_a_batch_together(tmp_path, monkeypatch):
    helped = threading.Event()
    decode = ImageDataset.decode_into
    names = []

    def meeting(self, i, out):  # the consumer's first item waits until a helper has taken one
        name = threading.current_thread().name
        names.append(name)
        if name.startswith("decode-"):
            helped.set()
        elif not helped.wait(timeout=10):
            raise AssertionError("no helper decoded while the consumer waited")
        return decode(self, i, out)

    monkeypatch.setattr(ImageDataset, "decode_into", meeting)
    split, pre = _folder_split(tmp_path, 8), Preprocessing(input_size=16)
    [(_x, _y, idx, ok)] = list(threaded_batches(split, pre, [list(range(8))], threads=1))
    assert ok.all() and idx.tolist() == list(range(8))
    assert set(names) == {threading.current_thread().name, "decode-0"}


def test_no_helper_threads_decodes_in_the_consumer_alone(tmp_path, monkeypatch):
    calls = _counting_dataset(monkeypatch)
    split, pre = _folder_split(tmp_path, 5), Preprocessing(input_size=16)
    assert len(list(threaded_batches(split, pre, [[0, 1], [2, 3, 4]], threads=0))) == 2
    assert {name for name, _t in calls} == {threading.current_thread().name}


def test_stopping_early_leaves_no_decoding_thread(tmp_path):
    split, pre = _folder_split(tmp_path, 12), Preprocessing(input_size=16)
    def decoding() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("decode-")]

    assert not decoding()
    batches = threaded_batches(split, pre, [[0, 1, 2], [3, 4, 5], [6, 7, 8]], threads=3)
    next(batches)
    assert len(decoding()) == 3
    batches.close()
    assert not decoding()


def test_a_defect_while_decoding_on_a_helper_reaches_the_consumer(tmp_path, monkeypatch):
    raised = threading.Event()

    def broken(self, i, out):
        if threading.current_thread().name.startswith("decode-"):
            raised.set()
            raise RuntimeError("broken decoder")
        raised.wait(timeout=10)  # the consumer's first item waits until a helper has failed
        return True

    monkeypatch.setattr(ImageDataset, "decode_into", broken)
    split, pre = _folder_split(tmp_path, 6), Preprocessing(input_size=16)
    with pytest.raises(RuntimeError, match="broken decoder"):
        list(threaded_batches(split, pre, [list(range(6))], threads=2))
    assert not any(t.name.startswith("decode-") for t in threading.enumerate())


def test_to_rgb_returns_a_new_image_even_for_an_rgb_one():
    img = Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8))
    out = to_rgb(img)
    assert out is not img and out.mode == "RGB"
    out.putpixel((0, 0), (9, 9, 9))
    assert img.getpixel((0, 0)) == (0, 0, 0)


def test_decoding_in_threads_leaves_the_warning_filters_as_they_were(tmp_path):
    """Threads decoding at once must not change the process's warning filters (warnings.catch_warnings
    around each decode, entered and left by several threads, left "ignore" installed for good)."""
    import warnings

    split, pre = _folder_split(tmp_path, 48), Preprocessing(input_size=16)
    chunks = [list(range(i, i + 16)) for i in (0, 16, 32)]
    list(threaded_batches(split, pre, chunks[:1], threads=0))  # what decoding imports may add filters of its own
    before = list(warnings.filters)
    for _ in range(5):
        list(threaded_batches(split, pre, chunks, threads=3))
        assert warnings.filters == before
