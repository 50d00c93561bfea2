"""ADM's evaluator in PyTorch: Inception Score, FID, sFID, precision and recall of a sample batch
against a reference batch, both ADM-style .npz files (`arr_0`: uint8 N x H x W x 3).

    python -m evaluations.evaluator VIRTUAL_imagenet256_labeled.npz samples.npz
    python -m evaluations.evaluator digits_ref.npz samples.npz --features digits
    python -m evaluations.evaluator shapes_ref.npz samples.npz --features shapes --classifier other.pt

The small-data modes read the dataset's shipped network in assets/ unless --classifier names another; the
output names the network by its file's sha256, and says when it is not the shipped one.

A reference batch's stored mu/sigma/mu_s/sigma_s are used when present (its images still give the
precision/recall manifold); otherwise they are computed once and cached next to it as REF.stats.npz.
"""
import argparse
import contextlib
import os
import sys
import warnings

import numpy as np
import torch
from tqdm import tqdm

from .small import DATASETS, load_small_features, network_name
from .inception import load_inception
from .metrics import (frechet_distance, gaussian_statistics, inception_score, kernel_inception_distance,
                      precision_recall, softmax)
from .npz import open_images, stored_statistics

K_NEAREST = 3
LABELS = {"is": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision", "recall": "Recall",
          "kid": "KID"}


@contextlib.contextmanager
def full_fp32(device):
    """No TF32 on a GPU: ADM's features and distances are plain float32."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def extract_features(images, net, batch_size, device, progress=True, desc="features"):
    """Run `net` over the images batch by batch -> {output name: (N, D) float32 array}."""
    outputs = {}
    total = -(-images.shape[0] // batch_size)
    with torch.inference_mode():
        for batch in tqdm(images.batches(batch_size), total=total, desc=desc, disable=not progress):
            x = torch.tensor(batch, device=device).permute(0, 3, 1, 2).float()
            for name, value in net(x).items():
                outputs.setdefault(name, []).append(value.float().cpu().numpy())
    return {name: np.concatenate(values) for name, values in outputs.items()}


def statistics(acts):
    """The reference quantities the metrics need: pool features, mu/sigma and (Inception) mu_s/sigma_s."""
    stats = {"pool": acts["pool"]}
    stats["mu"], stats["sigma"] = gaussian_statistics(acts["pool"])
    if "spatial" in acts:
        stats["mu_s"], stats["sigma_s"] = gaussian_statistics(acts["spatial"])
    return stats


def stats_cache_path(ref_path):
    return os.path.splitext(ref_path)[0] + ".stats.npz"


def load_cached_statistics(ref_path, weights_sha256):
    """The cached Inception statistics of a reference file, if newer than it and from the same weights."""
    cache = stats_cache_path(ref_path)
    if not os.path.exists(cache) or os.path.getmtime(cache) < os.path.getmtime(ref_path):
        return None
    with np.load(cache) as f:
        if str(f["weights_sha256"]) != weights_sha256:
            return None
        return {k: f[k] for k in f.files if k != "weights_sha256"}


def save_cached_statistics(ref_path, weights_sha256, stats):
    cache = stats_cache_path(ref_path)
    tmp = f"{cache}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, weights_sha256=weights_sha256, **stats)
        os.replace(tmp, cache)
    except OSError as e:
        warnings.warn(f"could not cache reference statistics at {cache}: {e}")


def inception_reference(ref, net, batch_size, device, progress):
    stats = load_cached_statistics(ref.path, net.weights_sha256) if ref.path else None
    if stats is None:
        stats = statistics(extract_features(ref, net, batch_size, device, progress, "reference"))
        if ref.path:
            save_cached_statistics(ref.path, net.weights_sha256, stats)
    if ref.path:
        stats.update(stored_statistics(ref.path))  # ADM's precomputed statistics take precedence
    return stats


def check_inputs(ref, samples, features):
    """Every error that can be found without running a network."""
    if features != "inception" and features not in DATASETS:
        raise ValueError(f"features must be 'inception' or one of {', '.join(map(repr, DATASETS))}, got {features!r}")
    if ref.shape[1:3] != samples.shape[1:3]:
        raise ValueError(f"resolution mismatch: reference images are {ref.shape[1]}x{ref.shape[2]}, "
                         f"samples are {samples.shape[1]}x{samples.shape[2]}")
    for images in (ref, samples):
        if images.shape[0] <= K_NEAREST:
            raise ValueError(f"{images.name}: {images.shape[0]} images; precision/recall needs more than {K_NEAREST}")
    if features in DATASETS:
        size = DATASETS[features].image_size
        if samples.shape[1:3] != (size, size):
            raise ValueError(f"{features} features need {size}x{size} images, got "
                             f"{samples.shape[1]}x{samples.shape[2]}")


def feature_network(features, inception_weights, classifier, device):
    """The network whose features the metrics read, with `weights_sha256`: Inception, or the dataset's classifier."""
    if features == "inception":
        return load_inception(inception_weights, device)
    return load_small_features(classifier, features, device)


