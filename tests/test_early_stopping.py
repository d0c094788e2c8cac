"""The one early-stopping rule, by its definition: strict improvement of (criterion, other metric), patience
epochs without one stop, divergence stops, `first_candidate` takes that epoch whatever its score."""

from __future__ import annotations

import math

import pytest

from transferlab.train.early_stopping import EarlyStopping, divergence_threshold
from transferlab.train.results import EpochRecord


def rec(epoch: int, val_xent: float, val_err: float, train_xent: float = 1.0) -> EpochRecord:
    return EpochRecord(epoch=epoch, train_loss=train_xent, train_xent=train_xent, train_err=0.0, val_xent=val_xent, val_err=val_err)


def run(stopping: EarlyStopping, records: list[EpochRecord]) -> list[int]:
    """The epochs that were judged before the rule said stop."""
    seen = []
    for r in records:
        seen.append(r["epoch"])
        stopping.update(r)
        if stopping.stopped:
            break
    return seen


def test_patience_counts_epochs_without_a_strict_improvement():
    zero = EpochRecord(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=1.0, val_err=0.5)
    s = EarlyStopping("val_xent", patience=2, n_classes=3, epoch_zero=zero)
    # 0.8 improves; 0.8 again ties (no strict improvement, and val_err is equal too); 0.9 worse -> stop after epoch 3
    assert run(s, [rec(1, 0.8, 0.4), rec(2, 0.8, 0.4), rec(3, 0.9, 0.3), rec(4, 0.1, 0.0)]) == [1, 2, 3]
    assert (s.best_epoch, s.status) == (1, "done")


def test_ties_on_the_criterion_are_broken_by_the_other_metric():
    zero = EpochRecord(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=1.0, val_err=0.5)
    by_xent = EarlyStopping("val_xent", 5, 3, zero)
    run(by_xent, [rec(1, 0.8, 0.4), rec(2, 0.8, 0.3)])
    assert by_xent.best_epoch == 2  # same xent, lower error
    by_err = EarlyStopping("val_err", 5, 3, zero)
    run(by_err, [rec(1, 0.9, 0.3), rec(2, 0.7, 0.3), rec(3, 0.1, 0.35)])
    assert by_err.best_epoch == 2  # same error, lower xent; epoch 3's lower xent does not count against a higher error


def test_divergence_stops_and_keeps_the_best_epoch_so_far():
    zero = EpochRecord(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=1.0, val_err=0.5)
    threshold = 100 * math.log(4)
    assert divergence_threshold(4) == threshold
    s = EarlyStopping("val_xent", 5, 4, zero)
    assert run(s, [rec(1, 0.5, 0.2), rec(2, 0.4, 0.1, train_xent=threshold * 1.01), rec(3, 0.1, 0.0)]) == [1, 2]
    assert (s.best_epoch, s.status) == (1, "diverged")
    nan = EarlyStopping("val_xent", 5, 4, zero)
    run(nan, [rec(1, float("nan"), 0.2)])
    assert (nan.best_epoch, nan.status) == (0, "diverged")


def test_the_first_candidate_is_taken_whatever_its_score():
    zero = EpochRecord(epoch=0, train_loss=None, train_xent=None, train_err=None, val_xent=0.1, val_err=0.0)
    s = EarlyStopping("val_xent", 5, 3, zero, first_candidate=1)
    run(s, [rec(1, 0.5, 0.2), rec(2, 0.6, 0.2), rec(3, 0.4, 0.1)])
    assert s.best_epoch == 3  # epoch 1 was taken although worse than epoch 0; epoch 3 then improved on it
    plain = EarlyStopping("val_xent", 5, 3, zero)
    run(plain, [rec(1, 0.5, 0.2), rec(2, 0.6, 0.2), rec(3, 0.4, 0.1)])
    assert plain.best_epoch == 0


def test_each_epoch_records_the_heads_learning_rate_after_warmup_and_schedule():
    import torch

    from transferlab.core.devices import Placement
    from transferlab.features.sources import SplitInputs, TensorSource
    from transferlab.train.config import TrainConfig
    from transferlab.train.loop import fit
    from transferlab.train.probes import fit_linear_probes
    from transferlab.train.schedule import lr_factor

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=gen), torch.arange(20) % 2
    placement = Placement.of("cpu", "float32")
    train = TensorSource(SplitInputs(x, y, []), placement)
    cfg = TrainConfig(lr=0.1, epochs=4, patience=10, batch_size=8, lr_schedule="cosine", warmup_epochs=1)
    steps = 3  # ceil(20 / 8) per epoch: the recorded lr is the one of each epoch's last step
    expected = [None] + [0.1 * lr_factor(cfg, e * steps - 1, steps) for e in range(1, 5)]
    head = torch.nn.Linear(4, 2)
    result = fit(head, head, head, train, train, cfg)
    assert [r["lr"] for r in result.history] == pytest.approx(expected)
    batched = fit_linear_probes([torch.nn.Linear(4, 2)], train, train, [cfg])[0]
    assert [r["lr"] for r in batched.history] == pytest.approx(expected)
