"""VA-VAE (hustvl/vavae-imagenet256-f16d32-dinov2) and REPA-E's E2E-VAVAE in diffusers' AutoencoderKL.

Both are the LDM (VQGAN-KL) autoencoder: 32 latent channels, downsampling 16 (ch 128, ch_mult 1 1 2 2 4), attention
at the lowest resolution in the encoder's last level and the decoder's first, and in both middles; diffusers'
single-file converter drops those attention layers, so the keys are mapped here. Their latents are normalised per
channel, (z - mean) / std (LightningDiT's latents_stats.pt, REPA-E's -latents-stats.pt), stored in the converted
folder's config (`latents_mean`, `latents_std`, scaling factor 1) so that `--vae FOLDER` carries them into every
script (models.Autoencoder).

    python vavae.py --ckpt vavae-imagenet256-f16d32-dinov2.pt --stats latents_stats.pt --out pretrained_models/vavae
"""
import argparse
import logging
import os
import re
import shutil

import torch

AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def autoencoder_state_dict(checkpoint, source="checkpoint"):
    """The autoencoder's tensors of an LDM-layout file, bare or under "state_dict" (VA-VAE's training file also
    holds its loss and vision-foundation-model tensors: dropped, and named in the log)."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    dropped = sorted(k for k in state_dict if not k.startswith(AUTOENCODER_PARTS))
    if dropped:
        shown = ", ".join(dropped[:5]) + (f" (+{len(dropped) - 5} more)" if len(dropped) > 5 else "")
        logging.getLogger(__name__).warning(f"{source}: dropping {len(dropped)} tensors that are not the "
                                            f"autoencoder's: {shown}")
    return {k: v for k, v in state_dict.items() if k.startswith(AUTOENCODER_PARTS)}


def levels(state_dict, part, level_name):
    return 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith(f"{part}.{level_name}."))


def diffusers_config(state_dict):
    """AutoencoderKL's config for an LDM state dict, read from its shapes: channels per level, blocks per level,
    latent channels, and which levels attend."""
    num_levels = levels(state_dict, "encoder", "down")
    widths = [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(num_levels)]
    blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})

    def attends(part, level_name, i):
        return any(k.startswith(f"{part}.{level_name}.{i}.attn.") for k in state_dict)
    down = tuple(("AttnDownEncoderBlock2D" if attends("encoder", "down", i) else "DownEncoderBlock2D")
                 for i in range(num_levels))
    up = tuple(("AttnUpDecoderBlock2D" if attends("decoder", "up", num_levels - 1 - i) else "UpDecoderBlock2D")
               for i in range(num_levels))
    return dict(in_channels=state_dict["encoder.conv_in.weight"].shape[1],
                out_channels=state_dict["decoder.conv_out.weight"].shape[0], down_block_types=down,
                up_block_types=up, block_out_channels=tuple(widths), layers_per_block=blocks,
                latent_channels=state_dict["post_quant_conv.weight"].shape[0], norm_num_groups=32)


def diffusers_key(key, num_levels):
    """AutoencoderKL's name of an LDM key (the decoder's levels run the other way in diffusers)."""
    key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.",
                 key)
    key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.", key)
    key = re.sub(r"_blocks\.(\d+)\.block\.", r"_blocks.\1.resnets.", key)
    key = re.sub(r"_blocks\.(\d+)\.attn\.", r"_blocks.\1.attentions.", key)
    key = re.sub(r"\.(downsample|upsample)\.", r".\1rs.0.", key)
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"(attentions\.\d+)\.(norm|q|k|v|proj_out)\.",
                  lambda m: f"{m[1]}.{ATTENTION_PARTS[m[2]]}.", key)


def to_diffusers(state_dict):
    """(AutoencoderKL's config, its state dict) of an LDM-layout autoencoder state dict."""
    config = diffusers_config(state_dict)
    mapped = {}
    for key, tensor in state_dict.items():
        name = diffusers_key(key, len(config["block_out_channels"]))
        attention_projection = ".attentions." in name and tensor.ndim == 4
        mapped[name] = tensor.flatten(1) if attention_projection else tensor  # 1x1 convolutions as linear layers
    return config, mapped


def read_latent_stats(path):
    """(mean, std) per channel, 1-D, of LightningDiT's latents_stats.pt ({"mean", "std"}) or REPA-E's
    -latents-stats.pt ({"latents_bias": mean, "latents_scale": 1 / std})."""
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if {"mean", "std"} <= stats.keys():
        mean, std = stats["mean"], stats["std"]
    elif {"latents_bias", "latents_scale"} <= stats.keys():
        mean, std = stats["latents_bias"], 1 / stats["latents_scale"]
    else:
        raise ValueError(f"{path}: expected latent statistics as mean and std (LightningDiT) or latents_bias and "
                         f"latents_scale (REPA-E), found {', '.join(sorted(stats)) or 'nothing'}")
    return mean.flatten().double(), std.flatten().double()


def load_ldm_autoencoder(ckpt, stats):
    """diffusers' AutoencoderKL with the weights of an LDM-layout file and its per-channel latent statistics."""
    from diffusers import AutoencoderKL
    from models import load_state_dict_strict
    config, state_dict = to_diffusers(autoencoder_state_dict(
        torch.load(ckpt, map_location="cpu", weights_only=True), source=str(ckpt)))
    mean, std = read_latent_stats(stats)
    if len(mean) != config["latent_channels"]:
        raise ValueError(f"{stats} holds statistics of {len(mean)} channels, the autoencoder {ckpt} has "
                         f"{config['latent_channels']}")
    model = AutoencoderKL(**config, scaling_factor=1.0, latents_mean=mean.tolist(), latents_std=std.tolist())
    return load_state_dict_strict(model, state_dict, source=str(ckpt)).eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the LDM-layout autoencoder file (VA-VAE's or E2E-VAVAE's .pt)")
    p.add_argument("--stats", required=True, help="its latent statistics (latents_stats.pt or -latents-stats.pt)")
    p.add_argument("--out", required=True, help="the diffusers folder to write, for --vae")
    args = p.parse_args(argv)
    model = load_ldm_autoencoder(args.ckpt, args.stats)
    tmp = f"{args.out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {model.config.latent_channels} latent channels, downsampling "
          f"{2 ** (len(model.config.block_out_channels) - 1)}, per-channel latent statistics")


if __name__ == "__main__":
    main()
