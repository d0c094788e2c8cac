"""Everything a sweep can refuse, checked for every backbone before anything is written: unknown or
unreadable backbones, weights that do not load, a fine-tuning grid a backbone cannot run."""

from __future__ import annotations

from transferlab.core.errors import ConfigError, UserError
from transferlab.data import ImageSplits
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.cut_plan import check_feature_augment_planned
from transferlab.models import CATALOGUE, Backbone, check_weights_available, get_spec, load_backbone, with_source
from transferlab.models.freezing import layer_names, layers_of_last_blocks
from transferlab.sweep.config import SweepConfig
from transferlab.sweep.plan import ft_layer_counts


def resolve_backbones(cfg: SweepConfig) -> tuple[list[str], dict[str, str]]:
    """Backbone names to run (architecture x source) and the skipped ones with the reason."""
    names: list[str] = []
    skipped: dict[str, str] = {}
    for arch in cfg.backbones:
        prefixed = ":" in arch  # timm:/torchvision:/hf: names carry their own source
        candidates = [arch] if arch.endswith("_cub") or prefixed else [with_source(arch, s) for s in cfg.sources]
        for name in candidates:
            if name in names or name in skipped:
                continue
            if prefixed:
                try:
                    get_spec(name)
                except ConfigError as e:
                    raise ConfigError("backbones", e.value, e.reason) from None
                except UserError:
                    raise
                except Exception as e:  # a model folder that is there but unreadable is bad input too
                    raise unreadable_backbone(name, "cannot be read", e) from None
            elif name not in CATALOGUE:
                try:
                    get_spec(name.removesuffix("_cub"))  # unknown architecture: an error with suggestions
                except ConfigError as e:
                    raise ConfigError("backbones", e.value, e.reason) from None
                skipped[name] = "no published weights for this architecture and source"
                continue
            reason = check_weights_available(name, cfg.model_dir)
            if reason:
                skipped[name] = f"weights {reason} in {cfg.model_dir}"
            else:
                names.append(name)
    return names, skipped


def check_ft_grid(cfg: SweepConfig, name: str, backbone: Backbone, splits: ImageSplits) -> None:
    """A ConfigError, before anything is written, for a fine-tuning grid that `backbone` cannot run:
    --ft-layers / --ft-blocks beyond it, or an --ft-augment whose cache it would not have (a cut with
    spatial maps for map, views within --cache-max-gb). Planned from one dummy forward: no image is read."""
    n_layers = len(layer_names(backbone.model))
    for unit, n in cfg.ft_units():
        if unit == "blocks":
            layers_of_last_blocks(backbone, n)
        elif int(n) > n_layers:
            raise ConfigError("ft.layers", n, f"{name} has only {n_layers} layers")
    if all(augment == "none" for augment in cfg.ft.get("feature_augment", ("none",))):
        return
    ft_ks = ft_layer_counts(cfg, backbone)
    order = cfg.probe_base.layer_order
    inputs = CutInputs(backbone, splits, cfg.engine, None, cfg.data.on_bad_image, share_cut_layers=max(ft_ks.values()),
                       layer_order=order)  # places the backbone as the sweep will
    for k in dict.fromkeys(ft_ks.values()):
        for augment in cfg.ft.get("feature_augment", ("none",)):
            try:
                check_feature_augment_planned(inputs.backbone, splits, cfg.engine, augment, k, order)
            except ConfigError as e:
                raise ConfigError("ft.feature_augment", e.value, f"{e.reason} ({name})") from None


def load_checked(name: str, model_dir: str) -> Backbone:
    """Backbone `name` with its weights; a file that is there but cannot be read is a UserError naming
    the backbone (it is the user's input, like a missing file), not an internal error."""
    try:
        return load_backbone(name, model_dir)
    except UserError:
        raise
    except Exception as e:
        raise unreadable_backbone(name, "its weights cannot be loaded", e) from None


def unreadable_backbone(name: str, what: str, error: Exception) -> UserError:
    """One line naming the backbone and the first line of why its files could not be used."""
    first = str(error).splitlines()[0][:200] if str(error) else ""
    return UserError(f"--backbones {name}: {what} ({type(error).__name__}: {first})")


def preflight(cfg: SweepConfig, names: list[str], splits: ImageSplits) -> None:
    """Everything a sweep can refuse, for every backbone, before anything is written: each backbone's
    weights load (a broken file is refused while the folder still shows its previous choices), and
    with LP-then-FT its fine-tuning grid fits it (:func:`check_ft_grid`, on that same loaded backbone)."""
    if cfg.fine_tunes:
        check_ft_augment_path(cfg)
    for name in names:
        backbone = load_checked(name, cfg.model_dir)
        if cfg.fine_tunes:
            check_ft_grid(cfg, name, backbone, splits)


def check_ft_augment_path(cfg: SweepConfig) -> None:
    """A ConfigError, before anything runs, for map augmentation with no cache to augment (views are drawn
    on the fly when the images are decoded every epoch)."""
    if cfg.engine.use_cache:
        return
    for augment in cfg.ft.get("feature_augment", ("none",)):
        if augment == "map":
            raise ConfigError("ft.feature_augment", augment, "needs the cached path (drop --no-cache; or --ft-augment none)")
