"""Speed of ``transferlab predict`` on CPU: decoding + the whole network, against the network alone.

    python benchmarks/bench_predict.py --data ../shared/data/birds10 [--backbone efficientnet_lite0] [--images 256]

Times ``Classifier.predict_proba`` on `--images` training images of `--data` (its default decoding: on CPU,
threads of this process taking turns with the model), the same with 2 decoding worker processes
(``num_workers=2``: what ran by default before), and the network alone on the same images decoded
beforehand (``inference_img_s``, channels_last as predict runs it; ``nchw_inference_img_s`` in the
default layout). Rounds alternate the variants and the best round counts. ``predict_over_inference``
= predict / inference (1.0: decoding costs nothing). The process keeps freed memory
(``core.devices.keep_freed_memory``), as every prediction does. Without pretrained weights at hand a
randomly initialised copy is timed. Prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from transferlab.core.devices import keep_freed_memory
from transferlab.core.errors import UserError
from transferlab.data import image_loader, load_splits
from transferlab.deploy.predict import Classifier
from transferlab.models import load_backbone


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    keep_freed_memory()
    try:
        backbone, weights = load_backbone(args.backbone), "pretrained"
    except UserError:
        backbone, weights = load_backbone(args.backbone, pretrained=False), "random"
    pre = backbone.spec.preprocessing
    split = load_splits(args.data).train
    split = split.subset(list(range(0, len(split), max(1, len(split) // args.images)))[: args.images])
    files = list(split.files)
    with torch.no_grad():
        n_out = backbone.model.eval()(torch.zeros(1, 3, pre.input_size, pre.input_size)).shape[1]
    clf = Classifier(backbone.model, [str(i) for i in range(n_out)], pre, device="cpu")
    decoded = [x for x, _y, _idx, _ok in image_loader(split, pre, 64, 0)]
    nchw = [x.contiguous() for x in decoded]

    def predict():
        clf.predict_proba(files)

    def predict_with_workers():
        clf.predict_proba(files, num_workers=2)

    @torch.no_grad()
    def inference():
        for x in decoded:
            clf.model(clf.placement.put(x))

    @torch.no_grad()
    def nchw_inference():
        for x in nchw:
            clf.model(x)

    variants = {"predict": predict, "workers_2": predict_with_workers, "inference": inference, "nchw_inference": nchw_inference}
    best = dict.fromkeys(variants, 0.0)
    for r in range(args.rounds):
        for name, fn in variants.items():
            layout = torch.contiguous_format if name == "nchw_inference" else torch.channels_last
            clf.model.to(memory_format=layout)
            t = time.perf_counter()
            fn()
            best[name] = max(best[name], len(files) / (time.perf_counter() - t))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()) + " img/s (best so far)", file=sys.stderr)
    result = {
        "backbone": args.backbone, "weights": weights, "images": len(files), "threads": torch.get_num_threads(),
        "predict_img_s": round(best["predict"], 1), "workers_2_img_s": round(best["workers_2"], 1),
        "inference_img_s": round(best["inference"], 1), "nchw_inference_img_s": round(best["nchw_inference"], 1),
        "predict_over_inference": round(best["predict"] / best["inference"], 3),
        "predict_over_workers_2": round(best["predict"] / best["workers_2"], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
