"""Hand-built audit runs with planted structure, written with the declared Arrow schemas.

Three classes, each with its own phrase ("whiskers" for cat, ...) selected in nearly every image of the class,
a pool of background phrases selected at random, and planted biases:

* ``snow`` is evidence *for* ``dog`` in 80 % of dog images (10 % elsewhere), and more so in the dog images
  whose label is ``cat`` (misclassified);
* ``stripes`` is evidence *against* ``cat`` in 70 % of cat images (never *for* anything);
* every score of ``bird`` images is multiplied by 3 (a per-class offset the statistic must remove).

``shuffle=True`` permutes the predicted class across images after generation (no structure left).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from textcam.schema import ERRORS, EXPLANATIONS, IMAGES

CLASSES = ["bird", "cat", "dog"]
OWN = {"cat": "whiskers", "dog": "floppy ears", "bird": "feathers"}
POOL = ["grass", "sky", "water", "indoors", "road", "tree", "sand", "fence", "car", "ball", "leaves", "rock"]
AGAINST_POOL = ["blur", "dark", "text", "frame", "people"]


def _phrase(text: str, score: float, direction: str) -> dict:
    return {"text": text, "score": float(score), "direction": direction}


def make_run(
    root: Path,
    *,
    n_per_class: int = 40,
    seed: int = 0,
    shuffle: bool = False,
    n_shards: int = 2,
    label_text: dict[str, str] | None = None,
    phrase_text: dict[str, str] | None = None,
    name_suffix: str = "",
    write_images: bool = True,
    filler: tuple[str, str] | None = None,
    confusion: tuple[str, str] | None = None,
) -> Path:
    """Write ``root/run`` (the run directory) and ``root/data`` (the dataset root); return the run dir.

    ``label_text`` renames classes in labels/predictions, ``phrase_text`` renames phrases and ``name_suffix``
    is appended to image file names (to plant hostile strings in the report).
    ``filler=(class, phrase)`` adds a small phrase (0.15-0.25, a fifth of the class's own) to 99 % of the
    class's images, as sparse coding does; ``confusion=(class, other)`` adds the other class's name as
    strong evidence against the class in 70 % of its images.
    """
    rng = np.random.default_rng(seed)
    run_dir, data_dir = root / "run", root / "data"
    (run_dir / "explanations").mkdir(parents=True, exist_ok=True)
    (run_dir / "errors").mkdir(exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = label_text or {}
    rows, images = [], []
    preds = np.repeat(np.arange(len(CLASSES)), n_per_class)
    for i, k in enumerate(preds):
        cname = CLASSES[k]
        phrases = []
        if rng.random() < 0.95:
            phrases.append(_phrase(OWN[cname], 1.0 + rng.random(), "for"))
        for p in rng.choice(POOL, size=3, replace=False):
            phrases.append(_phrase(p, 0.2 + 0.5 * rng.random(), "for"))
        if rng.random() < 0.4:
            phrases.append(_phrase(rng.choice(AGAINST_POOL), -(0.2 + 0.4 * rng.random()), "against"))
        snow = rng.random() < (0.8 if cname == "dog" else 0.1)
        if snow:
            phrases.append(_phrase("snow", 0.8 + 0.4 * rng.random(), "for"))
        if cname == "cat" and rng.random() < 0.7:
            phrases.append(_phrase("stripes", -(0.8 + 0.4 * rng.random()), "against"))
        if filler is not None and cname == filler[0] and rng.random() < 0.99:
            phrases.append(_phrase(filler[1], 0.15 + 0.1 * rng.random(), "for"))
        if confusion is not None and cname == confusion[0] and rng.random() < 0.7:
            phrases.append(_phrase(confusion[1], -(0.8 + 0.4 * rng.random()), "against"))
        if cname == "bird":
            phrases = [{**p, "score": p["score"] * 3} for p in phrases]
        # Dog images with snow are more often cats in truth: snow is what fooled the classifier.
        label = cname
        if cname == "dog" and rng.random() < (0.45 if snow else 0.1):
            label = "cat"
        rows.append({"k": int(k), "label": label, "phrases": phrases, "i": i})
    if shuffle:
        perm = rng.permutation(len(rows))
        ks = [rows[j]["k"] for j in perm]
        for r, k in zip(rows, ks, strict=True):
            r["k"] = k
    out = []
    for r in rows:
        i, k = r["i"], r["k"]
        image_id = f"img{i:04d}"
        rel = f"{CLASSES[k]}/{image_id}{name_suffix}.png"
        if write_images:
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            arr = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(data_dir / rel)
        sal = rng.random(49).astype(np.float16)
        pred_name = names.get(CLASSES[k], CLASSES[k])
        label = names.get(r["label"], r["label"])
        base = {
            "run_id": "run-test",
            "image_id": image_id,
            "path": rel,
            "label": label,
            "pred": int(k),
            "pred_name": pred_name,
            "prob": float(0.5 + 0.5 * rng.random()),
            "topk": [{"class_index": int(k), "class_name": pred_name, "prob": 0.9}],
            "groups": [
                {"text": p["text"], "share": 0.5, "n_channels": 3, "map": list(rng.random(49))}
                for p in r["phrases"][:2]
            ],
            "saliency": list(sal),
            "map_h": 7,
            "map_w": 7,
            "model_id": "toy",
            "layer": "layer4",
            "bank_id": "bank",
            "clip_id": "clip",
            "method": "gradcam",
        }
        renamed = [{**p, "text": (phrase_text or {}).get(p["text"], p["text"])} for p in r["phrases"]]
        out.append(
            {
                **base,
                "target_class": int(k),
                "target_name": pred_name,
                "rank_of_target": 0,
                "phrases": renamed,
            }
        )
        # A second explained class (rank 1): must not enter the per-class statistics.
        k2 = (k + 1) % len(CLASSES)
        out.append(
            {
                **base,
                "target_class": k2,
                "target_name": names.get(CLASSES[k2], CLASSES[k2]),
                "rank_of_target": 1,
                "phrases": [_phrase("snow", 5.0, "for")],
            }
        )
        images.append({"image_id": image_id, "path": rel, "label": label, "split": "test"})
    table = pa.Table.from_pylist(out, schema=EXPLANATIONS)
    step = -(-table.num_rows // n_shards)
    for s in range(n_shards):
        pq.write_table(table.slice(s * step, step), run_dir / "explanations" / f"shard-{s:05d}.parquet")
    pq.write_table(pa.Table.from_pylist(images, schema=IMAGES), run_dir / "images.parquet")
    errors = [
        {
            "run_id": "run-test",
            "image_id": "bad1",
            "path": "cat/broken.png",
            "stage": "read",
            "reason": "cannot identify image file",
            "row": json.dumps({"path": "cat/broken.png"}),
        }
    ]
    pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS), run_dir / "errors" / "errors-00000.parquet")
    (run_dir / "config.yaml").write_text(f"dataset_root: {data_dir}\n")
    (run_dir / "summary.json").write_text(
        json.dumps(
            {"run_id": "run-test", "dataset_root": str(data_dir), "n_images": len(rows), "n_errors": 1}
        )
    )
    return run_dir


def class_text_embeddings(dim: int = 256, seed: int = 1) -> dict[str, np.ndarray]:
    """Toy "CLIP" embeddings: class names about 0.3 alike (the similarity threshold), each class's own
    phrase close to its name (about 0.95), every other phrase a random direction (|similarity| < 0.25 at
    this dimension, so it describes no class)."""
    rng = np.random.default_rng(seed)

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    texts = list(OWN.values()) + POOL + AGAINST_POOL + ["snow", "stripes"]
    emb = {t: unit(rng.normal(size=dim)) for t in texts}
    shared = unit(rng.normal(size=dim))
    for c in CLASSES:
        emb[c] = unit(0.55 * shared + 0.835 * unit(rng.normal(size=dim)))
    for c, p in OWN.items():
        emb[p] = unit(emb[c] + 0.3 * unit(rng.normal(size=dim)))
    return emb
