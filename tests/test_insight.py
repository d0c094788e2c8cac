"""Per-class insight: numbers checked against hand counts, files written, the report fragment light."""

import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import without_torch
from transferlab.core.predictions import read_test_predictions, write_test_predictions
from transferlab.reporting.insight import calibration_bins, confusion, insight_html, most_confused, per_class, predictions

SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = ["crow", "finch", "gull"]
# 8 test images: true labels, and probabilities whose argmax gives the predictions [0, 1, 0, 1, 2, 2, 2, 0].
LABELS = [0, 0, 0, 1, 1, 2, 2, 2]
PROBS = [
    [0.90, 0.05, 0.05],  # true crow,  pred crow   conf 0.90  correct
    [0.28, 0.62, 0.10],  # true crow,  pred finch  conf 0.62  wrong
    [0.50, 0.30, 0.20],  # true crow,  pred crow   conf 0.50  correct
    [0.12, 0.78, 0.10],  # true finch, pred finch  conf 0.78  correct
    [0.20, 0.30, 0.50],  # true finch, pred gull   conf 0.50  wrong
    [0.05, 0.05, 0.90],  # true gull,  pred gull   conf 0.90  correct
    [0.10, 0.28, 0.62],  # true gull,  pred gull   conf 0.62  correct
    [0.50, 0.20, 0.30],  # true gull,  pred crow   conf 0.50  wrong
]


def test_confusion_matrix_and_per_class_metrics_match_a_hand_count():
    labels, probs = np.array(LABELS), np.array(PROBS)
    pred, conf = predictions(probs)
    assert pred.tolist() == [0, 1, 0, 1, 2, 2, 2, 0]
    cm = confusion(labels, pred, 3)
    # Rows = true class, columns = predicted class, counted by hand from the table above.
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    rows = {r["class"]: r for r in per_class(labels, pred, CLASSES)}
    # recall = correct / true count; precision = correct / predicted count
    assert rows["crow"]["recall"] == pytest.approx(2 / 3) and rows["crow"]["precision"] == pytest.approx(2 / 3)  # pred crow: #0,#2,#7
    assert rows["finch"]["recall"] == pytest.approx(1 / 2) and rows["finch"]["precision"] == pytest.approx(1 / 2)  # pred finch: #1,#3
    assert rows["gull"]["recall"] == pytest.approx(2 / 3) and rows["gull"]["precision"] == pytest.approx(2 / 3)  # pred gull: #4,#5,#6
    assert [rows[c]["support"] for c in CLASSES] == [3, 2, 3] and [rows[c]["predicted"] for c in CLASSES] == [3, 2, 3]
    pairs = most_confused(cm, CLASSES)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("crow", "finch", 1), ("finch", "gull", 1), ("gull", "crow", 1)]
    # A class never predicted has precision 0 (not NaN).
    none_pred = per_class(np.array([0, 1]), np.array([0, 0]), ["x", "y"])
    assert none_pred[1]["precision"] == 0.0 and none_pred[0]["precision"] == 0.5


