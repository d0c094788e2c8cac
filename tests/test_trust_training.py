"""Training is a function of the config alone: nothing stochastic switches on behind the run's seeds."""

import copy
import dataclasses

import torch
from torch import nn

from transferlab.data import load_splits
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.models import load_backbone
from transferlab.models.freezing import FreezePlan, set_train_mode
from transferlab.train.config import TrainConfig
from transferlab.train.session import RunSession

ENGINE = EngineConfig(device="cpu", progress=False, num_workers=0, runtime="torch")


def convnext_tiny_small_input():
    """torchvision's ConvNeXt-T (random weights): each block owns a parameter (layer scale) and holds a
    StochasticDepth child (p up to 0.1), so a recursive ``.train()`` on a trainable block switches it on."""
    bb = load_backbone("torchvision:convnext_tiny", pretrained=False)
    pre = dataclasses.replace(bb.spec.preprocessing, input_size=64, resize=None, crop_pct=1.0)
    bb.spec = dataclasses.replace(bb.spec, preprocessing=pre)
    return bb


def test_training_mode_keeps_dropout_and_stochastic_depth_off_inside_trainable_blocks():
    bb = convnext_tiny_small_input()
    FreezePlan(7).apply(bb)
    stochastic = [m for m in bb.model.modules() if type(m).__name__ in ("StochasticDepth", "Dropout")]
    assert stochastic, "the model has stochastic layers"
    set_train_mode(bb.model, True, train_bn=True)
    assert not any(m.training for m in stochastic)
    # The training forward is then a function of the input alone, whatever the global RNG says.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        a = bb.model(x)
        torch.manual_seed(2)
        b = bb.model(x)
    assert torch.equal(a, b)


def test_trainable_batch_norm_alone_follows_train_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.BatchNorm2d(4))
    for p in model[3].parameters():
        p.requires_grad_(False)  # a frozen BN keeps its statistics
    set_train_mode(model, True, train_bn=True)
    assert [m.training for m in model] == [False, True, False, False]
    set_train_mode(model, True, train_bn=False)
    assert not any(m.training for m in model.modules())


def test_fine_tuning_histories_do_not_depend_on_the_global_torch_seed(tiny_folder, tmp_path):
    """The reviewer's case: convnext_tiny, the last 7 layers trained, a shared cache, two global seeds."""
    bb = convnext_tiny_small_input()
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=8, seed=0)
    histories = []
    for global_seed in (11, 12):
        torch.manual_seed(global_seed)
        session = RunSession(CutInputs(copy.deepcopy(bb), load_splits(tiny_folder), ENGINE, tmp_path / "cache"))
        histories.append(session.run(cfg, 7).history)
    assert histories[0] == histories[1]
