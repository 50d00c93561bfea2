"""Prompt adherence on shapes-text: does each sample show what its prompt names?

    python -m evaluations.adherence SAMPLES.npz PROMPTS [--teacher-samples TEACHER.npz]

SAMPLES.npz is what `sample_ddp.py --prompts PROMPTS` writes (arr_0: uint8 images, arr_1: the prompt
index of each). A small attribute classifier, trained on the renderer's ground truth (evaluations.small,
"shapes-text"; the shipped one in assets/ unless --classifier names another), reads each sample's kind,
pattern and colour. Per attribute, the accuracy over the samples whose prompt names it; "all" is the share of
samples with every named attribute right. Each comes with its ceiling (the classifier on real renders of the same
prompts) and its floor (the samples scored against the prompts shuffled). Beside them FID, precision and recall in the classifier's features against
held-out renders, and with --teacher-samples the FD to the teacher's samples.
"""
import argparse

import numpy as np
import torch

from data import ATTRIBUTES, parse_caption, render_prompts
from pixart import read_prompts

from .evaluator import evaluate
from .metrics import frechet_distance, gaussian_statistics
from .small import (SHAPES_REFERENCE_SEED, as_input, attribute_logits, load_small_features, network_name,
                    reference_images)

SHUFFLE_SEED = 0


def named_attributes(prompts):
    """(N, attributes) indices of what each prompt names, -1 where it names nothing; raises on any prompt
    outside the grammar, naming it."""
    named = [parse_caption(p) for p in prompts]
    return np.array([[options.index(n[a]) if n[a] else -1 for a, options in ATTRIBUTES.items()] for n in named])


def read_attributes(images, features):
    """(N, attributes) indices the classifier reads from uint8 images (N, H, W, 3)."""
    with torch.no_grad():
        logits = features.classifier(as_input(images, features.classifier.features[0].in_channels))
    return torch.stack([g.argmax(1) for g in attribute_logits(logits, features.classes)], dim=1).numpy()


def correct(read, named):
    """(N, attributes): True where the attribute is read as named, or not named."""
    return (read == named) | (named < 0)


def adherence(read, named):
    """{attribute: accuracy over the samples naming it, "all": share with every named attribute right}."""
    right = correct(read, named)
    scores = {a: float(right[named[:, i] >= 0, i].mean()) for i, a in enumerate(ATTRIBUTES) if (named[:, i] >= 0).any()}
    return dict(scores, all=float(right.all(axis=1).mean()))


def score(images, prompts, features):
    """{"samples", "ceiling", "floor"}: adherence of the samples, of real renders of the prompts, and of the
    samples against the prompts shuffled."""
    named = named_attributes(prompts)
    shuffled = named[np.random.default_rng(SHUFFLE_SEED).permutation(len(named))]
    read = read_attributes(images, features)
    real = read_attributes(render_prompts(prompts, SHAPES_REFERENCE_SEED), features)
    return dict(samples=adherence(read, named), ceiling=adherence(real, named), floor=adherence(read, shuffled))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="npz of uint8 images (arr_0) and prompt indices (arr_1), as sample_ddp writes")
    p.add_argument("prompts", help="the prompt file the samples were drawn with")
    p.add_argument("--classifier", help="another attribute classifier's state dict than the shipped one (trained "
                                        "and saved here if missing)")
    p.add_argument("--teacher-samples", help="the teacher's samples from the same noise: FD between the two sets")
    args = p.parse_args(argv)
    prompts = read_prompts(args.prompts)
    named_attributes(prompts)  # a prompt outside the grammar stops here, before any classifier is trained
    with np.load(args.samples) as f:
        images, indices = f["arr_0"], f["arr_1"]
    if images.dtype != np.uint8 or images.shape[1:] != (16, 16, 3):
        p.error(f"{args.samples}: expected uint8 16x16 RGB images, got {images.dtype} {images.shape[1:]}")
    if indices.max() >= len(prompts):
        p.error(f"{args.samples} holds prompt index {indices.max()}: drawn with another prompt file than "
                f"{args.prompts}")
    features = load_small_features(args.classifier, "shapes-text")
    scores = score(images, [prompts[i] for i in indices], features)
    reference = reference_images("shapes-text")[0]
    results, sample_features, _ = evaluate(reference, images, features="shapes-text", classifier=args.classifier,
                                           progress=False, return_features=True)
    print(f"Features: {network_name(args.classifier, 'shapes-text')}")
    print(f"{'':10}" + "".join(f"{a:>10}" for a in scores["samples"]))
    for row, values in scores.items():
        print(f"{row:10}" + "".join(f"{v:10.3f}" for v in values.values()))
    print(f"FID {results['fid']:.2f}, precision {results['precision']:.3f}, recall {results['recall']:.3f} "
          f"(classifier features, against held-out renders)")
    if args.teacher_samples:
        teacher = evaluate(reference, args.teacher_samples, features="shapes-text", classifier=args.classifier,
                           progress=False, return_features=True)[1]
        print(f"FD to the teacher's samples: "
              f"{frechet_distance(*gaussian_statistics(sample_features), *gaussian_statistics(teacher)):.2f}")
    return dict(scores, **results)


if __name__ == "__main__":
    main()
