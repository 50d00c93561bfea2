"""Image data: class-labelled image folders (DiT/ADM preprocessing) and three embedded datasets:
scikit-learn's digits, procedural shapes, and the captioned shapes-text."""
import functools
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

DIGITS = "digits"
SHAPES = "shapes"
SHAPE_NAMES = ("disc", "square", "triangle", "diamond", "ring")
SHAPES_TRAIN_SEED, SHAPES_TRAIN_COUNT = 0, 20_000


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


def load_digits():
    """scikit-learn's UCI digits (1,797 8x8 grey images, shipped in its wheel): images in [-1, 1]
    of shape (N, 1, 8, 8) and labels (N,)."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # values 0..16
    return images, torch.tensor(digits.target, dtype=torch.long)


def render_shapes(count, seed, image_size=16, supersample=2, chunk=1000):
    """Procedural 16x16 RGB images with coarse-to-fine structure: uint8 (count, H, W, 3) and labels.

    Coarse: a smooth two-colour background gradient, and a shape's kind, position, size and
    rotation. Fine: in classes 5-9 the shape is filled with stripes of a 2-3 pixel period at a
    random angle. Class = kind + 5 * striped, kinds in SHAPE_NAMES. Anti-aliased by rendering
    `supersample` times larger and averaging. Deterministic given (count, seed).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2 * len(SHAPE_NAMES), count)
    draws = dict(cx=rng.uniform(5.5, 10.5, count), cy=rng.uniform(5.5, 10.5, count),
                 radius=rng.uniform(3.5, 5.5, count), angle=rng.uniform(0, 2 * np.pi, count),
                 stripe_angle=rng.uniform(0, np.pi, count), period=rng.uniform(2.2, 3.2, count),
                 gradient_angle=rng.uniform(0, 2 * np.pi, count))
    background = rng.uniform(0.0, 0.45, (count, 2, 3))
    colour = rng.uniform(0.55, 1.0, (count, 3)) * (rng.random((count, 3)) < 0.7) + rng.uniform(0, 0.2, (count, 3))
    images = [render_chunk(labels[i:i + chunk], {k: v[i:i + chunk] for k, v in draws.items()},
                           background[i:i + chunk], colour[i:i + chunk], image_size, supersample)
              for i in range(0, count, chunk)]
    return np.concatenate(images), labels


def render_chunk(labels, draws, background, colour, image_size, supersample):
    d = {k: v.astype(np.float32)[:, None, None] for k, v in draws.items()}
    kind, striped = labels % len(SHAPE_NAMES), labels >= len(SHAPE_NAMES)
    size = image_size * supersample
    y, x = (np.mgrid[:size, :size].astype(np.float32) + 0.5) / supersample * (16 / image_size)
    dx, dy = x - d["cx"], y - d["cy"]
    cos, sin = np.cos(d["angle"]), np.sin(d["angle"])
    u, v = (dx * cos + dy * sin) / d["radius"], (dy * cos - dx * sin) / d["radius"]
    r2 = u ** 2 + v ** 2
    inside = np.zeros(u.shape, dtype=bool)
    for index, shape in enumerate([
            lambda: r2 <= 1,
            lambda: np.maximum(abs(u), abs(v)) <= 0.75,
            lambda: (v >= -0.6) & (v <= 1) & (abs(u) <= 0.65 * (1 - v)),
            lambda: abs(u) + abs(v) <= 1,
            lambda: (r2 <= 1) & (r2 >= 0.4)]):
        rows = kind == index
        inside[rows] = shape()[rows]
    phase = x * np.cos(d["stripe_angle"]) + y * np.sin(d["stripe_angle"])
    dark = striped[:, None, None] & (np.sin(2 * np.pi * phase / d["period"]) > 0)
    along = ((x - 8) * np.cos(d["gradient_angle"]) + (y - 8) * np.sin(d["gradient_angle"])) / 16 + 0.5
    back = background[:, 0, None, None] * (1 - along[..., None]) + background[:, 1, None, None] * along[..., None]
    shape_colour = np.where(dark[..., None], 0.35, 1.0) * colour[:, None, None]
    image = np.where(inside[..., None], shape_colour, back)
    image = image.reshape(len(labels), image_size, supersample, image_size, supersample, 3).mean(axis=(2, 4))
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------- shapes-text

