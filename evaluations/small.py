"""Small-data mode: a CNN trained on an embedded dataset (the 8x8 digits, the 16x16 shapes, or the
captioned shapes-text, where it reads kind, pattern and colour) stands in for Inception. Its
penultimate features replace pool_3 for FID and precision/recall, its softmax (over the first
attribute) gives the Inception Score; there is no spatial feature map, so no sFID. The features are
the penultimate layer before its ReLU: a ReLU's output has dead units (half of them zero on every
digit, in an earlier version), which a Fréchet distance cannot see.

Each dataset's network is shipped in assets/ (DATASET_classifier.pt, the file the metrics are named by), so
that a number means the same on every machine: a CNN trained through other kernels is another feature space.
This retrains one exactly as shipped (seed 0, one thread), into assets/ unless --out says elsewhere:

    python -m evaluations.small digits      # or shapes, shapes-text
"""
import argparse
import contextlib
import os
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import ATTRIBUTES, render_captioned, render_shapes, shapes_training
from utils import atomic_write, sha256_of

SHAPES_REFERENCE_SEED, SHAPES_REFERENCE_COUNT = 1, 5000
SHAPES_TEXT_CLASSIFIER_SEED, SHAPES_TEXT_CLASSIFIER_COUNT = 2, 20_000
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def digits_uint8():
    """scikit-learn's digits as ADM-style uint8 images (1797, 8, 8, 3) and their labels. Values 0..16
    map to 0..255, as a sample in [-1, 1] does under the usual (x + 1) * 127.5."""
    from sklearn.datasets import load_digits  # here: a second to import, and only this mode needs it
    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target


def shapes_reference():
    """Held-out shapes (another seed than the training set): the reference batch of the shapes mode."""
    return render_shapes(SHAPES_REFERENCE_COUNT, SHAPES_REFERENCE_SEED)


def attribute_values(values):
    """{attribute: (N,) indices} -> (N, attributes) labels in ATTRIBUTES' order."""
    return np.stack([values[a] for a in ATTRIBUTES], axis=1)


def shapes_text_training():
    """Renders of every (kind, colour) pair, the held-out ones included, labelled with every attribute: what
    the attribute classifier learns from (its own seed: neither the teacher's images nor the reference)."""
    images, _, values = render_captioned(SHAPES_TEXT_CLASSIFIER_COUNT, SHAPES_TEXT_CLASSIFIER_SEED, "all")
    return images, attribute_values(values)


def shapes_text_reference():
    """Held-out renders of the training distribution (another seed than the training set)."""
    images, _, values = render_captioned(SHAPES_REFERENCE_COUNT, SHAPES_REFERENCE_SEED, "train")
    return images, attribute_values(values)


class SmallDataset(NamedTuple):
    training: Callable  # () -> uint8 images (N, H, W, 3), labels (N,) or (N, attributes)
    reference: Callable  # the same, for the images samples are compared against
    image_size: int
    channels: int  # read by the classifier
    epochs: int
    classes: tuple = (10,)  # the classes of each label column (each attribute)


DATASETS = {
    "digits": SmallDataset(digits_uint8, digits_uint8, 8, 1, 20),
    "shapes": SmallDataset(shapes_training, shapes_reference, 16, 3, 4),
    "shapes-text": SmallDataset(shapes_text_training, shapes_text_reference, 16, 3, 4,
                                tuple(len(v) for v in ATTRIBUTES.values())),
}


def reference_images(dataset):
    """uint8 (N, H, W, 3) images and labels that a small-data FID compares samples against."""
    return DATASETS[dataset].reference()


def attribute_logits(logits, classes):
    """The logits (N, sum(classes)) split per attribute."""
    return logits.split(list(classes), dim=1)


