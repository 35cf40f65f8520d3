"""Top-1 accuracy of the pretrained EfficientNet-Lite0 on the 1,000 shared ImageNet samples.

    .venv/bin/python bench/imagenet_top1.py [--limit N]

The images are ``../shared/imagenet-samples`` (one per class), labels from ``imagenet-samples.tsv``;
preprocessing is the model's own. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from textcam.data import iter_batches  # noqa: E402
from textcam.models import load_model  # noqa: E402

SHARED = ROOT.parent / "shared"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    args = parser.parse_args(argv)
    rows = list(csv.DictReader((SHARED / "imagenet-samples.tsv").open(), delimiter="\t"))[: args.limit]
    model = load_model("efficientnet-lite0")
    paths = [str(SHARED / "imagenet-samples" / r["file"]) for r in rows]
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    t0 = time.perf_counter()
    correct, seen = 0, 0
    with torch.inference_mode():
        for batch in iter_batches(paths, [model.preprocess], batch_size=50, num_workers=1):
            pred = model.module(batch.tensors[0]).argmax(1)
            correct += int((pred == labels[batch.indices]).sum())
            seen += batch.indices.numel()
    out = {"model": model.model_id, "images": seen, "top1": round(correct / max(seen, 1), 4)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"EfficientNet-Lite0 top-1 on {seen} shared ImageNet samples: {out['top1']:.1%}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
