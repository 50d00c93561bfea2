"""Worker for test_models' download tests, run by torchrun on gloo: every rank opens the official DiT-XL/2 name
in the current folder's pretrained_models/, through a fake downloader that logs each call to DOWNLOAD_LOG (one
line per call, naming the rank) and writes its file slowly, so a rank that did not wait reads nothing."""
import os
import sys
import time

import torch

import models
from utils import cleanup_distributed, init_distributed

WEIGHTS = {"w": torch.arange(4.0)}


def fake_download(url, dst, *args, **kwargs):
    with open(os.environ["DOWNLOAD_LOG"], "a") as log:
        log.write(f"{os.environ['RANK']} {url}\n")
    time.sleep(1)
    torch.save(WEIGHTS, dst)


if __name__ == "__main__":
    init_distributed(1, "cpu")
    torch.hub.download_url_to_file = fake_download
    found = models.find_model("DiT-XL-2-256x256.pt")
    if not torch.equal(found["w"], WEIGHTS["w"]):
        sys.exit(f"rank {os.environ['RANK']} read other weights: {found}")
    cleanup_distributed()
