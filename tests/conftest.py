"""Shared fixtures: tiny image folders made on the fly, random-weight backbones, the shared photo sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def shared_dataset(name: str) -> Path:
    """Path of a real photo set in ../shared/data; fail under CI, skip elsewhere, when it is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        message = f"shared data set {path} is missing"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def write_image_folder(root: Path, counts: dict[str, dict[str, int]], size: int = 40, seed: int = 0, ext: str = "png") -> Path:
    """Write ``root/<split>/<class>/img_i.<ext>`` images whose colour depends on the class (learnable);
    as BMP every image of one size has the same byte size."""
    rng = np.random.default_rng(seed)
    classes = sorted({c for per in counts.values() for c in per})
    for split, per_class in counts.items():
        for c, n in per_class.items():
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[classes.index(c) % 3] = 200
            for i in range(n):
                noise = rng.integers(0, 80, size=(size, size, 3))
                arr = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(arr, "RGB").save(folder / f"img_{i:03d}.{ext}")
    return root


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    """The README's load-without-transferlab snippet."""
    import re

    match = re.search(r"<!-- snippet: load-without-transferlab[^>]*-->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README lost its load-without-transferlab snippet"
    return match.group(1)


def run_readme_snippet(model_dir: Path, image: Path) -> tuple[str, float]:
    """(class, probability) the README snippet prints for `image`, run in a child process where
    transferlab cannot be imported: the snippet must need only the zoo."""
    import subprocess
    import sys

    prelude = (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'transferlab':\n"
        "            raise ImportError('transferlab is blocked in this test')\n"
        "sys.meta_path.insert(0, _Block())\n"
        f"model_dir = {str(model_dir)!r}\n"
        f"image_path = {str(image)!r}\n"
    )
    proc = subprocess.run([sys.executable, "-c", prelude + readme_snippet()], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, prob = proc.stdout.split()
    return name, float(prob)


def write_tiny_hf_vit(folder: Path, layers: int = 2) -> Path:
    """A tiny HF ViT (hidden 32, `layers` layers, 32 px) saved like a hub snapshot: config, weights, image processor."""
    import torch

    transformers = require("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(folder)
    processor_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    processor_cls(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def require(module: str):
    """Import an optional test dependency; under CI a missing one fails instead of skipping."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (CI installs .[test,ray])")
        pytest.skip(f"{module} is not installed")


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """3 classes; train 8 / val 3 / test 3 images per class."""
    counts = {
        "train": {c: 8 for c in ("a", "b", "c")},
        "val": {c: 3 for c in ("a", "b", "c")},
        "test": {c: 3 for c in ("a", "b", "c")},
    }
    return write_image_folder(tmp_path / "data", counts)


@pytest.fixture(scope="session")
def resnet10_random():
    """resnet10 with random weights, built once; tests must not modify it (use copy.deepcopy)."""
    from transferlab.models import load_backbone

    return load_backbone("resnet10", pretrained=False)


def without_torch(body: str) -> str:
    """Python code that runs `body` with torch blocked from import and the transferlab package face skipped
    (it imports torch), so that only the subpackages `body` imports are loaded."""
    src = Path(__file__).resolve().parents[1] / "src" / "transferlab"
    return ("import sys, types\n"
            "class _Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError('torch is blocked in this test')\n"
            "sys.meta_path.insert(0, _Block())\n"
            f"pkg = types.ModuleType('transferlab'); pkg.__path__ = [{str(src)!r}]; sys.modules['transferlab'] = pkg\n"
            + body
            + "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
