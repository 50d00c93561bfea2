"""Paired comparison of sample sets drawn from the same noise and labels (sample_ddp.py with the same
--global-seed and --labels, from different models): FID, sFID, Inception Score, precision and recall of
each against a reference batch, and for each pair the difference with a 95% paired bootstrap interval over
samples (every resample draws the same sample indices in every set, so the noise both sets share cancels).

    python -m evaluations.compare VIRTUAL_imagenet256_labeled.npz teacher.npz n0.npz ard.npz
    python -m evaluations.compare digits_ref.npz a.npz b.npz --features digits

Each set's `settings` (what sample_ddp.py records: global_seed, labels, noise_stream) and labels (arr_1)
must agree, or the sets are refused; a set without `settings` is refused unless --unverified-pairing.
Each set's per-sample features are cached beside it (A.npz -> A.features.<network>.npz, keyed by the feature
network's sha256 and the .npz's own), so comparing another model costs one feature pass. Precision and
recall resample with the k-NN balls of the whole sets; the resampled FIDs keep the reference fixed, and the
FIDs are computed as theirs (an eigenvalue problem where ADM's evaluator takes a matrix root: the same to
about 1e-8 relative).
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np
import torch

from utils import save_npz, sha256_of

from .evaluator import K_NEAREST, check_inputs, extract_features, feature_network, full_fp32, reference_statistics
from .inception import WEIGHTS_NAME
from .metrics import (ball_coverage, bootstrap_multiplicities, resampled_fids, resampled_inception_scores,
                      resampled_precision_recall, softmax, verdict)
from .npz import open_images
from .small import DATASETS, network_name

PAIRING_KEYS = ("global_seed", "labels", "noise_stream")
LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "precision", "recall": "recall"}
FRECHET = (("fid", "mu", "sigma", "pool"), ("sfid", "mu_s", "sigma_s", "spatial"))  # metric, statistics, features


def read_pairing(path):
    """(settings dict or None, labels or None) of a sample set."""
    with np.load(path) as f:
        settings = json.loads(str(f["settings"])) if "settings" in f.files else None
        return settings, f["arr_1"] if "arr_1" in f.files else None


def pairing_mismatch(first, other):
    """The first difference between two sets' noise and labels, in words (None if they pair)."""
    (settings, labels), (other_settings, other_labels) = read_pairing(first), read_pairing(other)
    for key in PAIRING_KEYS:
        if settings is not None and other_settings is not None and settings.get(key) != other_settings.get(key):
            return f"{other} has {key} {other_settings.get(key)!r}, {first} {settings.get(key)!r}"
    if (labels is None) != (other_labels is None):
        return f"{first if labels is None else other} has no labels (arr_1), the other set has"
    if labels is not None:
        if labels.shape != other_labels.shape:
            return f"{other} has labels of shape {other_labels.shape}, {first} {labels.shape}"
        differ = np.flatnonzero(labels != other_labels)
        if len(differ):
            i = differ[0]
            return f"{other} has label {other_labels[i]} at sample {i}, {first} {labels[i]}"
    return None


def check_sets(ref, paths, features, accept_unverified):
    """Every refusal that needs no network: each set against the reference, then each against the first."""
    sets = [open_images(path) for path in paths]
    for images in sets:
        check_inputs(ref, images, features)
        if images.shape[0] != sets[0].shape[0]:
            raise ValueError(f"{images.path} has {images.shape[0]} samples, {paths[0]} {sets[0].shape[0]}")
    for path in paths:
        if not accept_unverified and read_pairing(path)[0] is None:
            raise ValueError(f"{path} records no settings (sample_ddp.py's seed, labels and noise stream): its "
                             "pairing cannot be checked; pass --unverified-pairing to compare it anyway")
    for path in paths[1:]:
        mismatch = pairing_mismatch(paths[0], path)
        if mismatch:
            raise ValueError(f"not drawn from the same noise and labels: {mismatch}")
    return sets


def cache_path(path, network_sha256):
    return f"{os.path.splitext(path)[0]}.features.{network_sha256[:12]}.npz"


def cached_features(images, net, batch_size, device, progress):
    """The set's per-sample features ({"pool", "logits", "spatial" (Inception)}), from its cache when the cache
    was made by the same network from the same bytes, else extracted and cached."""
    cache, digest = cache_path(images.path, net.weights_sha256), sha256_of(images.path)
    if os.path.exists(cache):
        with np.load(cache) as f:
            if str(f["network_sha256"]) == net.weights_sha256 and str(f["npz_sha256"]) == digest:
                return {k: f[k] for k in f.files if not k.endswith("sha256")}
    acts = extract_features(images, net, batch_size, device, progress, images.path)
    save_npz(cache, dict(acts, network_sha256=net.weights_sha256, npz_sha256=digest))
    return acts


