"""Explanation and calibration speed, measured side by side in one run (ratios, not absolute times).

ResNet-50 at 224 px, batch 32, images from ../shared/imagenet-samples, CPU:
  * bare classifier forward — the reference: per round, the faster of the same model's forward under
    ``torch.inference_mode()`` and under ``torch.no_grad()`` (same input tensor, same memory layout), so
    that a ratio of 1.0 is the limit for an explanation, which contains that forward;
  * full TextCAM explanation (saliency, T_c(x), phrase selection over the 5,505-phrase general
    vocabulary, channel groups) with CAM weights and with Grad-CAM weights;
  * pytorch-grad-cam's GradCAM and torch-cam's GradCAM on the same batch and targets;
  * calibration: the probe pass vs the batched LDA for all 2048 channels vs a per-channel
    scikit-learn loop (timed on a sample of channels and extrapolated — printed as such).
Methods are interleaved round by round (the order reversed every other round) and each ratio is the
median over rounds of the ratio measured within a round, so machine noise hits all alike. Weights
are random (no downloads here); speed does not depend on them. The vocabulary's text embeddings are
a one-off cost per vocabulary (cached on disk in normal use), so they are computed once, before
any timing, and their time is reported separately.

    python bench/explain.py [--rounds 5] [--probe 256] [--quick] [--device cuda] [--images DIR]

On a GPU (``--device cuda``) every timing waits for the device (``torch.cuda.synchronize``), and the
peers run on the same device.

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "imagenet-samples"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_batch(model, paths: list[Path]) -> torch.Tensor:
    from textcam.data import read_image

    return torch.stack([model.preprocess(read_image(p)) for p in paths])


def timed(fn, *args) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--probe", type=int, default=256, help="probe images for the calibration timing")
    ap.add_argument("-m", type=int, default=50, help="positives/negatives per channel")
    ap.add_argument("--sklearn-sample", type=int, default=64, help="channels timed in the sklearn loop")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and probe images (smoke run)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    ap.add_argument(
        "--profile", action="store_true", help="print torch.profiler's top operators of one explanation"
    )
    ap.add_argument("--images", type=Path, default=SHARED, help=f"image folder (default {SHARED})")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        args.rounds, args.probe, args.sklearn_sample = 2, 128, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.images.is_dir():
        print(f"images not found at {args.images}", file=sys.stderr)
        return 2
    device = torch.device(args.device)

    from pytorch_grad_cam import GradCAM as PeerGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from torchcam.methods import GradCAM as TorchcamGradCAM

    from textcam.bank import ChannelBank, capture_gap, lda_directions, top_bottom
    from textcam.clip import load_clip
    from textcam.data import iter_batches
    from textcam.explain import Explainer
    from textcam.models import load_model
    from textcam.vocab import load_vocabulary

    torch.manual_seed(0)
    paths = sorted(p for p in args.images.iterdir() if p.is_file())
    model = load_model("resnet50", weights="none", device=device)
    module = model.module
    clip = load_clip("ViT-B-32", None, device=device)
    x = load_batch(model, paths[: args.batch]).to(device)

    # --- calibration: probe pass, then LDA ---------------------------------------------------
    probe = paths[: args.probe]
    t0 = time.perf_counter()
    gaps, embs = [], []
    with torch.no_grad(), capture_gap(module, model.target_layer, None, model.input_size) as captured:
        for batch in iter_batches(probe, [model.preprocess, clip.preprocess], batch_size=32, num_workers=2):
            module(batch.tensors[0].to(device))
            gaps.append(captured.pop().cpu())
            embs.append(clip.encode_images(batch.tensors[1].to(device)).cpu())
    probe_s = time.perf_counter() - t0
    gap, emb = torch.cat(gaps), torch.cat(embs)
    pos, neg = top_bottom(gap, args.m)
    t0 = time.perf_counter()
    directions = lda_directions(emb, pos, neg, 0.5)
    lda_s = time.perf_counter() - t0
    sample = torch.linspace(0, gap.shape[1] - 1, args.sklearn_sample).long()
    y = np.r_[np.ones(args.m), np.zeros(args.m)]
    t0 = time.perf_counter()
    for j in sample.tolist():
        xj = torch.cat([emb[pos[j]], emb[neg[j]]]).numpy()
        LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.5).fit(xj, y)
    sk_s = (time.perf_counter() - t0) / len(sample) * gap.shape[1]

    # --- explanation --------------------------------------------------------------------------
    from textcam.bank import BankMeta

    meta = BankMeta(
        model.model_id,
        model.target_layer,
        clip.clip_id,
        args.m,
        0.5,
        len(probe),
        "bench",
        directions.shape[0],
        directions.shape[1],
    )
    bank = ChannelBank(directions, meta)
    phrases = load_vocabulary(["general"])
    # One template keeps the (one-off, cached in real use) text encoding of 5,505 phrases short;
    # the number of templates changes nothing after it (the embeddings are averaged per phrase).
    t0 = time.perf_counter()
    with torch.inference_mode():
        text = clip.encode_texts(phrases, templates=("{}",), cache_dir=False)
    text_s = time.perf_counter() - t0
    ex_cam = Explainer(model, bank, phrases, text, method="cam", device=device)
    ex_grad = Explainer(model, bank, phrases, text, method="gradcam", device=device)
    with torch.no_grad():
        preds = module(x).argmax(1)
    peer = PeerGradCAM(model=module, target_layers=[module.layer4])
    peer_targets = [ClassifierOutputTarget(int(c)) for c in preds]

    def forward_no_grad() -> None:
        with torch.no_grad():
            module(x)

    def forward_inference() -> None:
        with torch.inference_mode():
            module(x)

    def torchcam() -> None:
        with TorchcamGradCAM(module, target_layer="layer4") as extractor:
            scores = module(x)
            extractor(preds.tolist(), scores)

    runs = {
        "forward_no_grad": forward_no_grad,
        "forward_inference": forward_inference,
        "textcam_cam": lambda: ex_cam.explain_batch(x),
        "textcam_gradcam": lambda: ex_grad.explain_batch(x),
        # the tensors alone (no per-image records): what the records cost is the difference
        "textcam_gradcam_tensors": lambda: ex_grad.explain_tensors(x),
        "peer_gradcam": lambda: peer(input_tensor=x, targets=peer_targets),
        "torchcam_gradcam": torchcam,
    }
    # First call of each (after one process warm-up forward, which no method should be charged for):
    # what a one-off run pays on top of the warm figures.
    forward_no_grad()
    cold = {k: timed(fn) for k, fn in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.rounds):
        # Reversing the order every other round evens out any drift within a round.
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(runs[name]))
    # The reference is the fastest bare forward of each round.
    times["forward"] = [
        min(a, b) for a, b in zip(times["forward_no_grad"], times["forward_inference"], strict=True)
    ]
    cold["forward"] = min(cold["forward_no_grad"], cold["forward_inference"])
    med = {k: statistics.median(v) for k, v in times.items()}
    thr = {k: args.batch / v for k, v in med.items()}

    def ratio(fast: str, slow: str) -> float:
        # Throughput of `fast` over `slow`, paired within each round, median over rounds.
        return statistics.median(s / f for f, s in zip(times[fast], times[slow], strict=True))

    fig = {
        "reference": "fastest of inference_mode / no_grad forward, per round",
        "inference_vs_no_grad_forward": ratio("forward_inference", "forward_no_grad"),
        "cold_cam_vs_forward": cold["forward"] / cold["textcam_cam"],
        "cold_gradcam_vs_forward": cold["forward"] / cold["textcam_gradcam"],
        "cam_vs_forward": ratio("textcam_cam", "forward"),
        "gradcam_vs_forward": ratio("textcam_gradcam", "forward"),
        "gradcam_tensors_vs_forward": ratio("textcam_gradcam_tensors", "forward"),
        "gradcam_vs_peer": ratio("textcam_gradcam", "peer_gradcam"),
        "gradcam_vs_torchcam": ratio("textcam_gradcam", "torchcam_gradcam"),
        "peer_vs_forward": ratio("peer_gradcam", "forward"),
        "torchcam_vs_forward": ratio("torchcam_gradcam", "forward"),
        "lda_share_of_probe_pass": lda_s / probe_s,
        "lda_vs_sklearn_loop": sk_s / lda_s,
        "lda_seconds_2048": lda_s,
        "probe_pass_seconds": probe_s,
        "probe_images": len(probe),
        "sklearn_loop_seconds_extrapolated": sk_s,
        "sklearn_channels_timed": len(sample),
        "vocabulary_size": len(phrases),
        "text_encoding_seconds_one_off": text_s,
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_rss_mb": peak_rss_mb(),
        "bench_seconds": time.perf_counter() - started,
    }
    print(
        f"ResNet-50, 224 px, batch {args.batch}, {fig['device']} ({torch.get_num_threads()} CPU threads), "
        f"{args.rounds} interleaved rounds, median"
    )
    print(f"{'run':<22}{'s/batch':>10}{'img/s':>10}{'vs forward':>12}{'cold s':>10}{'cold vs fwd':>13}")
    for k in ["forward", *runs]:
        print(
            f"{k:<22}{med[k]:>10.3f}{thr[k]:>10.1f}{ratio(k, 'forward'):>12.2f}"
            f"{cold[k]:>10.3f}{cold['forward'] / cold[k]:>13.2f}"
        )
    print(
        f"(vs forward: per-round throughput ratio, median of {args.rounds}; phrase selection over "
        f"{len(phrases)} phrases, whose text embeddings took {text_s:.0f} s once, before timing)"
    )
    print(
        f"\nGrad-CAM explanation vs pytorch-grad-cam: {fig['gradcam_vs_peer']:.2f}x, "
        f"vs torch-cam: {fig['gradcam_vs_torchcam']:.2f}x"
    )
    print(
        f"calibration: probe pass {probe_s:.1f} s ({len(probe)} images, ResNet-50 + ViT-B-32); "
        f"batched LDA for {gap.shape[1]} channels {lda_s:.2f} s = "
        f"{100 * fig['lda_share_of_probe_pass']:.1f}% of the probe pass"
    )
    print(
        f"per-channel scikit-learn loop: {sk_s:.1f} s extrapolated from {len(sample)} channels "
        f"-> batched LDA is {fig['lda_vs_sklearn_loop']:.0f}x faster"
    )
    print(f"peak RSS {fig['peak_rss_mb']:.0f} MB (calibration keeps only N x C GAP and N x D embeddings)")
    if args.profile:
        _profile(lambda: ex_grad.explain_batch(x), device)
    print(json.dumps(fig))
    return 0


def _profile(fn, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
