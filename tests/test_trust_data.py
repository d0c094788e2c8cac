"""Issue 19, data items: one decoder for paths and PIL images, 16-bit and bomb-sized images, content-keyed
caches and data-change detection, and bad input (missing CSV files, negative flags) named in one line."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from transferlab.data import load_rgb


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("kind", ["rgb-exif", "palette-transparency", "16bit-exif", "16bit-large", "grey-large", "jpeg-large"])
def test_to_rgb_of_an_opened_png_equals_load_rgb_pixel_for_pixel(tmp_path, kind):
    """`to_rgb(Image.open(p), m)` is what `load_rgb(p, m)` gives, for every step after decoding (and for a
    JPEG not yet loaded, its reduced-scale decoding too)."""
    from transferlab.data import to_rgb

    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}.png"
    if kind == "jpeg-large":
        path = tmp_path / "large.jpg"
        Image.fromarray(rng.integers(0, 255, (130, 170, 3), dtype=np.uint8)).save(path, exif=_exif(6))
    elif kind == "rgb-exif":
        Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(path, exif=_exif(6))
    elif kind == "palette-transparency":
        img = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).convert("P")
        img.save(path, transparency=3)
    elif kind == "16bit-exif":
        Image.fromarray(rng.integers(0, 65535, (30, 50), dtype=np.uint16)).save(path, exif=_exif(8))
    elif kind == "16bit-large":
        Image.fromarray(rng.integers(0, 65535, (130, 170), dtype=np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (130, 170), dtype=np.uint8)).save(path)
    for min_size in (None, 16):
        expected = np.asarray(load_rgb(str(path), min_size))
        got = np.asarray(to_rgb(Image.open(path), min_size))
        assert got.shape == expected.shape
        assert np.array_equal(got, expected)
    if kind.endswith("exif"):  # orientation 6 or 8 swaps the sides: the transpose was applied
        assert np.asarray(to_rgb(Image.open(path))).shape[:2] == (50, 30)


# -- item 5: 16-bit PNGs and bomb-sized JPEGs decode; the bomb check is on the size decoded ----------
def test_a_large_16bit_png_is_reduced_and_scaled_not_reported_undecodable(tmp_path):
    from transferlab.data import Preprocessing, Split, image_loader

    v = 40000
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((1200, 1200), v, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    resize = 256  # short side 1200 >= 4 x 256: box-reduced by 1200 // 512 = 2 right after decoding
    img = load_rgb(str(path), min_size=resize)
    assert img.size == (600, 600)
    assert np.array_equal(np.unique(np.asarray(img)), [round(v / 65535 * 255)])
    pre = Preprocessing(input_size=224, resize=resize)
    [(_x, _y, _i, ok)] = list(image_loader(Split("test", (str(path),), (0,)), pre, 1, 0))
    assert bool(ok[0])


def _jpeg(path, size, colour=(200, 100, 50)):
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def test_a_jpeg_over_the_bomb_limit_decodes_at_reduced_scale(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "big.jpg", (800, 800))
    # PIL's reference: the same file decoded at 1/8 scale (800 / 8 = 100 >= 64), without any limit.
    reference = Image.open(path)
    reference.draft("RGB", (64, 64))
    reference = np.asarray(reference.convert("RGB"))
    assert reference.shape == (100, 100, 3)
    # PIL refuses over 2 x MAX_IMAGE_PIXELS: the full 640,000 pixels are, the decoded 10,000 are not.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    img = np.asarray(load_rgb(str(path), min_size=64))
    assert np.array_equal(img, reference)
    assert np.abs(img.astype(int) - (200, 100, 50)).max() <= 3
    with pytest.raises(Image.DecompressionBombError):  # decoded at full size: still refused
        load_rgb(str(path))


def test_an_image_still_too_large_at_reduced_scale_is_refused(tmp_path, monkeypatch):
    from transferlab.data import BAD_IMAGE_ERRORS, describe_bad_image

    path = _jpeg(tmp_path / "huge.jpg", (800, 800))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)  # refuses over 4,000 pixels; 1/8 scale is 10,000
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(str(path), min_size=64)
    assert issubclass(Image.DecompressionBombError, BAD_IMAGE_ERRORS)
    assert "DecompressionBombError" in describe_bad_image(str(path))
    png = tmp_path / "huge.png"  # a PNG is decoded at full size: refused as before
    Image.new("L", (800, 800)).save(png)
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(str(png), min_size=64)


# -- item 4: caches and data-change detection follow the files' contents ------------------------------
def swap_keeping_size_and_mtime(a, b):
    """Swap two files' contents as `cp -p` / `rsync -a` would leave them: sizes and mtimes as before."""
    import os
    import shutil

    times = {p: (os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns) for p in (a, b)}
    tmp = a.with_name(".swap")
    shutil.copy2(a, tmp)
    shutil.copy2(b, a)
    shutil.copy2(tmp, b)
    tmp.unlink()
    for p, ns in times.items():
        os.utime(p, ns=ns)