def scores(acts, ref_stats, multiplicities, device):
    """{path: {metric: (resamples,) values}} of each set's resamples, `acts` holding each set's features: the
    first row of multiplicities all ones gives the whole set's values."""
    values = {path: {} for path in acts}
    for path, features in acts.items():
        covered, balls = ball_coverage(ref_stats["pool"], features["pool"], K_NEAREST, device=device)
        values[path]["is"] = resampled_inception_scores(softmax(features["logits"]), multiplicities)
        values[path]["precision"], values[path]["recall"] = resampled_precision_recall(covered, balls,
                                                                                       multiplicities)
    for name, mu, sigma, key in FRECHET:
        if all(key in features for features in acts.values()):  # no spatial features (sFID) in the small modes
            fids = resampled_fids(ref_stats[mu], ref_stats[sigma], {p: f[key] for p, f in acts.items()},
                                  multiplicities)
            for path, resampled in fids.items():
                values[path][name] = resampled
    return values


def paired_interval(metric, difference, resampled):
    """(difference, its 95% interval) from the resampled differences. A resample holds about 63% of the samples
    once or more, and recall counts distinct balls, so every resample's recall is lower than the whole set's:
    recall's interval is the resampled spread moved onto the difference (within the range of a difference
    of fractions)."""
    if metric == "recall":
        resampled = np.clip(resampled - resampled.mean() + difference, -1, 1)
    return difference, tuple(np.percentile(resampled, [2.5, 97.5]))


def compare(ref, paths, features="inception", inception_weights=None, classifier=None, batch_size=250,
            device=None, resamples=200, seed=0, accept_unverified=False, progress=True):
    """{"sets": {path: {metric: value}}, "pairs": {(a, b): {metric: (b - a, (low, high))}}, "network_sha256"}:
    each pair's difference with its 95% paired bootstrap interval over samples."""
    ref = open_images(ref, "reference")
    sets = check_sets(ref, paths, features, accept_unverified)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    count = sets[0].shape[0]
    multiplicities = np.vstack([np.ones(count, dtype=np.int64), bootstrap_multiplicities(count, resamples, seed)])
    with full_fp32(device):
        net = feature_network(features, inception_weights, classifier, device)
        ref_stats = reference_statistics(ref, net, features, batch_size, device, progress)
        acts = {images.path: cached_features(images, net, batch_size, device, progress) for images in sets}
        values = scores(acts, ref_stats, multiplicities, device)
    pairs = {(a, b): {m: paired_interval(m, values[b][m][0] - values[a][m][0],
                                         values[b][m][1:] - values[a][m][1:]) for m in values[a]}
             for a, b in itertools.combinations(paths, 2)}
    return {"sets": {path: {m: float(v[0]) for m, v in metrics.items()} for path, metrics in values.items()},
            "pairs": pairs, "network_sha256": net.weights_sha256}


def report(results):
    """The table of each set's metrics, then one line per pair and metric."""
    sets = results["sets"]
    metrics = [m for m in LABELS if m in next(iter(sets.values()))]
    width = max(len(path) for path in sets)
    lines = [f"{'':{width}}" + "".join(f"{LABELS[m]:>11}" for m in metrics)]
    lines += [f"{path:{width}}" + "".join(f"{values[m]:11.4f}" for m in metrics) for path, values in sets.items()]
    lines += ["", "Differences (second minus first) [95% paired bootstrap interval over samples]:"]
    for (a, b), differences in results["pairs"].items():
        for m in metrics:
            diff, (low, high) = differences[m]
            lines.append(f"{b} - {a}: {LABELS[m]} {diff:+.4f} [{low:+.4f}, {high:+.4f}]: "
                         f"{verdict([diff], (low, high), 0)}")
    return "\n".join(lines)


def network_description(args, sha256):
    if args.features == "inception":
        return f"Inception {os.path.basename(args.inception_weights or WEIGHTS_NAME)} (sha256 {sha256[:12]})"
    return network_name(args.classifier, args.features)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref_batch", help="reference .npz (arr_0 images; optionally mu, sigma, mu_s, sigma_s)")
    p.add_argument("sample_batches", nargs="+", help="two or more sample .npz files from the same noise and labels")
    p.add_argument("--features", choices=["inception", *DATASETS], default="inception",
                   help="digits, shapes, shapes-text: the small-data networks in place of Inception (no sFID)")
    p.add_argument("--inception-weights", help="pytorch-fid's weight file (default: downloaded and cached)")
    p.add_argument("--classifier", help="another small-data classifier state dict than the shipped one")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples")
    p.add_argument("--unverified-pairing", action="store_true",
                   help="compare sets that record no settings, whose shared noise cannot be checked")
    args = p.parse_args(argv)
    if len(args.sample_batches) < 2:
        p.error("give at least two sample sets to compare")
    try:
        results = compare(args.ref_batch, args.sample_batches, args.features, args.inception_weights,
                          args.classifier, args.batch_size, args.device, args.resamples,
                          accept_unverified=args.unverified_pairing)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"Features: {network_description(args, results['network_sha256'])}")
    print(report(results))
    return results


if __name__ == "__main__":
    main()
