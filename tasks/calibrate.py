"""The channel bank and phrase embeddings for a run: loaded from cache or calibrated once.

The run directory always holds the pair it used, ``RUN_DIR/bank/bank.safetensors`` and
``RUN_DIR/bank/phrases.safetensors``; a resumed run loads them from there, so reused and recomputed
shards share one bank even when the CLIP weights are random. Across runs, banks are cached under
``CACHE_DIR/banks/<key>.safetensors`` with ``key`` = hash(model_id, layer, clip_id, probe hash, m,
shrinkage), but only when every part of that key names reproducible weights. The probe set's CLIP
embeddings and predictions (:class:`textcam.bank.ProbeSet`, for :mod:`tasks.cooccurrence`) travel with
the bank as ``probe.safetensors`` (cache: ``<key>.probe.safetensors``); a cached bank without one is
calibrated again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import AuditConfig
from tasks.explain_shard import RuntimeSpec, load_phrases, save_phrases
from tasks.rundir import PROBE_NAME, VISIBILITY_NAME, RunDir
from textcam.io import atomic_path

if TYPE_CHECKING:
    import pyarrow as pa

    from tasks.manifest import Manifest
    from textcam.bank import ChannelBank
    from textcam.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankFiles:
    bank_path: str
    phrases_path: str
    bank_id: str
    model_id: str
    layer: str
    clip_id: str
    n_phrases: int
    source: str  # "run_dir" | "cache" | "calibrated"
    seconds: float
    probe_path: str | None = None  # None: a run dir from before probe sets were kept
    visibility_path: str | None = None  # None: no probe set to fit it on

    @classmethod
    def describe(
        cls, bank: ChannelBank, bank_path: Path, phrases_path: Path, n_phrases: int, source: str, t0: float
    ) -> BankFiles:
        """The files of ``bank`` and where they came from; ``t0`` is when preparing them began."""
        probe_path = bank_path.with_name(PROBE_NAME)
        visibility = bank_path.with_name(VISIBILITY_NAME)
        if probe_path.is_file() and not visibility.is_file():
            _fit_visibility(probe_path, phrases_path, visibility)
        return cls(
            str(bank_path),
            str(phrases_path),
            bank.bank_id,
            bank.model_id,
            bank.layer,
            bank.clip_id,
            n_phrases,
            source,
            time.perf_counter() - t0,
            str(probe_path) if probe_path.is_file() else None,
            str(visibility) if visibility.is_file() else None,
        )


def _fit_visibility(probe_path: Path, phrases_path: Path, out: Path) -> None:
    """Fit the phrases' presence models on the probe images' CLIP embeddings (same CLIP as the phrases)."""
    from textcam.bank import ProbeSet
    from textcam.visibility import PhraseVisibility

    _, embeddings = load_phrases(phrases_path)
    PhraseVisibility.fit(ProbeSet.load(probe_path).embeddings, embeddings).save(out)


def bank_key(model_id: str, layer: str, clip_id: str, probe: str, m: int, shrinkage: float) -> str:
    blob = json.dumps([model_id, layer, clip_id, probe, m, shrinkage]).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def runtime_spec(cfg: AuditConfig, bank: BankFiles) -> RuntimeSpec:
    """The explainer of ``cfg`` over the run's bank; phrases checked with CLIP only when its weights
    are trained (random weights see nothing)."""
    explanation = cfg.explanation
    check = explanation.check_phrases and cfg.trained_clip
    return RuntimeSpec(
        **cfg.model_dump(include={"model", "weights", "device", "torch_threads"}),
        **explanation.model_dump(include={"method", "top_k", "n_phrases", "n_groups"}),
        bank_path=bank.bank_path,
        phrases_path=bank.phrases_path,
        visibility_path=bank.visibility_path if check else None,
        clip=cfg.clip if check else None,
        clip_pretrained=cfg.clip_pretrained if check else None,
    )


def prepare_bank(cfg: AuditConfig, probe_paths: Sequence[str], run_dir: str | os.PathLike[str]) -> BankFiles:
    """Make sure ``RUN_DIR/bank/`` holds the channel bank and the phrase embeddings for ``cfg``."""
    from textcam.bank import ChannelBank
    from textcam.models import load_model
    from textcam.vocab import load_vocabulary

    t0 = time.perf_counter()
    run = RunDir(run_dir)
    bank_path, phrases_path = run.bank_file, run.phrases_file
    device = cfg.device

    model = load_model(cfg.model, weights=cfg.weights, device=device)
    layer = cfg.layer or model.target_layer
    phrases = load_vocabulary(list(cfg.vocab))
    if bank_path.is_file() and phrases_path.is_file():
        saved, _ = load_phrases(phrases_path)
        if saved == phrases:
            bank = ChannelBank.load(bank_path, model_id=model.model_id, layer=layer)
            if not bank_path.with_name(PROBE_NAME).is_file():
                _add_probe(cfg, model, bank, probe_paths, bank_path.with_name(PROBE_NAME))
            return BankFiles.describe(bank, bank_path, phrases_path, len(phrases), "run_dir", t0)
        # A vocabulary file (or a built-in list) changed under the same config: embed the phrases
        # again, with the same CLIP as the bank (from the cache, or calibrated anew).
        log.warning("the vocabulary differs from %s: phrases are embedded again", phrases_path)

    from textcam.clip import load_clip

    clip = load_clip(cfg.clip, cfg.clip_pretrained, device=device)
    cache = cfg.resolved_cache_dir()
    bank, source = _bank_for(cfg, model, clip, layer, probe_paths, bank_path)
    embeddings = clip.encode_texts(phrases, cache_dir=cache if clip.cacheable else False)
    save_phrases(phrases_path, phrases, embeddings, clip.clip_id)
    bank_path.with_name(VISIBILITY_NAME).unlink(missing_ok=True)  # fitted for the old phrases or probe
    return BankFiles.describe(bank, bank_path, phrases_path, len(phrases), source, t0)


def _bank_for(
    cfg: AuditConfig, model: Any, clip: Any, layer: str, probe_paths: Sequence[str], bank_path: Path
) -> tuple[ChannelBank, str]:
    """The bank and its probe set in ``bank_path``'s folder: copied from the cache, or calibrated (and
    cached when model and CLIP can be identified again)."""
    from textcam.bank import ChannelBank, probe_hash

    key = bank_key(
        model.model_id,
        layer,
        clip.clip_id,
        probe_hash(probe_paths),
        cfg.calibration.bank_m,
        cfg.calibration.shrinkage,
    )
    cached = cfg.resolved_cache_dir() / "banks" / f"{key}.safetensors"
    cached_probe = cached.with_name(f"{key}.{PROBE_NAME}")
    cacheable = clip.cacheable and getattr(model, "cacheable", True)
    if cacheable and cached.is_file() and cached_probe.is_file():
        bank = ChannelBank.load(cached, model_id=model.model_id, layer=layer, clip_id=clip.clip_id)
        _copy_atomic(cached, bank_path)
        _copy_atomic(cached_probe, bank_path.with_name(PROBE_NAME))
        return bank, "cache"
    log.info(
        "calibrating a channel bank on %d probe images (%s, layer %s, %s)",
        len(probe_paths),
        model.model_id,
        layer,
        clip.clip_id,
    )
    loading = {"batch_size": cfg.batch_size, "num_workers": cfg.loader_workers, "device": cfg.device}
    bank = ChannelBank.calibrate(
        model,
        clip,
        probe_paths,
        layer=layer,
        m=cfg.calibration.bank_m,
        shrinkage=cfg.calibration.shrinkage,
        **loading,
        progress=False,
    )
    if bank.probe is None:
        raise RuntimeError("calibration kept no probe set")
    if cacheable:
        bank.save(cached)
        bank.probe.save(cached_probe)
        _copy_atomic(cached, bank_path)
        _copy_atomic(cached_probe, bank_path.with_name(PROBE_NAME))
    else:
        bank.save(bank_path)
        bank.probe.save(bank_path.with_name(PROBE_NAME))
    return bank, "calibrated"


def _add_probe(
    cfg: AuditConfig, model: LoadedModel, bank: ChannelBank, probe_paths: Sequence[str], out: Path
) -> None:
    """Give a run dir from before probe sets were kept its ``probe.safetensors``, keeping its bank.

    The probe pass is run again (the bank's directions, which its explanations used, stay as they
    are); only with the same CLIP weights and probe images as the bank, else the data check is
    left out of this run's flags (a warning says so).
    """
    from textcam.bank import ChannelBank, probe_hash
    from textcam.clip import load_clip

    clip = load_clip(cfg.clip, cfg.clip_pretrained, device=cfg.device)
    if not clip.cacheable or clip.clip_id != bank.clip_id or probe_hash(probe_paths) != bank.meta.probe_hash:
        log.warning(
            "cannot rebuild the probe set of %s (other CLIP or probe images): no data check", out.parent
        )
        return
    log.info("adding the probe set to %s (%d probe images)", out.parent, len(probe_paths))
    fresh = ChannelBank.calibrate(
        model,
        clip,
        probe_paths,
        layer=bank.layer,
        m=bank.meta.m,
        shrinkage=bank.meta.shrinkage,
        batch_size=cfg.batch_size,
        num_workers=cfg.loader_workers,
        device=cfg.device,
        progress=False,
    )
    assert fresh.probe is not None  # calibrate() always sets it
    fresh.probe.save(out)


def probe_images(cfg: AuditConfig, manifest: Manifest) -> pa.Table:
    """The calibration probe set: ``calibration.probe`` or the first ``probe_size`` audit images by
    image_id."""
    from tasks.manifest import read_manifest

    settings = cfg.calibration
    images = manifest.images if settings.probe is None else read_manifest(settings.probe).images
    return images.sort_by("image_id").slice(0, settings.probe_size)


def probe_paths(cfg: AuditConfig, manifest: Manifest) -> list[str]:
    """The probe images' paths, in calibration order."""
    return probe_images(cfg, manifest).column("path").to_pylist()
