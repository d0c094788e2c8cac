"""How fast can a whole-network fine-tuning step run on this machine? Layouts, torch.compile and input paths.

    python benchmarks/bench_train_step.py [--backbone efficientnet_lite0] [--batch 32] [--steps 6]
        [--data ../shared/data/pacs-sketch] [--no-compile]

Times, in one run, AdamW steps of the whole network (frozen batch-norm statistics, as the fine-tuning
rule trains) on one fixed batch:
  - ``eager_contiguous``: the default memory layout;
  - ``eager_channels_last``: model and inputs channels_last (what transferlab runs);
  - ``compiled_channels_last``: ``torch.compile`` of the model (inductor), after its compile (timed apart);
and, with --data, one training epoch of the real input path (``ImageSource``: decoding workers, random
crops) against the same steps on pre-decoded tensors: the default (None: one decoding thread per model thread,
taking turns with the model) and 0, 1 and 2 decoding worker processes. Prints one JSON
line: img/s of each, their ratios to ``eager_contiguous``, the compile seconds, and per worker count
``input_path_over_tensors`` (1.0: decoding costs the model nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from transferlab.core.devices import keep_freed_memory
from transferlab.models import load_backbone


def frozen_bn_train(model: torch.nn.Module) -> None:
    """Eval mode everywhere (batch norm keeps its pretrained statistics), every parameter trainable."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)


def steps_per_second(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int = 2) -> float:
    """AdamW steps per second of `model` on the batch (x, y), after `warmup` untimed steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x)[:, : int(y.max()) + 1], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - start)


def input_path(backbone, data: str, batch: int, workers_list: tuple[int, ...]) -> dict:
    """One epoch through ImageSource (augmented) vs the same batches from tensors decoded beforehand."""
    from transferlab.core.devices import Placement
    from transferlab.data import load_splits
    from transferlab.features.sources import ImageSource

    splits = load_splits(data)
    model = copy.deepcopy(backbone.model).to(memory_format=torch.channels_last)
    frozen_bn_train(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    placement = Placement(torch.device("cpu"))
    n = len(splits.train)
    order = torch.arange(n)

    def epoch(batches) -> float:
        start = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return n / (time.perf_counter() - start)

    out = {}
    decoded = list(ImageSource(splits.train, backbone.spec.preprocessing, placement, 0).augmented(0).batches(order, batch))
    tensors = epoch(iter(decoded))
    for workers in workers_list:
        source = ImageSource(splits.train, backbone.spec.preprocessing, placement, workers).augmented(0)
        img_s = epoch(source.batches(order, batch))
        out[str(workers)] = {"img_s": round(img_s, 1), "input_path_over_tensors": round(img_s / tensors, 3)}
    return {"tensors_img_s": round(tensors, 1), "workers": out}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--data", default=None, help="an image folder: also time the real input path")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    keep_freed_memory()  # as every CutInputs does
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone)
    size = backbone.spec.preprocessing.input_size
    x = torch.randn(args.batch, 3, size, size)
    y = torch.randint(0, 7, (args.batch,))
    result: dict = {"backbone": args.backbone, "batch": args.batch, "threads": torch.get_num_threads(), "img_s": {}}
    plain = copy.deepcopy(backbone.model)
    frozen_bn_train(plain)
    result["img_s"]["eager_contiguous"] = args.batch * steps_per_second(plain, x, y, args.steps)
    last = copy.deepcopy(backbone.model).to(memory_format=torch.channels_last)
    frozen_bn_train(last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    result["img_s"]["eager_channels_last"] = args.batch * steps_per_second(last, x_last, y, args.steps)
    if not args.no_compile:
        compiled_model = copy.deepcopy(backbone.model).to(memory_format=torch.channels_last)
        frozen_bn_train(compiled_model)
        compiled = torch.compile(compiled_model)
        start = time.perf_counter()
        try:
            steps_per_second(compiled, x_last, y, steps=1, warmup=0)  # the compile itself
            result["compile_s"] = round(time.perf_counter() - start, 1)
            result["img_s"]["compiled_channels_last"] = args.batch * steps_per_second(compiled, x_last, y, args.steps)
        except Exception as e:  # no C++ toolchain, an unsupported op: say so, time the rest
            result["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    base = result["img_s"]["eager_contiguous"]
    result["img_s"] = {k: round(v, 1) for k, v in result["img_s"].items()}
    result["over_eager_contiguous"] = {k: round(v / base, 2) for k, v in result["img_s"].items()}
    if args.data:
        result["input_path"] = input_path(backbone, args.data, args.batch, (None, 0, 1, 2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
