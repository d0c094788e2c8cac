"""The zoo registry: one ZooAdapter per zoo in ZOOS; a new zoo is one adapter plus one register_zoo line,
and is then resolved by its name prefix, built, loaded from a local checkpoint, listed, and offered by
`transferlab backbones --zoo`."""

import json

import pytest
import torch
from torch import nn

import transferlab
from transferlab.core.errors import ConfigError
from transferlab.data import Preprocessing
from transferlab.features.cache import Chain
from transferlab.models import (
    CATALOGUE,
    ZOOS,
    BackboneSpec,
    ZooAdapter,
    check_weights_available,
    get_spec,
    list_zoo,
    load_backbone,
    prefixed_zoos,
    register_zoo,
)
from transferlab.models.backbone import weights_digest
from transferlab.models.zoo import zoo_of

IN_FEATURES = 3 * 2 * 2  # the tiny zoo's models read 3x2x2 images


class TinyNet(nn.Module):
    """flatten -> Linear(12, width) -> head Linear(width, 3)."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(1), nn.Linear(IN_FEATURES, width))
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.body(x))


class TinyZoo:
    """A whole zoo in one class: ``tiny:WIDTH``; its checkpoints name the body ``trunk.`` instead of ``body.``."""

    NAME = "tiny"
    REF_FORM = "WIDTH"

    def resolve(self, ref: str) -> BackboneSpec:
        if not ref.isdigit():
            raise ConfigError("backbone", f"tiny:{ref}", "the tiny zoo's names are widths")
        return BackboneSpec(f"tiny:{ref}", "tiny", ref, "unknown", None, Preprocessing())

    def build(self, spec: BackboneSpec, pretrained: bool, model_dir: str) -> nn.Module:
        if pretrained:  # the zoo's "published" weights: seed 0
            torch.manual_seed(0)
        return TinyNet(int(spec.arch))

    def classifier_name(self, model: nn.Module) -> str:
        return "fc"

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("body", model.body), ("fc", model.fc)]

    def weights_status(self, spec: BackboneSpec, model_dir: str) -> str:
        return "present" if int(spec.arch) % 2 == 0 else "missing (odd widths have none)"

    def adapt_state(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {k.replace("trunk.", "body.", 1): v for k, v in state.items()}

    def list_available(self, pattern: str, model_dir: str) -> list[dict]:
        return [{"name": f"tiny:{w}", "zoo": "tiny", "source": "unknown", "source_top1": None,
                 "weights": self.weights_status(self.resolve(str(w)), model_dir)} for w in (4, 5)]


@pytest.fixture
def tiny_zoo():
    zoo: ZooAdapter = TinyZoo()
    register_zoo(zoo)  # the one line a new zoo takes
    yield zoo
    del ZOOS["tiny"]


def zoo_choices() -> list[str]:
    """The choices of `transferlab backbones --zoo`, read from the parser the CLI builds."""
    from transferlab.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a.choices, dict)).choices
    zoo = next(a for a in commands["backbones"]._actions if a.dest == "zoo")
    return list(zoo.choices)


def test_the_shipped_zoos_are_registered_under_their_names_and_build_every_catalogue_entry():
    assert list(ZOOS) == ["pytorchcv", "timm", "torchvision", "hf"]
    assert all(zoo.NAME == name for name, zoo in ZOOS.items())
    assert {spec.zoo for spec in CATALOGUE.values()} <= set(ZOOS)


def test_prefixed_zoos_are_those_with_a_ref_form_in_registration_order():
    assert prefixed_zoos() == ["timm", "torchvision", "hf"]  # pytorchcv models are catalogue names only
    with pytest.raises(ConfigError, match="unknown backbone"):
        get_spec("pytorchcv:resnet10")
    with pytest.raises(ConfigError, match="unknown zoo; known: timm, torchvision, hf"):
        list_zoo("pytorchcv")


def test_the_cli_offers_the_registrys_prefixed_zoos(tiny_zoo):
    assert zoo_choices() == prefixed_zoos() == ["timm", "torchvision", "hf", "tiny"]


def test_a_second_zoo_of_the_same_name_is_refused(tiny_zoo):
    with pytest.raises(ValueError, match="zoo tiny is registered already"):
        register_zoo(TinyZoo())


def test_an_unregistered_zoo_is_unknown():
    with pytest.raises(ValueError, match="unknown zoo tiny"):
        zoo_of(BackboneSpec("tiny:4", "tiny", "4", "unknown", None, Preprocessing()))
    with pytest.raises(ConfigError, match="unknown backbone"):
        get_spec("tiny:4")


def test_a_registered_zoo_resolves_its_prefix_and_is_named_in_hints(tiny_zoo):
    spec = get_spec("tiny:4")
    assert (spec.name, spec.zoo, spec.arch) == ("tiny:4", "tiny", "4")
    with pytest.raises(ConfigError, match="the tiny zoo's names are widths"):
        get_spec("tiny:wide")
    with pytest.raises(ConfigError, match=r"; or timm:NAME, torchvision:NAME, hf:MODEL_ID, tiny:WIDTH$"):
        get_spec("no-such-backbone")
    with pytest.raises(ConfigError, match="PREFIX one of timm, torchvision, hf, tiny$"):
        get_spec("tiny:")


def test_a_registered_zoo_builds_a_backbone_whose_chain_is_its_forward(tiny_zoo):
    bb = load_backbone("tiny:4")
    assert bb.weights == "pretrained" and bb.classifier is bb.model.fc and bb.num_features == 4
    assert bb.weights_digest == weights_digest(bb.model, "fc")
    x = torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(Chain(bb.chain())(x), bb.model(x))
    torch.manual_seed(0)
    assert torch.equal(bb.model.body[1].weight, TinyNet(4).body[1].weight)  # the zoo's seed-0 weights


def test_a_local_checkpoint_goes_through_the_zoos_adapt_state(tiny_zoo, tmp_path):
    torch.manual_seed(1)
    source = TinyNet(4)
    state = {k.replace("body.", "trunk.", 1): v for k, v in source.state_dict().items()}  # the zoo's own key names
    torch.save(state, tmp_path / "tiny.pth")
    bb = load_backbone("tiny:4", weights=str(tmp_path / "tiny.pth"))
    assert bb.spec.source == "local" and bb.spec.name == f"tiny:4@{tmp_path / 'tiny.pth'}"
    for name, tensor in source.state_dict().items():
        assert torch.equal(bb.model.state_dict()[name], tensor), name


def test_a_registered_zoo_is_listed_and_its_weights_checked(tiny_zoo, capsys):
    assert [r["name"] for r in list_zoo("tiny")] == ["tiny:4", "tiny:5"]
    assert check_weights_available("tiny:4") is None
    assert check_weights_available("tiny:5") == "missing (odd widths have none)"
    from transferlab.cli.main import main

    assert main(["backbones", "--zoo", "tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["weights"]) for r in rows] == [("tiny:4", "present"), ("tiny:5", "missing (odd widths have none)")]


def test_load_backbone_is_importable_from_the_top():
    assert transferlab.load_backbone is load_backbone and "load_backbone" in transferlab.__all__