class SmallClassifier(nn.Module):
    """(B, channels, H, W) images in [0, 1] -> logits (10, or every attribute's side by side), through
    `features` (B, 128), pre-activation."""

    def __init__(self, channels=1, width=32, feature_dim=128, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(2 * width * 4, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class SmallFeatures(nn.Module):
    """ADM-style images (B, 3, H, W), float in [0, 255] -> {"pool": penultimate features, "logits":
    class logits}, the keys the evaluator reads. Grey datasets read the first channel."""

    def __init__(self, classifier, classes=(10,)):
        super().__init__()
        self.classifier, self.classes = classifier, classes

    def forward(self, images):
        channels = self.classifier.features[0].in_channels
        features = self.classifier.features(images[:, :channels].float() / 255)
        return {"pool": features, "logits": attribute_logits(self.classifier.head(features), self.classes)[0]}


def as_input(images, channels):
    """uint8 (N, H, W, 3) -> float (N, channels, H, W) in [0, 1]."""
    return torch.tensor(images[..., :channels], dtype=torch.float32).permute(0, 3, 1, 2) / 255


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: a CPU result that does not depend on how many threads the caller runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(path, dataset="digits", seed=0, epochs=None, batch_size=64):
    """Train the classifier of `dataset` (deterministic given `seed`, on one thread: the same weights
    whatever the caller's thread count), save its state dict to `path` atomically, and return it."""
    spec = DATASETS[dataset]
    images, labels = spec.training()
    x, y = as_input(images, spec.channels), torch.tensor(labels).reshape(len(images), -1)
    with torch.random.fork_rng(), one_thread():
        torch.manual_seed(seed)
        model = SmallClassifier(spec.channels, num_classes=sum(spec.classes))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs or spec.epochs):
            for idx in torch.randperm(len(x)).split(batch_size):
                loss = sum(F.cross_entropy(logits, y[idx, i])
                           for i, logits in enumerate(attribute_logits(model(x[idx]), spec.classes)))
                opt.zero_grad()
                loss.backward()
                opt.step()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.eval()


def load_classifier(path, dataset="digits", device="cpu"):
    """The classifier saved by train_classifier, in eval mode."""
    spec = DATASETS[dataset]
    model = SmallClassifier(spec.channels, num_classes=sum(spec.classes))
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a {dataset} classifier state dict: {e}") from None
    return model.eval().requires_grad_(False).to(device)


def shipped_classifier(dataset):
    """The path of `dataset`'s shipped network in assets/."""
    return os.path.join(ASSETS, f"{dataset.replace('-', '_')}_classifier.pt")


def load_small_features(path=None, dataset="digits", device="cpu", seed=0):
    """SmallFeatures from the classifier at `path` (default: the shipped one), training it there first if
    the file is missing; a missing shipped network is an error, never retrained behind the caller's back."""
    path = path or shipped_classifier(dataset)
    if not os.path.exists(path):
        if path == shipped_classifier(dataset):
            raise FileNotFoundError(f"no shipped {dataset} network at {path}: retrain it with "
                                    f"`python -m evaluations.small {dataset}`")
        train_classifier(path, dataset, seed=seed)
    features = SmallFeatures(load_classifier(path, dataset, device), DATASETS[dataset].classes)
    features.weights_sha256 = sha256_of(path)  # as the Inception's: what cached features are keyed by
    return features


def network_name(path, dataset):
    """How a result names the feature network at `path` (default: the shipped one): by the short sha256 of
    its file, and, unless its bytes are the shipped network's, as another network."""
    path = path or shipped_classifier(dataset)
    digest = sha256_of(path)
    shipped = shipped_classifier(dataset)
    if os.path.exists(shipped) and sha256_of(shipped) == digest:
        return f"the shipped {dataset} network {os.path.basename(shipped)} (sha256 {digest[:12]})"
    return f"the {dataset} network {path} (sha256 {digest[:12]}), not the shipped network"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=list(DATASETS))
    p.add_argument("--out", help="where to write the network (default: the shipped one's path in assets/)")
    args = p.parse_args(argv)
    path = args.out or shipped_classifier(args.dataset)
    train_classifier(path, args.dataset)
    print(f"wrote {network_name(path, args.dataset)}")


if __name__ == "__main__":
    main()
