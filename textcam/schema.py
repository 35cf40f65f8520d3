"""Arrow schemas for every table TextCAM writes, declared once.

The Parquet writers, the Great Expectations suites and the DuckDB views are all built from these
declarations, so a column cannot drift between them.
"""

from __future__ import annotations

import pyarrow as pa

PHRASE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        # "for": evidence for the target class (positive contributions); "against": negative ones.
        pa.field("direction", pa.string(), nullable=False),
        # shown: CLIP sees it in the image and it weighs >= half the first phrase (textcam.visibility);
        # null: not checked
        pa.field("shown", pa.bool_(), nullable=True),
    ]
)

GROUP = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("share", pa.float32(), nullable=False),
        pa.field("n_channels", pa.int32(), nullable=False),
        pa.field("map", pa.list_(pa.float16()), nullable=False),
    ]
)

TOPK = pa.struct(
    [
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("prob", pa.float32(), nullable=False),
    ]
)

#: One row per image × explained class.
EXPLANATIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("pred", pa.int32(), nullable=False),
        pa.field("pred_name", pa.string(), nullable=False),
        pa.field("prob", pa.float32(), nullable=False),
        pa.field("topk", pa.list_(TOPK), nullable=False),
        pa.field("target_class", pa.int32(), nullable=False),
        pa.field("target_name", pa.string(), nullable=False),
        pa.field("rank_of_target", pa.int32(), nullable=False),
        pa.field("phrases", pa.list_(PHRASE), nullable=False),
        pa.field("groups", pa.list_(GROUP), nullable=False),
        pa.field("saliency", pa.list_(pa.float16()), nullable=False),
        pa.field("map_h", pa.int32(), nullable=False),
        pa.field("map_w", pa.int32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("bank_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
    ],
    metadata={"table": "explanations", "version": "2"},
)

#: Every input row that could not be explained, with the stage and a one-line reason.
ERRORS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("row", pa.string(), nullable=False),  # the manifest row as JSON
    ],
    metadata={"table": "errors", "version": "1"},
)

#: The manifest after validation: one row per input image; extra metadata columns follow these.
IMAGES = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("split", pa.string(), nullable=True),
    ],
    metadata={"table": "images", "version": "1"},
)
