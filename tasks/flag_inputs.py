"""What :func:`tasks.flags.flag_spurious` needs from an audit run: the class names' and phrases' CLIP text
embeddings, how visible each phrase is in each class's probe images, and the classifier's behaviour on the
probe set. Read from the run's bank files and config; None where the run cannot provide it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from tasks.calibrate import BankFiles, probe_images
from tasks.config import AuditConfig
from tasks.manifest import Manifest

log = logging.getLogger(__name__)


def flag_run(cfg: AuditConfig, run_dir: str, manifest: Manifest, bank: BankFiles | None) -> pd.DataFrame:
    """The run's flags (written to ``flags.parquet`` and the run's DuckDB)."""
    from tasks.flags import flag_spurious

    seen = behaviour(cfg, manifest, bank)
    return flag_spurious(
        run_dir,
        class_text(cfg, run_dir, bank),
        cooccurrence(bank),
        behaviour=seen,
        rule=cfg.flags,
        correlation=training_correlation(cfg, bank) if seen is not None else None,
    )


def _probe(bank: BankFiles | None, purpose: str) -> Any:
    """The probe set kept with the bank, if it was embedded by the bank's CLIP."""
    from textcam.bank import ProbeSet

    if bank is None or bank.probe_path is None:
        return None
    probe = ProbeSet.load(bank.probe_path)
    if probe.clip_id != bank.clip_id:  # not the CLIP the phrases were embedded with
        log.warning("probe set %s is from another CLIP: no %s", bank.probe_path, purpose)
        return None
    return probe


def cooccurrence(bank: BankFiles | None) -> pd.DataFrame | None:
    """How visible each phrase is in the probe images of each predicted class (None: no probe set kept)."""
    from tasks.cooccurrence import cooccurrence as visible_per_class
    from tasks.explain_shard import load_phrases

    probe = _probe(bank, "data check")
    if probe is None:
        return None
    phrases, embeddings = load_phrases(bank.phrases_path)
    return visible_per_class(probe, phrases, embeddings)


#: probe accuracy from which the behaviour evidence is too thin to trust a quiet audit (a notice only)
MEMORISED = 0.99


def behaviour(cfg: AuditConfig, manifest: Manifest, bank: BankFiles | None) -> Any:
    """What CLIP sees in each probe image, with the classifier's prediction and the true label where the
    manifest has one (:mod:`tasks.behaviour`); None without a probe set or with random CLIP weights."""
    from tasks.behaviour import probe_behaviour
    from tasks.explain_shard import load_phrases
    from textcam.clip import load_clip
    from textcam.models import load_model

    if not cfg.trained_clip:
        return None  # random CLIP weights see nothing: no behaviour evidence
    probe = _probe(bank, "behaviour evidence")
    if probe is None:
        return None
    phrases, embeddings = load_phrases(bank.phrases_path)
    names = load_model(cfg.model, weights=cfg.weights, device="cpu").class_names
    index = {n: i for i, n in enumerate(names)}
    column = probe_images(cfg, manifest).column("label").to_pylist()
    labels = [index.get(str(v), -1) if v is not None else -1 for v in column]
    known = np.asarray(labels, dtype=np.int64)[probe.indices.numpy()]
    clip = load_clip(cfg.clip, cfg.clip_pretrained, device=cfg.device)
    class_embeddings = clip.encode_texts(
        list(names), cache_dir=cfg.resolved_cache_dir() if clip.cacheable else False
    )
    seen = probe_behaviour(
        probe.embeddings,
        probe.predictions,
        phrases,
        embeddings,
        known if (known >= 0).any() else None,
        class_embeddings=class_embeddings.cpu().to(probe.embeddings.dtype),
    )
    warn_if_memorised(cfg, seen)
    return seen


