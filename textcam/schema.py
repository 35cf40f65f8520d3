"""Arrow schemas for every table TextCAM writes, declared once.

The Parquet writers, the Great Expectations suites and the DuckDB views are all built from these
declarations, so a column cannot drift between them.
"""

from __future__ import annotations

import json

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
        # seen: CLIP sees it in the image, whatever its weight ("for" phrases; null: not checked or a file
        # written before the field existed)
        pa.field("seen", pa.bool_(), nullable=True),
    ]
)

#: A phrase among the ones nearest T_c⁺(x) (cosine), whether or not the sparse code selected it.
NEAR_PHRASE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("cosine", pa.float32(), nullable=False),
        # seen: CLIP sees it in the image (null: not checked)
        pa.field("seen", pa.bool_(), nullable=True),
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
        # the explanation's n phrases nearest T_c⁺(x); null in files written before version 4
        pa.field("nearest", pa.list_(NEAR_PHRASE), nullable=True),
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
    metadata={"table": "explanations", "version": "4"},
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


def error_row(run_id: str, image_id: str, path: str, stage: str, reason: str, row: str | dict) -> dict:
    """One ERRORS row; ``row`` is the manifest row (a mapping, or already its JSON text)."""
    text = row if isinstance(row, str) else json.dumps(row)
    return {
        "run_id": run_id,
        "image_id": image_id,
        "path": path,
        "stage": stage,
        "reason": reason,
        "row": text,
    }


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


#: The key of every per class × phrase × direction table.
_CLASS_PHRASE = [
    pa.field("class_name", pa.string(), nullable=False),
    pa.field("class_index", pa.int32(), nullable=False),
    pa.field("phrase", pa.string(), nullable=False),
    pa.field("direction", pa.string(), nullable=False),
]


#: How often CLIP sees each phrase in a probe image (the DuckDB table ``phrase_base_rate``).
PHRASE_BASE_RATE = pa.schema(
    [pa.field("phrase", pa.string(), nullable=False), pa.field("rate", pa.float64(), nullable=False)],
    metadata={"table": "phrase_base_rate", "version": "1"},
)


#: One-sided 0.001: a phrase's presence must go with its weight beyond this r·√n (or its rate beyond the
#: base rate by this binomial z) to be shown; ``phrase_specificity.specific`` and its numpy reference use it.
SPECIFIC_Z = 3.09

#: Is a "for" phrase about the image or about the class? Per class × phrase, over the explanations of
#: the class that weigh it at least half their first phrase: how often CLIP sees it there, the
#: correlation of seeing it with its weight, and how often CLIP sees it in any probe image (the DuckDB
#: table ``phrase_specificity``; the rule is :func:`textcam.visibility.specific_among_strong`).
PHRASE_SPECIFICITY = pa.schema(
    [
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("n_strong", pa.int64(), nullable=False),
        pa.field("n_seen", pa.int64(), nullable=False),
        pa.field("r", pa.float64(), nullable=True),  # null: seeing it or its weight does not vary
        # share of the probe images in which CLIP sees the phrase; null: no visibility model
        pa.field("base_rate", pa.float64(), nullable=True),
        pa.field("specific", pa.bool_(), nullable=False),
    ],
    metadata={"table": "phrase_specificity", "version": "1"},
)


#: Per class × phrase × direction statistics (the DuckDB table ``concept_stats``).
CONCEPT_STATS = pa.schema(
    [
        *_CLASS_PHRASE,
        pa.field("n_class", pa.int64(), nullable=False),  # images predicted as the class
        pa.field("n_images", pa.int64(), nullable=False),  # ... whose explanation selected the phrase
        pa.field("frequency", pa.float64(), nullable=False),  # n_images / n_class
        pa.field("frequency_other", pa.float64(), nullable=True),  # same share among other classes' images
        pa.field("mean_score", pa.float64(), nullable=False),  # mean s(x, p) over the class, 0 if unselected
        pa.field("mean_score_selected", pa.float64(), nullable=True),  # mean over images that selected it
        pa.field("mean_score_other", pa.float64(), nullable=True),
        # mean_score / the class's largest mean_score in this direction (1 = the class's main phrase)
        pa.field("relative_score", pa.float64(), nullable=True),
        pa.field("lift", pa.float64(), nullable=True),  # standard units of the phrase's score
        pa.field("z_lift", pa.float64(), nullable=True),  # lift standardised within class × direction
        pa.field("n_misclassified", pa.int64(), nullable=False),  # labelled, predicted c, label != c
        pa.field("n_correct", pa.int64(), nullable=False),
        pa.field("frequency_misclassified", pa.float64(), nullable=True),
        pa.field("frequency_correct", pa.float64(), nullable=True),
    ],
    metadata={"table": "concept_stats", "version": "2"},
)


#: Does the phrase name a class of the task: CLIP text similarity to the nearest class (name or
#: vocabulary) and its cut-off; phi between where CLIP sees the phrase and a text-close class name in the
#: probe. Null: not measured.
_NAMES_A_CLASS = [
    pa.field("class_similarity", pa.float64(), nullable=True),
    pa.field("similarity_threshold", pa.float64(), nullable=True),
    pa.field("class_agreement", pa.float64(), nullable=True),
]
#: What the model does (tasks.behaviour); null when the run has no probe behaviour.
_MODEL_TEST = [
    pa.field("z_model", pa.float64(), nullable=True),
    pa.field("effect", pa.float64(), nullable=True),
    pa.field("model_threshold", pa.float64(), nullable=True),
    # how much more often CLIP sees the phrase in the class's training images than in the others', in the
    # flag's direction (tasks.training_data); null: no training data given
    pa.field("data_correlation", pa.float64(), nullable=True),
]


