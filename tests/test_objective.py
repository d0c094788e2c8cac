"""The loss terms against hand computations: label smoothing, L2-SP (value and gradient), batched = single."""

import copy

import pytest
import torch
import torch.nn.functional as F

from transferlab.data import load_splits
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.train.config import TrainConfig
from transferlab.train.objective import Objective, describe_objective, stacked_loss
from transferlab.train.session import RunSession


def test_label_smoothing_is_the_mix_of_cross_entropy_and_the_uniform_target():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 4, generator=g), torch.tensor([0, 3, 1, 1, 2])
    eps = 0.1
    logp = torch.log_softmax(logits, 1)
    # Smoothed target: 1 - eps + eps / C on the true class, eps / C elsewhere.
    target = torch.full((5, 4), eps / 4)
    target[torch.arange(5), labels] += 1 - eps
    hand = -(target * logp).sum(1).mean()
    loss, xent = Objective(l2=0.0, n_train=5, label_smoothing=eps).loss(logits, labels, torch.zeros(4, 3))
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    assert xent.item() == pytest.approx(F.nll_loss(logp, labels).item(), rel=1e-6)  # recorded xent stays plain


def test_l2sp_value_and_gradient_match_a_hand_computation():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    b = torch.tensor([0.25, -0.75], requires_grad=True)
    w0, b0 = torch.tensor([[0.0, -1.0], [0.5, 1.0]]), torch.tensor([0.0, 0.0])
    logits, labels = torch.zeros(3, 2), torch.tensor([0, 1, 0])  # constant: the data term has no gradient here
    objective = Objective(l2=0.0, n_train=3, l2sp=0.5)
    loss, xent = objective.loss(logits, labels, torch.zeros(2, 2), [(w, w0), (b, b0)])
    # 0.5 * ((1 + 1 + 0 + 4) + (0.0625 + 0.5625)) = 3.3125, plus ln 2 from the uniform logits.
    assert loss.item() == pytest.approx(3.3125 + xent.item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(w.grad, 2 * 0.5 * (w.detach() - w0)) and torch.allclose(b.grad, 2 * 0.5 * (b.detach() - b0))


def test_batched_loss_with_label_smoothing_equals_each_head_alone():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(3, 6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    weights = torch.randn(3, 5, 7, generator=g)
    scales = [0.0, 0.1, 2.0]
    loss, xent = stacked_loss(logits, labels, weights, scales, label_smoothing=0.2)
    for h in range(3):
        single, single_xent = Objective(l2=scales[h] * 10, n_train=10, label_smoothing=0.2).loss(logits[h], labels, weights[h])
        assert loss[h].item() == pytest.approx(single.item(), rel=1e-6) and xent[h].item() == pytest.approx(single_xent.item(), rel=1e-6)


def test_the_report_formula_shows_exactly_the_terms_in_use():
    assert describe_objective((0.0,)) == "loss = mean cross-entropy"
    text = describe_objective((0.0, 1.0), label_smoothing=0.1, l2sp=0.01)
    assert "(labels smoothed by 0.1)" in text and "(l2 / n_train) * sum(W_head ** 2)" in text and "(L2-SP, A in 0.01)" in text
    # A grid's lists: only the nonzero values are terms in use.
    text = describe_objective((1.0,), label_smoothing=(0.0, 0.1), l2sp=(0.0,))
    assert "(labels smoothed by 0.1)" in text and "L2-SP" not in text


def test_l2sp_keeps_fine_tuned_layers_near_their_pretrained_values(tiny_folder, resnet10_random):
    def distance(l2sp):
        """How far the layer is after the last update (the restored best epoch may be epoch 0: no update)."""
        session = RunSession(CutInputs(copy.deepcopy(resnet10_random), load_splits(tiny_folder),
                                       EngineConfig(device="cpu", progress=False, num_workers=0, runtime="torch"), None))
        pretrained = resnet10_random.model.features.stage4.unit1.body.conv2.conv.weight
        after: list[float] = []

        def on_epoch(_record):
            after.append((session.model.features.stage4.unit1.body.conv2.conv.weight - pretrained).norm().item())

        session.run(TrainConfig(lr=1e-3, epochs=3, patience=5, batch_size=8, l2sp=l2sp), 3, on_epoch=on_epoch)
        return after[-1]

    free, anchored = distance(0.0), distance(1e4)
    assert free > 0 and anchored < 0.2 * free