def training_images(cfg: AuditConfig) -> Any:
    """The first ``flags.training_size`` images of ``flags.training_data`` by image_id (a pyarrow table);
    refused when none has a label. The flow reads them before explaining, so a bad path fails early."""
    from tasks.config import ConfigError
    from tasks.manifest import read_manifest

    source = cfg.flags.training_data
    images = read_manifest(source).images.sort_by("image_id").slice(0, cfg.flags.training_size)
    if images.column("label").null_count == images.num_rows:
        raise ConfigError(
            f"flags.training_data {source}: no image has a label; the data check needs labelled training "
            "images (a class-per-folder tree or a label column)"
        )
    return images


def training_correlation(cfg: AuditConfig, bank: BankFiles | None) -> np.ndarray | None:
    """How each phrase goes with each class in ``flags.training_data`` (:mod:`tasks.training_data`);
    None when none is given."""
    from tasks.config import ConfigError
    from tasks.explain_shard import load_phrases
    from tasks.training_data import training_correlation as correlate
    from textcam.clip import load_clip
    from textcam.models import load_model
    from textcam.visibility import PhraseVisibility

    if cfg.flags.training_data is None or bank is None:
        return None
    images = training_images(cfg)
    names = load_model(cfg.model, weights=cfg.weights, device="cpu").class_names
    index = {n: i for i, n in enumerate(names)}
    labels = np.asarray([index.get(str(v), -1) for v in images.column("label").to_pylist()], dtype=np.int64)
    if not (labels >= 0).any():
        raise ConfigError(
            f"flags.training_data {cfg.flags.training_data}: no label is one of the model's {len(names)} "
            f"classes (e.g. {names[:3]})"
        )
    _, embeddings = load_phrases(bank.phrases_path)
    clip = load_clip(cfg.clip, cfg.clip_pretrained, device=cfg.device)
    # the probe's call of presence, the one the flags' effects were measured with
    probe_call = PhraseVisibility.load(bank.visibility_path) if bank.visibility_path else None
    paths = images.column("path").to_pylist()
    return correlate(paths, labels, len(names), clip, embeddings, visibility=probe_call)


def warn_if_memorised(cfg: AuditConfig, seen: Any) -> bool:
    """Warn (and say so) when the probe is drawn from the audited data and the model predicts its labels
    almost perfectly; an accurate model on a separate probe is no news."""
    accuracy = seen.label_accuracy()
    if cfg.calibration.probe is not None or accuracy is None or accuracy < MEMORISED:
        return False
    log.warning(
        "the model predicts the label of %.1f%% of the audited images the probe was drawn from (its "
        "training data?): within a label its predictions hardly vary, so the flags can show little of "
        "what it relies on; a held-out probe (calibration.probe) shows more%s",
        100 * accuracy,
        ""
        if cfg.flags.probe_seen_in_training
        else ", and if these are its training images, "
        "flags.probe_seen_in_training lets what the explanations name pass on a smaller effect",
    )
    return True


def class_text(cfg: AuditConfig, run_dir: str, bank: BankFiles | None) -> Any:
    """CLIP text embeddings of the phrases (saved with the bank) and the predicted class names.

    The class names are encoded here, only those predicted in the run. With random CLIP weights a new
    process cannot reproduce the CLIP the phrases were embedded with, so the similarity test is switched
    off (``None``) rather than computed against an unrelated embedding space.
    """
    from tasks.explain_shard import load_text_embeddings
    from tasks.flags import ClassText
    from tasks.store import query
    from textcam.clip import load_clip

    if bank is None:  # nothing was explained: no phrases to judge
        return None
    if not cfg.trained_clip:
        log.warning("random CLIP weights: phrases that describe their class are not excluded")
        return None
    names = query(run_dir, "SELECT DISTINCT pred_name FROM explanations ORDER BY 1")["pred_name"].tolist()
    embeddings = {text: emb.numpy() for text, emb in load_text_embeddings(bank.phrases_path).items()}
    if names:
        clip = load_clip(cfg.clip, cfg.clip_pretrained, device=cfg.device)
        encoded = clip.encode_texts(names, cache_dir=cfg.resolved_cache_dir() if clip.cacheable else False)
        embeddings.update(zip(names, encoded.cpu().numpy(), strict=True))
    return ClassText(embeddings=embeddings)
