"""What a backbone is, as data: :class:`BackboneSpec` (how to build it, what it was trained on, how to feed it).

Its own module so that the zoo adapters, the zoo registry and the catalogue can all use it without
importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from transferlab.data import Preprocessing


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: how to build it, what it was trained on, how to feed it."""

    name: str
    zoo: str  # the adapter's NAME in the zoo registry: "pytorchcv" | "timm" | "torchvision" | "hf"
    arch: str  # the zoo's own model name (hf: the model id or local folder)
    source: str  # "imagenet1k" | "cub" | "imagenet21k" | ... | "local"; "unknown" when the library does not say
    source_top1: float | None  # percent, from the zoo's published table or the library's metadata
    preprocessing: Preprocessing
    tag: str = ""  # timm pretrained tag, torchvision weights enum name

    def with_local_weights(self, path: str) -> BackboneSpec:
        """The same backbone with its weights from the checkpoint at `path` (source "local", top-1 unknown)."""
        return replace(self, name=f"{self.name}@{path}", source="local", source_top1=None)