# Captioned shapes for text-to-image: upright (so a square is never a diamond), larger, in named colours.
# The grammar, "a [solid|striped] [colour] kind|shape", names each attribute with probability NAMED; an
# attribute a prompt does not name is drawn at random. The (kind, colour) pairs of HELD_OUT_PAIRS never
# appear in the training set, with or without being named: the composition split.
SHAPES_TEXT = "shapes-text"
PATTERNS = ("solid", "striped")
COLOURS = {"red": (0.90, 0.15, 0.10), "yellow": (0.95, 0.85, 0.15), "green": (0.15, 0.75, 0.20),
           "blue": (0.15, 0.35, 0.95), "purple": (0.65, 0.20, 0.85)}
ATTRIBUTES = {"kind": SHAPE_NAMES, "pattern": PATTERNS, "colour": tuple(COLOURS)}
HELD_OUT_PAIRS = frozenset(zip(SHAPE_NAMES, ("green", "blue", "purple", "red", "yellow")))
NAMED = 0.8
SHAPES_TEXT_TRAIN_SEED, SHAPES_TEXT_TRAIN_COUNT = 0, 20_000


def caption_words():
    """Every word of the grammar: the vocabulary of a toy text encoder (pixart.build_toy_text_encoder)."""
    return ["a", "shape", *[word for options in ATTRIBUTES.values() for word in options]]


def caption(kind=None, pattern=None, colour=None):
    """The prompt naming the given attributes: caption("disc", "striped", "red") == "a striped red disc"."""
    return " ".join(["a", *filter(None, (pattern, colour)), kind or "shape"])


def parse_caption(prompt):
    """{attribute: value or None (not named)} of a prompt of the grammar; anything else raises."""
    words = prompt.split(" ")
    if len(words) >= 2 and words[0] == "a":
        *modifiers, noun = words[1:]
        named = dict(kind=None, pattern=None, colour=None)
        for attribute in ("pattern", "colour"):
            if modifiers and modifiers[0] in ATTRIBUTES[attribute]:
                named[attribute] = modifiers.pop(0)
        if not modifiers and (noun == "shape" or noun in SHAPE_NAMES):
            return dict(named, kind=None if noun == "shape" else noun)
    raise ValueError(f"{prompt!r} is not a shapes-text prompt (\"a [solid|striped] [colour] kind|shape\")")


def draw_captions(count, seed, split="train"):
    """Prompts of the grammar and every attribute's value {attribute: (count,) indices into
    ATTRIBUTES[attribute]}, named or not, and the generator to draw their renders from. (kind, colour) is
    uniform over the pairs of `split`: "train" (those not held out), "held_out" (HELD_OUT_PAIRS, kind and
    colour always named) or "all"; each other attribute is named with probability NAMED. Deterministic
    given the arguments."""
    rng = np.random.default_rng(seed)
    held_out = [[(kind, colour) in HELD_OUT_PAIRS for colour in COLOURS] for kind in SHAPE_NAMES]
    pairs = [(k, c) for k, row in enumerate(held_out) for c, out in enumerate(row)
             if split == "all" or out == (split == "held_out")]
    kind, colour = np.array(pairs)[rng.integers(0, len(pairs), count)].T
    values = dict(kind=kind, pattern=rng.integers(0, len(PATTERNS), count), colour=colour)
    named = rng.random((count, len(ATTRIBUTES))) < NAMED
    if split == "held_out":
        named[:, [0, 2]] = True
    prompts = [caption(**{a: ATTRIBUTES[a][values[a][i]] if named[i, j] else None for j, a in enumerate(ATTRIBUTES)})
               for i in range(count)]
    return prompts, values, rng


def render_captioned(count, seed, split="train", image_size=16, supersample=2):
    """Captioned shapes: uint8 images (count, H, W, 3) of draw_captions(count, seed, split), their prompts,
    and every attribute's value."""
    prompts, values, rng = draw_captions(count, seed, split)
    return render_attributes(values, rng, image_size, supersample), prompts, values


def render_prompts(prompts, seed, image_size=16, supersample=2):
    """Real renders of `prompts`: uint8 images with every named attribute as named, the others at random."""
    rng = np.random.default_rng(seed)
    named = [parse_caption(p) for p in prompts]
    values = {a: np.array([options.index(n[a]) if n[a] else rng.integers(len(options)) for n in named])
              for a, options in ATTRIBUTES.items()}
    return render_attributes(values, rng, image_size, supersample)


