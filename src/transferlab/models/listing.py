"""What backbones are at hand: the catalogue's rows, a zoo's names, and whether weights are on this
machine (nothing is downloaded; only ``list_backbones`` builds models, with random weights, to count
their parameters)."""

from __future__ import annotations

from transferlab.core.errors import ConfigError
from transferlab.models.backbone import DEFAULT_MODEL_DIR
from transferlab.models.registry import CATALOGUE, get_spec
from transferlab.models.zoo import ZOOS, prefixed_zoos, zoo_of


def list_backbones(model_dir: str = DEFAULT_MODEL_DIR) -> list[dict]:
    """One row per catalogued backbone: name, zoo, source, top-1, parameters, preprocessing, weights."""
    rows = []
    for spec in CATALOGUE.values():
        zoo = zoo_of(spec)
        model = zoo.build(spec, pretrained=False, model_dir=model_dir)
        pre = spec.preprocessing
        rows.append(
            {
                "name": spec.name,
                "zoo": spec.zoo,
                "arch": spec.arch,
                "source": spec.source,
                "source_top1": spec.source_top1,
                "params": sum(p.numel() for p in model.parameters()),
                "input_size": pre.input_size,
                "resize": pre.resize_size,
                "crop_pct": pre.crop_pct,
                "interpolation": pre.interpolation,
                "mean": list(pre.mean),
                "std": list(pre.std),
                "weights": zoo.weights_status(spec, model_dir),
            }
        )
    return rows


def check_weights_available(name: str, model_dir: str = DEFAULT_MODEL_DIR) -> str | None:
    """None if `name`'s weights are at hand, else a short reason (no model is built)."""
    spec = get_spec(name)
    status = zoo_of(spec).weights_status(spec, model_dir)
    return None if status == "present" else status


def list_zoo(zoo: str, pattern: str = "*", model_dir: str = DEFAULT_MODEL_DIR) -> list[dict]:
    """Names usable with the `zoo` prefix that match `pattern` (fnmatch), and whether their weights are
    on this machine (nothing is downloaded, no model is built)."""
    prefixes = prefixed_zoos()
    if zoo not in prefixes:
        raise ConfigError("zoo", zoo, f"unknown zoo; known: {', '.join(prefixes)}")
    return ZOOS[zoo].list_available(pattern, model_dir)