def test_ece_with_15_bins_matches_a_hand_computation():
    # Bins of width 1/15, b/15 < conf <= (b+1)/15:
    #   0.90 -> bin 13 (0.867, 0.933]: #0, #5 both correct    acc 1    conf 0.90  gap 0.10  weight 2/8
    #   0.62 -> bin  9 (0.600, 0.667]: #1 wrong, #6 correct   acc 1/2  conf 0.62  gap 0.12  weight 2/8
    #   0.50 -> bin  7 (0.467, 0.533]: #2 correct, #4, #7 wrong acc 1/3 conf 0.50 gap 1/6   weight 3/8
    #   0.78 -> bin 11 (0.733, 0.800]: #3 correct             acc 1    conf 0.78  gap 0.22  weight 1/8
    expected = 2 / 8 * 0.10 + 2 / 8 * 0.12 + 3 / 8 * (1 / 6) + 1 / 8 * 0.22  # = 0.145
    ece, bins = calibration_bins(np.array(LABELS), np.array(PROBS))
    assert ece == pytest.approx(expected, abs=1e-12) and expected == pytest.approx(0.145)
    assert len(bins) == 15 and [b["n"] for b in bins if b["n"]] == [3, 2, 1, 2]
    assert [b["bin"] for b in bins if b["n"]] == [7, 9, 11, 13]
    # Edges: confidence 1.0 is in the last bin, 0.5 exactly on no edge; a perfectly calibrated set has ECE 0.
    ece1, bins1 = calibration_bins(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert ece1 == 0.0 and bins1[14]["n"] == 2


def _photo(path: Path, size: int = 300, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1) + rng.integers(0, 40, (size, size, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)


def test_insight_files_and_fragment_with_small_thumbnails_of_the_mistakes(tmp_path):
    files = []
    for i in range(8):
        files.append(tmp_path / f"img_{i}.jpg")
        _photo(files[-1], seed=i)
    pred_file = tmp_path / "test_predictions.json"
    write_test_predictions(pred_file, CLASSES, files, np.array(LABELS), np.array(PROBS, dtype=np.float32))
    back = read_test_predictions(pred_file)
    assert back["classes"] == CLASSES and back["labels"].tolist() == LABELS and back["probs"].shape == (8, 3)
    fragment = insight_html(pred_file, tmp_path / "insight", title="efficientnet_lite0")
    out = tmp_path / "insight"
    with open(out / "confusion_matrix.csv") as f:
        assert list(csv.reader(f)) == [["true \\ predicted", *CLASSES], ["crow", "2", "1", "0"], ["finch", "0", "1", "1"], ["gull", "1", "0", "2"]]
    summary = json.loads((out / "insight.json").read_text())
    assert summary["n_misclassified"] == 3 and summary["ece"] == pytest.approx(0.145, abs=1e-6)
    for name in ("per_class.csv", "confused_pairs.csv", "calibration.csv", "confusion_matrix.png", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    # Three misclassified images, each a small inline JPEG with its true and predicted class.
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', fragment)
    assert len(thumbs) == 3
    for b64 in thumbs:
        data = base64.b64decode(b64)
        assert len(data) < 8_000
        assert max(Image.open(io.BytesIO(data)).size) <= 96
    assert "true: gull<br>pred: crow (0.50)" in fragment and "true: crow<br>pred: finch (0.62)" in fragment
    assert fragment.count("data:image/png;base64,") == 2  # confusion matrix and reliability diagram


def test_a_100_class_fragment_stays_light(tmp_path):
    # birds100-sized: 100 classes x 10 test images, most of them wrong (the gallery is capped).
    rng = np.random.default_rng(0)
    n, c = 1000, 100
    photo = tmp_path / "photo.jpg"
    _photo(photo, 500)
    probs = rng.dirichlet(np.ones(c) * 0.3, size=n)
    labels = np.repeat(np.arange(c), 10)
    pred_file = tmp_path / "p.json"
    write_test_predictions(pred_file, [f"species_{i:03d}" for i in range(c)], [photo] * n, labels, probs)
    fragment = insight_html(pred_file, tmp_path / "insight")
    # Several chosen runs share one report page: each fragment must stay well under 5 MB / 4.
    assert len(fragment.encode()) < 1_000_000
    assert len(re.findall(r"data:image/jpeg;base64,", fragment)) == 60


def test_insight_needs_no_torch(tmp_path):
    code = without_torch(
        "from transferlab.reporting.insight import insight_html\n"
        "from transferlab.core.predictions import write_test_predictions\n"
        f"write_test_predictions({str(tmp_path / 'p.json')!r}, ['a', 'b'], ['x.jpg', 'y.jpg'], [0, 1], [[0.7, 0.3], [0.6, 0.4]])\n"
        f"html = insight_html({str(tmp_path / 'p.json')!r}, {str(tmp_path / 'out')!r})\n"
        "assert 'x.jpg' not in html and 'y.jpg unreadable' in html\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
