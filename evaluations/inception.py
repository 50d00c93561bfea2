"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, as ported by pytorch-fid) with the three
outputs ADM's evaluator reads from one forward pass: pool_3, the sFID spatial features, and the
unbiased logits its Inception Score uses."""
import os
import re
import urllib.error

import torch
import torch.nn as nn
import torchvision
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

from utils import sha256_of

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8})\.pth$")
SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 channels of mixed_6/conv: 17 * 17 * 7 = 2023 features


def build_fid_inception():
    """torchvision's Inception3 with pytorch-fid's TF-faithful blocks (randomly initialised); its
    state dict has the key layout of pytorch-fid's weight file."""
    net = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def resize_like_tf1(images, size=299):
    """Bilinear resize exactly as TF1's resize_bilinear(align_corners=False): the source coordinate of
    output pixel i is i * in_size / size, with no half-pixel offset (unlike torch's interpolate),
    interpolating along x first, in float32."""
    def taps(in_size):
        pos = torch.arange(size, dtype=torch.float32, device=images.device)
        pos = pos * torch.tensor(in_size / size, dtype=torch.float32)
        low = pos.floor().long()
        return low, (low + 1).clamp(max=in_size - 1), pos - low

    y0, y1, wy = taps(images.shape[2])
    x0, x1, wx = taps(images.shape[3])
    left, right = images[..., x0], images[..., x1]
    rows = left + (right - left) * wx
    top, bottom = rows[:, :, y0], rows[:, :, y1]
    return top + (bottom - top) * wy[:, None]


class FIDInception(nn.Module):
    """Images (B, 3, H, W), float in [0, 255] -> {"pool": (B, 2048), "spatial": (B, 2023), "logits": (B, 1008)}."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        n = self.net
        x = (resize_like_tf1(images.float()) - 128) / 128
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a,
                      n.Mixed_6b, n.Mixed_6c):
            x = layer(x)
        # TF's mixed_6/conv is Mixed_6d's 1x1 branch; recomputing it costs < 1% of the pass.
        spatial = n.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        for layer in (n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.avgpool):
            x = layer(x)
        pool = x.flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": pool @ n.fc.weight.t()}


def default_weights_path():
    """The weight file in torch.hub's cache, downloaded (hash-checked) when missing."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=WEIGHTS_NAME[-12:-4])
        except (urllib.error.URLError, OSError) as e:
            raise FileNotFoundError(f"cannot download the Inception weights ({e}); put {WEIGHTS_URL} at "
                                    f"{path} or pass --inception-weights PATH") from None
    return path


def check_layout(state_dict, expected, path):
    """Raise a ValueError naming the first keys that differ from the expected layout."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
                   for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{what}: {', '.join(keys[:3])}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)) if keys]
    if problems:
        raise ValueError(f"{path} is not a pytorch-fid Inception weight file ({WEIGHTS_NAME} layout); "
                         + "; ".join(problems))


def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode, from `weights` (a file path) or the downloaded default. A file
    whose name carries a hash prefix ("-6726825d.pth") must match it. The returned module has
    `weights_sha256`, which identifies the weights in cached statistics."""
    path = weights or default_weights_path()
    sha256 = sha256_of(path)
    claimed = HASH_IN_NAME.search(os.path.basename(path))
    if claimed and not sha256.startswith(claimed.group(1)):
        raise ValueError(f"{path}: sha256 starts with {sha256[:8]}, but its name says {claimed.group(1)} "
                         "(corrupt or truncated download?)")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    net = build_fid_inception()
    expected = net.state_dict()
    # A file ported from TF may lack BatchNorm's num_batches_tracked counters; eval never reads them.
    counters = {k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}
    state_dict = {**counters, **state_dict}
    check_layout(state_dict, expected, path)
    net.load_state_dict(state_dict, strict=True)
    model = FIDInception(net).eval().requires_grad_(False).to(device)
    model.weights_sha256 = sha256
    return model
