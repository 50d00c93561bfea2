"""Tiny random PixArt-Sigma pieces for CPU tests: a transformer, the project's toy T5 text encoder
(pixart.build_toy_text_encoder), an SDXL-like VAE, saved in the pipeline's folder layout; and a
word-level tokenizer for the tiny CLIP. The hub's PixArt-Sigma-XL-2-512-MS and pixart_sigma_sdxlvae_T5_diffusers
split a pipeline in two: save_tiny_transformer_only and save_tiny_components lay the same pieces out as they do."""
import json

import torch

from pixart import build_toy_text_encoder

TEXT_CHANNELS = 24
WORDS = ["a", "cat", "dog", "red", "blue", "on", "the", "grass", "sky", "house", "car", "tree"]
MAX_TOKENS = 12


def tiny_transformer(seed=0, num_layers=3, sample_size=8, in_channels=4, patch_size=2):
    """A tiny PixArtTransformer2DModel whose zero-initialised layers are perturbed, so every path matters."""
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
                                     out_channels=2 * in_channels, num_layers=num_layers, cross_attention_dim=32,
                                     sample_size=sample_size, patch_size=patch_size,
                                     caption_channels=TEXT_CHANNELS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_text(batch, tokens=5, seed=1):
    """Random T5-like text (batch, tokens, C) and a mask with a different length per row."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, tokens, TEXT_CHANNELS, generator=g)
    mask = torch.arange(tokens)[None] < torch.arange(tokens - batch + 1, tokens + 1).clamp(min=1)[:, None]
    return text, mask


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.13025).eval()


def save_tiny_pipeline(path, seed=0, transformer=None):
    """A pipeline folder (transformer/, text_encoder/, tokenizer/, vae/) as the hub's PixArt-Sigma repos lay it out."""
    (transformer or tiny_transformer(seed)).save_pretrained(path / "transformer")
    build_toy_text_encoder(str(path), WORDS, seed, d_model=TEXT_CHANNELS)
    tiny_vae(seed).save_pretrained(path / "vae")
    return str(path)


def save_tiny_transformer_only(path, seed=0):
    """A repository as the hub's PixArt-Sigma-XL-2-512-MS (and the first 1024-MS upload): transformer/ alone, no
    model_index.json, its config diffusers' legacy Transformer2DModel with norm_type "ada_norm_single" and that
    class's other fields, as the upload's config.json says."""
    tiny_transformer(seed).save_pretrained(path / "transformer")
    config_path = path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["norm_type"] == "ada_norm_single"
    config.update(_class_name="Transformer2DModel", _diffusers_version="0.22.0.dev0", attention_type="default",
                  double_self_attention=False, norm_num_groups=32, num_vector_embeds=None, only_cross_attention=False,
                  use_linear_projection=False)
    config_path.write_text(json.dumps(config, indent=2))
    return str(path)


def save_tiny_components(path, seed=0):
    """A repository as the hub's pixart_sigma_sdxlvae_T5_diffusers: text_encoder/, tokenizer/ and vae/ (with
    save_tiny_pipeline's pieces of the same seed) and a model_index.json naming a PixArtSigmaPipeline's parts."""
    build_toy_text_encoder(str(path), WORDS, seed, d_model=TEXT_CHANNELS)
    tiny_vae(seed).save_pretrained(path / "vae")
    parts = dict(scheduler=["diffusers", "DPMSolverMultistepScheduler"],
                 text_encoder=["transformers", "T5EncoderModel"], tokenizer=["transformers", "T5Tokenizer"],
                 transformer=["diffusers", "Transformer2DModel"], vae=["diffusers", "AutoencoderKL"])
    (path / "model_index.json").write_text(json.dumps(dict(_class_name="PixArtSigmaPipeline", **parts), indent=2))
    return str(path)


def save_tiny_pixel_pipeline(path, seed=0, words=WORDS, patch_size=2):
    """A pixel-space pipeline as diffusers saves one without a VAE: an RGB transformer (learned sigma), no vae/,
    and a model_index.json that states "vae": [null, null]; its toy T5 knows `words`."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import AutoTokenizer, T5EncoderModel
    text = build_toy_text_encoder(str(path / "text"), words, seed, d_model=TEXT_CHANNELS)
    pipeline = PixArtSigmaPipeline(tokenizer=AutoTokenizer.from_pretrained(text, subfolder="tokenizer"),
                                   text_encoder=T5EncoderModel.from_pretrained(text, subfolder="text_encoder"),
                                   vae=None, transformer=tiny_transformer(seed, sample_size=16, in_channels=3,
                                                                patch_size=patch_size),
                                   scheduler=DPMSolverMultistepScheduler())
    pipeline.save_pretrained(path)
    return str(path)