def reference_statistics(ref, net, features, batch_size, device, progress):
    if features == "inception":
        return inception_reference(ref, net, batch_size, device, progress)
    return statistics(extract_features(ref, net, batch_size, device, progress, "reference"))


def metrics_of(acts, ref_stats, device):
    """{"is", "fid", "sfid" (with spatial features), "precision", "recall", "kid"} of sample features."""
    precision, recall = precision_recall(ref_stats["pool"], acts["pool"], K_NEAREST, device=device)
    sample_stats = statistics(acts)
    results = {"is": inception_score(softmax(acts["logits"]))}
    for name, mu, sigma in [("fid", "mu", "sigma"), ("sfid", "mu_s", "sigma_s")]:
        if mu in sample_stats:  # no spatial statistics (sFID) in the small-data modes
            results[name] = frechet_distance(sample_stats[mu], sample_stats[sigma], ref_stats[mu], ref_stats[sigma])
    return {**results, "precision": precision, "recall": recall,
            "kid": kernel_inception_distance(acts["pool"], ref_stats["pool"])}


def evaluate(ref, samples, features="inception", inception_weights=None, classifier=None,
             batch_size=250, device=None, progress=True, return_features=False):
    """Metrics of `samples` against `ref` (each an .npz path or a uint8 N x H x W x 3 array) ->
    {"is", "fid", "sfid", "precision", "recall", "kid"}; with features="digits", "shapes" or "shapes-text" that
    dataset's classifier at `classifier` (default: the shipped one) replaces Inception and there is no "sfid".
    With `return_features`, also the samples' pool features (N, D) and the reference statistics, for paired
    comparisons."""
    ref, samples = open_images(ref, "reference"), open_images(samples, "samples")
    check_inputs(ref, samples, features)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with full_fp32(device):
        net = feature_network(features, inception_weights, classifier, device)
        ref_stats = reference_statistics(ref, net, features, batch_size, device, progress)
        acts = extract_features(samples, net, batch_size, device, progress, "samples")
        results = metrics_of(acts, ref_stats, device)
    return (results, acts["pool"], ref_stats) if return_features else results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", help="reference .npz (arr_0 images; optionally mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_batch", help="sample .npz (arr_0 images)")
    parser.add_argument("--features", choices=["inception", *DATASETS], default="inception",
                        help="digits, shapes, shapes-text: the small-data modes; FID, precision/recall and the "
                             "Inception Score use that dataset's classifier, and sFID (no spatial features) is not "
                             "printed")
    parser.add_argument("--inception-weights", help="pytorch-fid's weight file (default: downloaded and cached)")
    parser.add_argument("--classifier", help="another small-data classifier state dict than the shipped one "
                                             "(trained and saved here if missing)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.ref_batch, args.sample_batch, args.features, args.inception_weights,
                           args.classifier, args.batch_size, args.device)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.features in DATASETS:
        print(f"Features: {network_name(args.classifier, args.features)}")
        print(f"{args.features} features: no sFID; the Inception Score is the {args.features} classifier's",
              file=sys.stderr)
    for key, label in LABELS.items():
        if key in results:
            print(f"{label}: {results[key]}")


if __name__ == "__main__":
    main()