def size_and_mtime(paths):
    import os

    return [(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]


@pytest.fixture
def bmp_data(tmp_path):
    # BMP: every image of one size has the same byte size, so swapped images keep their sizes
    return write_image_folder(tmp_path / "data", {"train": {c: 6 for c in "abc"}, "val": {c: 3 for c in "abc"},
                                                  "test": {c: 3 for c in "abc"}}, size=24, ext="bmp")


def test_the_feature_cache_key_changes_when_contents_are_swapped_with_size_and_mtime_kept(bmp_data, tmp_path, resnet10_random):
    from transferlab.core.devices import Placement
    from transferlab.data import load_splits
    from transferlab.features.cache import FeatureCache

    cache, placement = FeatureCache(tmp_path / "cache"), Placement.of("cpu", "float32")
    pre = resnet10_random.spec.preprocessing

    def key():
        test = load_splits(bmp_data).test
        return cache.key(resnet10_random, "output", test, pre, placement)

    a, b = bmp_data / "test" / "a" / "img_000.bmp", bmp_data / "test" / "b" / "img_000.bmp"
    before, stats = key(), size_and_mtime([a, b])
    assert key() == before
    swap_keeping_size_and_mtime(a, b)
    assert size_and_mtime([a, b]) == stats  # what the old key looked at is unchanged
    assert key() != before


SWEEP = ["--backbones", "efficientnet_lite0", "--epochs", "2", "--patience", "2", "--lr", "1e-2", "--l2", "0", "--seeds", "0",
         "--device", "cpu", "--workers", "0", "--no-progress"]


def test_a_sweep_rerun_after_a_swap_with_size_and_mtime_kept_says_the_images_changed(bmp_data, tmp_path, capsys):
    from transferlab.cli.main import main

    out = tmp_path / "sweep"
    assert main(["sweep", "--data", str(bmp_data), "--out", str(out), *SWEEP]) == 0
    capsys.readouterr()
    swap_keeping_size_and_mtime(bmp_data / "test" / "a" / "img_001.bmp", bmp_data / "test" / "c" / "img_001.bmp")
    assert main(["sweep", "--data", str(bmp_data), "--out", str(out), *SWEEP]) == 2
    err = capsys.readouterr().err
    assert "images changed" in err and "2 files modified in split test" in err and "--force" in err


def test_a_fingerprint_recorded_from_sizes_and_mtimes_is_not_reported_as_modified_files():
    """A sweep folder from before content digests: its rows hold mtimes, which say nothing about contents."""
    from transferlab.data import describe_data_change

    old = {"test": [["/d/test/a/x.png", 10, 1700000000000000000, 0]]}
    new = {"test": [["/d/test/a/x.png", 10, "0" * 32, 0]]}
    said = describe_data_change(old, new)
    assert "modification times" in said and "modified" not in said
    assert describe_data_change(new, new) == ""
    assert describe_data_change(new, {"test": [["/d/test/a/x.png", 10, "1" * 32, 0]]}) == "1 file modified in split test"

def test_a_digest_is_remembered_until_the_ctime_changes_and_a_bad_memo_is_rebuilt(tmp_path, monkeypatch):
    import time

    from transferlab.core import digests

    monkeypatch.setattr(digests, "RACY_NS", 50_000_000)  # 50 ms instead of 2 s, so the test need not wait
    monkeypatch.setattr(digests, "_process_memo", {})
    reads = []
    real_hash = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda p: reads.append(p) or real_hash(p))
    files = []
    for i, content in enumerate((b"first image", b"other image", b"third image")):
        files.append(tmp_path / f"f{i}.bmp")
        files[-1].write_bytes(content)
    paths = [str(f) for f in files] + [str(tmp_path / "absent.bmp")]
    memo = tmp_path / "memo"
    expected = [(len(f.read_bytes()), hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest()) for f in files]

    assert digests.file_digests(paths, memo) == expected + [(-1, "")]
    assert len(reads) == 3 and not (memo / digests.MEMO_FILE).exists()  # just written: too recent to remember
    time.sleep(0.1)
    assert digests.file_digests(paths, memo) == expected + [(-1, "")]
    assert len(reads) == 6  # read again, now remembered
    assert digests.file_digests(paths, memo) == expected + [(-1, "")] and len(reads) == 6  # from this process
    monkeypatch.setattr(digests, "_process_memo", {})
    assert digests.file_digests(paths, memo) == expected + [(-1, "")] and len(reads) == 6  # from memo.sqlite

    swap_keeping_size_and_mtime(files[0], files[1])  # only the ctime tells
    time.sleep(0.1)
    assert digests.file_digests(paths, memo) == [expected[1], expected[0], expected[2], (-1, "")]
    assert sorted(reads[6:]) == sorted(paths[:2])

    monkeypatch.setattr(digests, "_process_memo", {})
    (memo / digests.MEMO_FILE).write_bytes(b"garbage, not a database" * 100)
    assert digests.file_digests(paths, memo) == [expected[1], expected[0], expected[2], (-1, "")]
    assert len(reads) == 11  # the bad memo was ignored and every file read
    monkeypatch.setattr(digests, "_process_memo", {})
    assert digests.file_digests(paths, memo) == [expected[1], expected[0], expected[2], (-1, "")]
    assert len(reads) == 11  # ... and rebuilt


