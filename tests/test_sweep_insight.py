"""reporting.sweep_insight: when two runs share a per-class section, and which runs get one at all.

same_predicted_classes: the same images, classes and labels, and the same predicted class for every image
(the per-class numbers are then the same); same_predictions adds probabilities within `atol`.
"""

import numpy as np

from transferlab.core.predictions import sweep_predictions_path
from transferlab.reporting.sweep_insight import insight_sections, same_predicted_classes, same_predictions
from transferlab.sweep.ledger import Ledger


def predictions(probs, files=("x.png", "y.png"), classes=("a", "b"), labels=(0, 1)):
    return {"files": list(files), "classes": list(classes), "labels": np.array(labels), "probs": np.array(probs, dtype=float)}


def test_same_predicted_classes_compares_the_argmax_on_the_same_images():
    a = predictions([[0.9, 0.1], [0.2, 0.8]])
    assert same_predicted_classes(a, predictions([[0.6, 0.4], [0.4, 0.6]]))  # other probabilities, same classes
    assert not same_predicted_classes(a, predictions([[0.4, 0.6], [0.2, 0.8]]))  # image x predicted b
    assert not same_predicted_classes(a, predictions([[0.9, 0.1], [0.2, 0.8]], files=("x.png", "z.png")))
    assert not same_predicted_classes(a, predictions([[0.9, 0.1], [0.2, 0.8]], classes=("a", "c")))
    assert not same_predicted_classes(a, predictions([[0.9, 0.1], [0.2, 0.8]], labels=(0, 0)))
    assert not same_predicted_classes(a, predictions([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]))  # other shape


def test_same_predictions_also_needs_probabilities_within_atol():
    a = predictions([[0.9, 0.1], [0.2, 0.8]])
    assert same_predictions(a, predictions([[0.9 + 5e-7, 0.1 - 5e-7], [0.2, 0.8]]))
    assert not same_predictions(a, predictions([[0.8, 0.2], [0.2, 0.8]]))
    assert same_predictions(a, predictions([[0.8, 0.2], [0.2, 0.8]]), atol=0.1 + 1e-9)


def test_runs_without_stored_predictions_get_no_section(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.mark_running("h", "m", "LP", {})
    ledger.choose("m", "LP", "h")
    assert not sweep_predictions_path(tmp_path, "h").exists()
    rows = [{"backbone": "m", "method": "LP", "rank": 1, "test_acc": 0.5}, {"backbone": "m", "method": "LP-FT", "rank": 2, "test_acc": None}]
    assert insight_sections(ledger, tmp_path, rows) == ""  # no predictions file, and no choice for LP-FT
    ledger.close()
    assert not (tmp_path / "insight").exists()
