
import numpy as np
import pytest
import torch

from conftest import require
from transferlab.core.errors import UserError
from transferlab.data import build_transform
from transferlab.features.cache import Chain
from transferlab.models import load_backbone
from transferlab.models.registry import get_spec


def test_missing_pytorchcv_weights_name_the_file_and_folder(tmp_path):
    with pytest.raises(UserError) as e:
        load_backbone("resnet10", model_dir=str(tmp_path))
    msg = str(e.value)
    assert "resnet10-1253-88a5961b.pth" in msg and str(tmp_path) in msg
    assert "\n" not in msg


def test_wrong_sha1_file_is_not_accepted(tmp_path):
    (tmp_path / "resnet10-1253-88a5961b.pth").write_bytes(b"not the real weights")
    with pytest.raises(UserError, match="sha1 does not match"):
        load_backbone("resnet10", model_dir=str(tmp_path))


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UserError, match="did you mean .*resnet10"):
        get_spec("resnet1O")


@pytest.mark.parametrize("name", ["resnet10", "mobilenet_wd4", "efficientnet_lite0"])
def test_chain_composes_to_the_model_forward(name):
    bb = load_backbone(name, pretrained=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(Chain(bb.chain())(x), bb.model(x), atol=1e-5)
    assert bb.chain()[-1][1] is bb.classifier


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_loads_exactly(tmp_path, resnet10_random, suffix):
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in resnet10_random.model.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    bb = load_backbone("resnet10", weights=str(path))
    loaded = bb.model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert bb.spec.source == "local" and bb.weights == str(path)


def test_local_checkpoint_shape_mismatch_names_the_tensor(tmp_path, resnet10_random):
    state = dict(resnet10_random.model.state_dict())
    state["features.stage2.unit1.body.conv1.conv.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"features\.stage2\.unit1\.body\.conv1\.conv\.weight has shape \(3, 3\)"):
        load_backbone("resnet10", weights=str(tmp_path / "bad.pth"))


class NotATensor:
    pass


def test_unsafe_pickle_is_refused_not_loaded(tmp_path):
    torch.save({"x": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="weights_only=True"):
        load_backbone("resnet10", weights=str(tmp_path / "evil.pth"))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_weights_classify_real_photos(name):
    skdata = require("skimage.data")
    from PIL import Image

    bb = load_backbone(name)
    tf = build_transform(bb.spec.preprocessing)
    photos = {"chelsea": skdata.chelsea(), "coffee": skdata.coffee()}
    x = torch.stack([tf(Image.fromarray(np.asarray(img))) for img in photos.values()])
    with torch.no_grad():
        top1 = bb.model(x).argmax(1).tolist()
    assert 281 <= top1[0] <= 285, top1  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top1[1] == 967, top1  # espresso
