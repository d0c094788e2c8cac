"""The inputs of a cut (features.cut_inputs), their snapshot for workers, the planning rules (features.cut_plan)
and the run session on them (train.session). Expected values come from the definitions."""

import copy
import pickle

import pytest
import torch

from transferlab.core.errors import ConfigError
from transferlab.data import load_splits
from transferlab.features.cache import Chain, run_frozen
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.cut_plan import refuse_feature_augment
from transferlab.features.engine import EngineConfig
from transferlab.models.freezing import plan_cut
from transferlab.train.config import TrainConfig
from transferlab.train.session import RunSession

ENGINE = EngineConfig(device="cpu", progress=False, num_workers=0, runtime="torch")


def inputs_of(backbone, folder, **kw):
    return CutInputs(copy.deepcopy(backbone), load_splits(folder), ENGINE, None, **kw)


def test_a_pickled_snapshot_trains_the_same_numbers_without_extracting_anything(tiny_folder, resnet10_random):
    k = 3
    cfgs = [TrainConfig(lr=1e-3, epochs=2, batch_size=8, seed=4),
            TrainConfig(lr=1e-3, epochs=2, batch_size=8, seed=4, feature_augment="views:2", augment_min_scale=0.5)]
    here = inputs_of(resnet10_random, tiny_folder)
    built = RunSession(here)  # the pristine weights are captured here, before any run
    expected = [built.run(cfg, k) for cfg in cfgs]
    snapshot = pickle.loads(pickle.dumps(here.snapshot(k, views_keys=[(2, 4, 0.5)])))
    assert snapshot.n_trainable_layers == k and list(snapshot.views) == [(2, 4, 0.5)]
    assert snapshot.train.inputs.device.type == "cpu" and snapshot.train.inputs.dtype == torch.float32
    worker = inputs_of(resnet10_random, tiny_folder)
    worker.adopt(snapshot)
    session = RunSession(worker)
    for cfg, ref in zip(cfgs, expected):
        got = session.run(cfg, k)
        assert got.history == ref.history and got.best_epoch == ref.best_epoch
        assert all(torch.equal(got.best_state[n], ref.best_state[n]) for n in ref.best_state)
    assert worker.timings == {}  # no split decoded, extracted or loaded: every input came with the snapshot


def test_snapshot_is_none_when_uncached_and_holds_the_views_computed_so_far(tiny_folder, resnet10_random):
    uncached = CutInputs(copy.deepcopy(resnet10_random), load_splits(tiny_folder),
                         EngineConfig(device="cpu", progress=False, num_workers=0, use_cache=False), None)
    assert uncached.snapshot(1) is None
    inputs = inputs_of(resnet10_random, tiny_folder)
    assert inputs.snapshot(3).views == {}
    views = inputs.views(3, 1, 7, 0.6)
    assert torch.equal(inputs.snapshot(3).views[(1, 7, 0.6)].inputs, views.inputs)


def test_a_shallow_cut_is_cached_at_the_shared_fine_tuning_cut_and_run_from_there(tiny_folder, resnet10_random):
    shared = inputs_of(resnet10_random, tiny_folder, share_cut_layers=3)
    base = plan_cut(shared.backbone, 3).index
    block = shared.backbone.chain()[base][0]
    assert shared.cache_origin(1) == block == "features.stage4.unit1" and shared.cache_origin(3) == block
    assert shared.timings == {}  # planned: nothing extracted
    assert inputs_of(resnet10_random, tiny_folder).cache_origin(1) == "output"  # no sharing: its own cut
    assert CutInputs(copy.deepcopy(resnet10_random), load_splits(tiny_folder),
                     EngineConfig(device="cpu", progress=False, num_workers=0, use_cache=False), None).cache_origin(1) is None
    # The definition: the shallow cut's inputs are the blocks between the two cuts run on the shared cut's inputs.
    setup = shared.setup(1)
    assert setup.base == base
    deep = shared.setup(3).sources["train"].inputs
    between = Chain(shared.backbone.chain()[base : setup.cut.index])
    assert torch.equal(setup.sources["train"].inputs, run_frozen(between, deep, shared.placement))


def test_feature_augment_refusals_follow_the_size_of_the_views():
    # 10 float32 numbers per image, 100 training images, 2 views: 8,000 bytes.
    refuse_feature_augment("views:2", "", "cut", (10,), 100, 8e-6)  # exactly the budget: accepted
    with pytest.raises(ConfigError, match=r"would hold 8.00 kB of views > --cache-max-gb 7.9e-06 \(7.9 kB\)"):
        refuse_feature_augment("views:2", "", "cut", (10,), 100, 7.9e-6)
    with pytest.raises(ConfigError, match="needs cached spatial maps before global pooling; the input of cut is"):
        refuse_feature_augment("map", "", "cut", (10,), 100, 1.0)
    refuse_feature_augment("map", "", "cut", (2, 3, 3), 100, 1.0)
    with pytest.raises(ConfigError, match=r"needs the cached path \(drop --no-cache; or --ft-augment none\)"):
        refuse_feature_augment("map", "drop --no-cache", "cut", (), 100, 1.0)
    refuse_feature_augment("none", "drop --no-cache", "cut", (), 100, 0.0)  # nothing to refuse
    refuse_feature_augment("views:4", "drop --no-cache", "cut", (), 100, 0.0)  # images decoded anyway: views on the fly


def test_every_run_starts_from_the_pristine_weights(tiny_folder, resnet10_random):
    session = RunSession(inputs_of(resnet10_random, tiny_folder))
    pristine = {n: t.clone() for n, t in session.pristine.items()}
    session.run(TrainConfig(lr=1e-2, epochs=2, batch_size=8), 3)
    session.reset(seed=0, n_trainable_layers=3)
    state = session.model.state_dict()
    body = [n for n in pristine if not n.startswith("output.")]
    assert all(torch.equal(state[n], pristine[n]) for n in body)
    assert session.trainable_param_count(1) == 512 * 3 + 3  # the head alone: weight and bias for 3 classes