def render_attributes(values, rng, image_size=16, supersample=2, chunk=1000):
    """uint8 images of upright shapes with the given attributes ({attribute: indices}); the geometry, stripes,
    background and colour jitter drawn from `rng`."""
    count = len(values["kind"])
    draws = dict(cx=rng.uniform(6.5, 9.5, count), cy=rng.uniform(6.5, 9.5, count),
                 radius=rng.uniform(5.0, 6.5, count), angle=rng.uniform(-0.2, 0.2, count),
                 stripe_angle=rng.uniform(0, np.pi, count), period=rng.uniform(2.2, 3.2, count),
                 gradient_angle=rng.uniform(0, 2 * np.pi, count))
    background = rng.uniform(0.0, 0.35, (count, 2, 3))
    rgb = np.array(list(COLOURS.values()))[values["colour"]] + rng.uniform(-0.05, 0.05, (count, 3))
    labels = values["kind"] + len(SHAPE_NAMES) * values["pattern"]
    return np.concatenate([render_chunk(labels[i:i + chunk], {k: v[i:i + chunk] for k, v in draws.items()},
                                        background[i:i + chunk], rgb[i:i + chunk], image_size, supersample)
                           for i in range(0, count, chunk)])


@functools.cache  # 20,000 renders: made once per process (a resumed run in the same process reuses them)
def load_shapes_text(image_size=16):
    """The shapes-text training set (SHAPES_TEXT_TRAIN_COUNT renders of the training pairs, seed
    SHAPES_TEXT_TRAIN_SEED): images in [-1, 1] (N, 3, 16, 16), each image's index into the prompts, and the
    distinct prompts (sorted)."""
    if image_size != 16:
        raise ValueError(f"the shapes-text images are 16x16; got --image-size {image_size}")
    images, prompts, _ = render_captioned(SHAPES_TEXT_TRAIN_COUNT, SHAPES_TEXT_TRAIN_SEED)
    table = sorted(set(prompts))
    index = {p: i for i, p in enumerate(table)}
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0,
            torch.tensor([index[p] for p in prompts]), table)


def shapes_training():
    """The shapes training set as uint8 (SHAPES_TRAIN_COUNT, 16, 16, 3) images and labels."""
    return render_shapes(SHAPES_TRAIN_COUNT, SHAPES_TRAIN_SEED)


def load_shapes():
    """The shapes training set (SHAPES_TRAIN_COUNT images, seed SHAPES_TRAIN_SEED): images in
    [-1, 1] of shape (N, 3, 16, 16) and labels (N,)."""
    images, labels = shapes_training()
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, torch.from_numpy(labels)


# name: (loader, number of classes, channels, image size)
EMBEDDED = {DIGITS: (load_digits, 10, 1, 8), SHAPES: (load_shapes, 2 * len(SHAPE_NAMES), 3, 16)}
CAPTIONED = {SHAPES_TEXT: load_shapes_text}


def captioned_dataset(path, image_size):
    """(dataset of (image in [-1, 1], prompt index), the prompts, channels) of an embedded captioned dataset."""
    images, indices, prompts = CAPTIONED[path](image_size)
    return TensorDataset(images, indices), prompts, images.shape[1]


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
    """(dataset of (image in [-1, 1], label), number of classes, channels) for an embedded dataset
    ("digits", "shapes") or an image folder."""
    if path in EMBEDDED:
        load, num_classes, channels, size = EMBEDDED[path]
        if image_size != size:
            raise ValueError(f"the {path} are {size}x{size} images; got --image-size {image_size}")
        return TensorDataset(*load()), num_classes, channels
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no image folder at {path!r} (or use --data-path {' or '.join(EMBEDDED)})")
    dataset = CenterCropFolder(path, image_size)
    return dataset, len(dataset.folder.classes), 3


def image_format(path):
    """(image size, channels, number of classes) of image_dataset(path, ...), read without loading an image;
    the size is None for an image folder, which is centre-cropped to any size."""
    if path in EMBEDDED:
        _, num_classes, channels, image_size = EMBEDDED[path]
        return image_size, channels, num_classes
    return None, 3, len(find_classes(path)[0])


def random_flip(images):
    """Horizontal flip of a random half, with the global RNG (seeded per training step)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
