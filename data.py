"""Image data: class-labelled image folders (DiT/ADM preprocessing) and the embedded digits."""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import ImageFolder

DIGITS = "digits"


def center_crop_arr(image, image_size):
    """ADM's centre crop: halve with a box filter while the image is at least twice the target,
    resize the short side to `image_size` with bicubic, crop the centre."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def load_digits(image_size=8):
    """scikit-learn's UCI digits (1,797 8x8 grey images, shipped in its wheel): images in [-1, 1]
    of shape (N, 1, 8, 8) and labels (N,)."""
    if image_size != 8:
        raise ValueError(f"the digits are 8x8 images; got --image-size {image_size}")
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # values 0..16
    return images, torch.tensor(digits.target, dtype=torch.long)


class CenterCropFolder(Dataset):
    """DiT's ImageFolder convention (one sub-folder per class), RGB images in [-1, 1]."""

    def __init__(self, root, image_size):
        self.folder = ImageFolder(root)
        self.image_size = image_size

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        path, label = self.folder.samples[index]
        with Image.open(path) as image:
            arr = center_crop_arr(image.convert("RGB"), self.image_size)
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0, label


def image_dataset(path, image_size):
    """(dataset of (image in [-1, 1], label), number of classes, channels) for "digits" or a folder."""
    if path == DIGITS:
        images, labels = load_digits(image_size)
        return TensorDataset(images, labels), 10, 1
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no image folder at {path!r} (or use --data-path {DIGITS})")
    dataset = CenterCropFolder(path, image_size)
    return dataset, len(dataset.folder.classes), 3


def random_flip(images):
    """Horizontal flip of a random half, with the global RNG (seeded per training step)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
