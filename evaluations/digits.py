"""Small-data mode: a CNN trained on scikit-learn's 8x8 digits stands in for Inception. Its penultimate
features replace pool_3 for FID and precision/recall, its softmax gives the Inception Score; there is
no spatial feature map, so no sFID."""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsClassifier(nn.Module):
    """(B, 1, 8, 8) grey images in [0, 1] -> 10 logits, through `features` (B, 128)."""

    def __init__(self, width=32, feature_dim=128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, x):
        return self.head(self.features(x))


class DigitsFeatures(nn.Module):
    """ADM-style images (B, 3, 8, 8), float in [0, 255], grey replicated over channels ->
    {"pool": penultimate features, "logits": class logits}, the keys the evaluator reads."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images):
        features = self.classifier.features(images[:, :1].float() / 255)
        return {"pool": features, "logits": self.classifier.head(features)}


def digits_uint8():
    """scikit-learn's digits as ADM-style uint8 images (1797, 8, 8, 3) and their labels. Values 0..16
    map to 0..255, as a sample in [-1, 1] does under the usual (x + 1) * 127.5."""
    from sklearn.datasets import load_digits  # here: a second to import, and only this mode needs it
    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target


def train_digits_classifier(path, seed=0, epochs=20, batch_size=64):
    """Train the classifier on all 1,797 digits (deterministic given `seed`), save its state dict to
    `path` atomically, and return it."""
    images, labels = digits_uint8()
    x = torch.tensor(images[..., :1], dtype=torch.float32).permute(0, 3, 1, 2) / 255
    y = torch.tensor(labels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(batch_size):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def load_digits_classifier(path, device="cpu"):
    """The classifier saved by train_digits_classifier, in eval mode."""
    model = DigitsClassifier()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a digits classifier state dict: {e}") from None
    return model.eval().requires_grad_(False).to(device)


def load_digits_features(path, device="cpu", seed=0):
    """DigitsFeatures from the classifier at `path`, training it there first if the file is missing."""
    if not os.path.exists(path):
        train_digits_classifier(path, seed=seed)
    return DigitsFeatures(load_digits_classifier(path, device))
