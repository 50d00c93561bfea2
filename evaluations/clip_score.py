"""CLIP score (prompt adherence) of text-to-image samples, with transformers' CLIPModel.

    python -m evaluations.clip_score samples/ard-N6.npz prompts.txt [--clip-model openai/clip-vit-large-patch14]

The score of an image and its prompt is 100 · max(cos(image embedding, text embedding), 0)
(Hessel et al., 2021, with the weight 100 most text-to-image papers report); printed is its mean
over the images. Image i's prompt is the entry arr_1[i] of the prompt file, as sample_ddp.py
writes it. FID against a reference set is `python -m evaluations.evaluator REF.npz SAMPLES.npz`.
"""
import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluations.npz import open_images

CLIP_MODEL = "openai/clip-vit-large-patch14"


def clip_score_of_embeddings(image_embeds, text_embeds):
    """Per pair (N,): 100 · max(cos, 0) of image and text embeddings (N, D), normalised here."""
    cos = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(dim=-1)
    return 100 * cos.clamp(min=0)


def load_clip(name=CLIP_MODEL, device="cpu"):
    """(CLIPModel, its tokenizer, its image processor) from a hub name or a local folder."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    try:
        model = CLIPModel.from_pretrained(name).to(device).eval()
        return model, AutoTokenizer.from_pretrained(name), CLIPImageProcessor.from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(f"could not load the CLIP model {name!r} ({e.__class__.__name__}); when offline, pass "
                                f"--clip-model with a local folder (CLIPModel, tokenizer and image processor)") from None


@torch.no_grad()
def clip_scores(images, prompts, model, tokenizer, processor, batch_size=64, device="cpu", progress=True):
    """(N,) CLIP scores of images (uint8 N x H x W x 3 batches, see evaluations.npz) against `prompts` (N)."""
    source, scores, start = open_images(images), [], 0
    for batch in tqdm(source.batches(batch_size), total=-(-source.shape[0] // batch_size), disable=not progress,
                      desc="CLIP"):
        texts = prompts[start:start + len(batch)]
        start += len(batch)
        pixels = processor(images=list(batch.copy()), return_tensors="pt")["pixel_values"].to(device)
        tokens = tokenizer(texts, padding=True, truncation=True,
                           max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(device)
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        scores.append(clip_score_of_embeddings(out.image_embeds, out.text_embeds).cpu())
    return torch.cat(scores)


def prompts_of_samples(samples_path, prompt_file):
    """Each image's prompt: prompt_file's entry arr_1[i] of the samples' .npz."""
    from pixart import read_prompts
    prompts = read_prompts(prompt_file)
    with np.load(samples_path) as f:
        if "arr_1" not in f.files:
            raise ValueError(f"{samples_path}: no arr_1 prompt indices (made by sample_ddp.py --prompts?)")
        indices = f["arr_1"]
    if indices.min() < 0 or indices.max() >= len(prompts):
        raise ValueError(f"{samples_path}: prompt indices up to {indices.max()}, but {prompt_file} holds "
                         f"{len(prompts)} prompts: the samples were made from another prompt file")
    return [prompts[i] for i in indices]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help=".npz of sample_ddp.py --prompts (arr_0 images, arr_1 prompt indices)")
    p.add_argument("prompts", help="the prompt file the samples were made from")
    p.add_argument("--clip-model", default=CLIP_MODEL, help="hub name or local folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        prompts = prompts_of_samples(args.samples, args.prompts)
        clip = load_clip(args.clip_model, args.device)
        scores = clip_scores(args.samples, prompts, *clip, batch_size=args.batch_size, device=args.device)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"CLIP score: {scores.mean().item()}")
    return scores.mean().item()


if __name__ == "__main__":
    main()
