"""Small-data mode: a CNN trained on an embedded dataset (the 8x8 digits or the 16x16 shapes) stands
in for Inception. Its penultimate features replace pool_3 for FID and precision/recall, its softmax
gives the Inception Score; there is no spatial feature map, so no sFID. The features are the
penultimate layer before its ReLU: a ReLU's output has dead units (half of them zero on every
digit, in an earlier version), which a Fréchet distance cannot see."""
import contextlib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import render_shapes, shapes_training
from utils import atomic_write

SHAPES_REFERENCE_SEED, SHAPES_REFERENCE_COUNT = 1, 5000


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


# name: (images the classifier trains on, reference images, image size, channels read, training epochs)
DATASETS = {
    "digits": (digits_uint8, digits_uint8, 8, 1, 20),
    "shapes": (shapes_training, shapes_reference, 16, 3, 4),
}


def reference_images(dataset):
    """uint8 (N, H, W, 3) images and labels that a small-data FID compares samples against."""
    return DATASETS[dataset][1]()


class SmallClassifier(nn.Module):
    """(B, channels, H, W) images in [0, 1] -> 10 logits, through `features` (B, 128), pre-activation."""

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

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images):
        channels = self.classifier.features[0].in_channels
        features = self.classifier.features(images[:, :channels].float() / 255)
        return {"pool": features, "logits": self.classifier.head(features)}


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
    training_images, _, _, channels, default_epochs = DATASETS[dataset]
    images, labels = training_images()
    x, y = as_input(images, channels), torch.tensor(labels)
    with torch.random.fork_rng(), one_thread():
        torch.manual_seed(seed)
        model = SmallClassifier(channels)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs or default_epochs):
            for idx in torch.randperm(len(x)).split(batch_size):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.eval()


def load_classifier(path, dataset="digits", device="cpu"):
    """The classifier saved by train_classifier, in eval mode."""
    model = SmallClassifier(DATASETS[dataset][3])
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a {dataset} classifier state dict: {e}") from None
    return model.eval().requires_grad_(False).to(device)


def load_small_features(path, dataset="digits", device="cpu", seed=0):
    """SmallFeatures from the classifier at `path`, training it there first if the file is missing."""
    if not os.path.exists(path):
        train_classifier(path, dataset, seed=seed)
    return SmallFeatures(load_classifier(path, dataset, device))