#: One row per flagged class × phrase × direction (``RUN_DIR/flags.parquet`` and the DuckDB table ``flags``).
FLAGS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 1 = strongest flag of the class
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),  # "for" | "against"
        # null where no explanation selected the phrase (a model-test flag) or its score never varies
        pa.field("z_lift", pa.float64(), nullable=True),
        pa.field("lift", pa.float64(), nullable=True),
        pa.field("threshold", pa.float64(), nullable=False),  # the class's null 99th percentile
        pa.field("p_value", pa.float64(), nullable=False),
        pa.field("n_permutations", pa.int32(), nullable=False),
        pa.field("n_class", pa.int64(), nullable=False),
        pa.field("n_images", pa.int64(), nullable=False),
        pa.field("frequency", pa.float64(), nullable=False),
        pa.field("frequency_other", pa.float64(), nullable=True),
        *_NAMES_A_CLASS,
        # the phrase in the probe images predicted as the class (tasks.cooccurrence); null: unknown
        pa.field("n_probe_class", pa.int64(), nullable=True),
        pa.field("data_lift", pa.float64(), nullable=True),
        pa.field("data_z", pa.float64(), nullable=True),
        pa.field("data_threshold", pa.float64(), nullable=True),
        pa.field("n_misclassified", pa.int64(), nullable=False),
        pa.field("frequency_misclassified", pa.float64(), nullable=True),
        pa.field("frequency_correct", pa.float64(), nullable=True),
        # (k_mis + .5)/(n_mis + 1) ÷ (k_cor + .5)/(n_cor + 1); null without misclassified images
        pa.field("misclassified_enrichment", pa.float64(), nullable=True),
        pa.field("example_image_ids", pa.list_(pa.string()), nullable=False),  # top-scoring first
        *_MODEL_TEST,
        pa.field("step", pa.int32(), nullable=True),
        pa.field("given", pa.string(), nullable=True),
        # where CLIP sees the phrase it also sees these ("not …": does not), |phi| ≥ the proxy bound, most
        # alike first: the same concept under other names (tasks.behaviour); null in files before version 7
        pa.field("aliases", pa.list_(pa.string()), nullable=True),
    ],
    metadata={"table": "flags", "version": "7"},
)


#: Every class's strongest candidates, flagged or not, and the rule that decided (``flag_candidates``).
FLAG_CANDIDATES = pa.schema(
    [
        *_CLASS_PHRASE,
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("frequency", pa.float64(), nullable=True),
        pa.field("frequency_other", pa.float64(), nullable=True),
        pa.field("lift", pa.float64(), nullable=True),
        pa.field("z_lift", pa.float64(), nullable=True),
        pa.field("z_first", pa.float64(), nullable=True),
        pa.field("effect_first", pa.float64(), nullable=True),
        *_MODEL_TEST,
        pa.field("min_effect", pa.float64(), nullable=True),
        pa.field("given", pa.string(), nullable=True),
        *_NAMES_A_CLASS,
    ],
    metadata={"table": "flag_candidates", "version": "3"},
)


INTERVENTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # "mean" | "zero" | "erase" (a refit: no channel)
        # a new last layer balanced by the concept (figures cross-fitted on the probe images)
        pa.field("refit", pa.bool_(), nullable=False),
        pa.field("n_channels", pa.int32(), nullable=False),
        pa.field("channels", pa.list_(pa.int32()), nullable=False),
        pa.field("null_threshold", pa.float64(), nullable=False),
        pa.field("expected_by_chance", pa.float64(), nullable=False),
        pa.field("n_images", pa.int64(), nullable=False),  # labelled probe images evaluated
        # ... of the class without the phrase: what the bias-conflicting accuracy is measured on and
        # a refit learns the class without the cue from (null: no labelled image)
        pa.field("n_conflicting", pa.int64(), nullable=True),
        pa.field("accuracy_before", pa.float64(), nullable=True),
        pa.field("accuracy_after", pa.float64(), nullable=True),
        pa.field("conflicting_before", pa.float64(), nullable=True),  # the class, concept absent
        pa.field("conflicting_after", pa.float64(), nullable=True),
        pa.field("worst_group_before", pa.float64(), nullable=True),
        pa.field("worst_group_after", pa.float64(), nullable=True),
        # as many random channels; for a refit, the refit balanced by random non-class phrases
        pa.field("random_conflicting_after", pa.float64(), nullable=True),
        # P(called the class | concept) - P(called the class | no concept): the shortcut itself
        pa.field("reliance_before", pa.float64(), nullable=True),
        pa.field("reliance_after", pa.float64(), nullable=True),
        pa.field("random_reliance_after", pa.float64(), nullable=True),
        pa.field("checkpoint", pa.string(), nullable=False),
    ],
    metadata={"table": "interventions", "version": "3"},
)


#: One row per flag present in either run.
COMPARISON = pa.schema(
    [
        pa.field("status", pa.string(), nullable=False),  # appeared | vanished | changed | same
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),
        pa.field("z_lift_a", pa.float64(), nullable=True),
        pa.field("z_lift_b", pa.float64(), nullable=True),
        pa.field("delta_z", pa.float64(), nullable=True),
        pa.field("rank_a", pa.int32(), nullable=True),
        pa.field("rank_b", pa.int32(), nullable=True),
        pa.field("p_value_a", pa.float64(), nullable=True),
        pa.field("p_value_b", pa.float64(), nullable=True),
        pa.field("frequency_a", pa.float64(), nullable=True),
        pa.field("frequency_b", pa.float64(), nullable=True),
    ],
    metadata={"table": "flag_comparison", "version": "1"},
)