# -- item 10: bad flags and bad labels files, each in one line naming the flag or the lines -------------
PROBE = ["--device", "cpu", "--workers", "0", "--no-progress", "--epochs", "2"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("transferlab:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flag, value", [("--workers", "-1"), ("--cache-max-gb", "-1"), ("--cache-max-gb", "nan"),
                                         ("--cache-max-gb", "inf"), ("--cache-ram-gb", "-1"), ("--cache-shard-mb", "0"),
                                         ("--cache-shard-mb", "nan")])
def test_a_negative_worker_count_or_cache_budget_exits_2_naming_the_flag(tiny_folder, tmp_path, capsys, flag, value):
    from transferlab.cli.main import main

    out = tmp_path / "out"
    code = main(["probe", "--data", str(tiny_folder), "--out", str(out), *PROBE, flag, value])
    line = _one_error_line(capsys)
    assert code == 2 and line.startswith(f"transferlab: error: {flag} {value}"), line
    assert not out.exists()


def test_the_views_refusal_states_sizes_that_are_true(tiny_folder, resnet10_random):
    import copy
    import re

    from transferlab.core.errors import ConfigError
    from transferlab.data import load_splits
    from transferlab.features.cut_inputs import CutInputs
    from transferlab.features.engine import EngineConfig

    splits = load_splits(tiny_folder)
    n_views, budget_gb = 4, 1e-4  # the probe cache (512 floats x 42 images = 86 kB) fits, 4 views of train do not
    engine = EngineConfig(device="cpu", cache_max_gb=budget_gb, progress=False, num_workers=0, runtime="torch")
    inputs = CutInputs(copy.deepcopy(resnet10_random), splits, engine, None)
    need = resnet10_random.feature_dim * 4 * len(splits.train) * n_views  # float32 views of every train image
    with pytest.raises(ConfigError) as raised:
        inputs.check_feature_augment(f"views:{n_views}", 1)
    units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    m = re.search(r"would hold ([\d.]+) (B|kB|MB|GB) of views > --cache-max-gb ([\d.e-]+) \(([\d.e-]+) (B|kB|MB|GB)\)",
                  raised.value.reason)
    assert m, raised.value.reason
    shown_need, shown_limit = float(m[1]) * units[m[2]], float(m[4]) * units[m[5]]
    assert need <= shown_need <= need * 1.01  # rounded up, 3 significant digits
    assert float(m[3]) == budget_gb and shown_limit == pytest.approx(budget_gb * 1e9)
    assert shown_need > shown_limit


def _csv_with_missing_rows(root):
    rows = ["path,label,split"]
    for split in ("train", "val", "test"):
        rows += [f"{f.relative_to(root).as_posix()},{f.parent.name},{split}" for f in sorted((root / split).rglob("*.png"))]
    missing = {3: "train/a/gone_1.png", 7: "train/b/gone_2.png", len(rows) + 1: "test/c/gone_3.png"}  # line -> file
    for line, file in sorted(missing.items()):
        rows.insert(line - 1, f"{file},{file.split('/')[1]},{file.split('/')[0]}")
    path = root / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path, {line: str(root / file) for line, file in missing.items()}


def test_a_labels_csv_lists_every_missing_file_with_its_line_or_skips_and_records_them(tiny_folder, tmp_path, capsys):
    import json

    from transferlab.cli.main import main

    csv_path, missing = _csv_with_missing_rows(tiny_folder)
    assert main(["probe", "--data", str(csv_path), "--out", str(tmp_path / "o"), *PROBE]) == 2
    line = _one_error_line(capsys)
    assert "3 listed file(s) do not exist" in line and "--on-bad-image skip" in line
    for number, file in missing.items():
        assert f"line {number}, column path: no such file {file}" in line
    out = tmp_path / "o2"
    assert main(["probe", "--data", str(csv_path), "--out", str(out), *PROBE, "--on-bad-image", "skip"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["skipped_files"] == {"train": [missing[3], missing[7]], "test": [missing[max(missing)]]}
    assert record["data"]["missing_files"] == 3
    assert (record["data"]["train"]["n"], record["data"]["val"]["n"], record["data"]["test"]["n"]) == (24, 9, 9)
