"""Tiny random PixArt-Sigma pieces for CPU tests: a transformer, a T5 encoder with a SentencePiece
tokenizer trained here, an SDXL-like VAE, saved in the pipeline's folder layout; and a word-level
tokenizer for the tiny CLIP."""
import json

import torch

TEXT_CHANNELS = 24
WORDS = ["a", "cat", "dog", "red", "blue", "on", "the", "grass", "sky", "house", "car", "tree"]
MAX_TOKENS = 12
T5_VOCAB = 30


def tiny_transformer(seed=0, num_layers=3, sample_size=8, in_channels=4):
    """A tiny PixArtTransformer2DModel whose zero-initialised layers are perturbed, so every path matters."""
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
                                     out_channels=2 * in_channels, num_layers=num_layers, cross_attention_dim=32,
                                     sample_size=sample_size, caption_channels=TEXT_CHANNELS)
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


def save_t5_tokenizer(path):
    """T5's tokenizer as the hub's PixArt repos store it: a SentencePiece spiece.model (trained here on
    WORDS, T5's ids: pad 0, eos 1, unk 2) and a tokenizer_config.json naming T5Tokenizer."""
    import sentencepiece
    path.mkdir(parents=True)
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(path / "spiece"), vocab_size=T5_VOCAB,
                                             model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             minloglevel=2)
    corpus.unlink()
    (path / "spiece.vocab").unlink()
    config = dict(tokenizer_class="T5Tokenizer", extra_ids=0, model_max_length=300, eos_token="</s>",
                  pad_token="<pad>", unk_token="<unk>")
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_t5(seed=0):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    config = T5Config(vocab_size=T5_VOCAB, d_model=TEXT_CHANNELS, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                      feed_forward_proj="gated-gelu")
    return T5EncoderModel(config).eval()


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.13025).eval()


def save_tiny_pipeline(path, seed=0, transformer=None):
    """A pipeline folder (transformer/, text_encoder/, tokenizer/, vae/) as the hub's PixArt-Sigma repos lay it out."""
    (transformer or tiny_transformer(seed)).save_pretrained(path / "transformer")
    tiny_t5(seed).save_pretrained(path / "text_encoder")
    save_t5_tokenizer(path / "tokenizer")
    tiny_vae(seed).save_pretrained(path / "vae")
    return str(path)


def save_tiny_pixel_pipeline(path, seed=0):
    """A pixel-space pipeline as diffusers saves one without a VAE: an RGB transformer (learned sigma), no vae/,
    and a model_index.json that states "vae": [null, null]."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import AutoTokenizer
    save_t5_tokenizer(path / "spiece")
    pipeline = PixArtSigmaPipeline(tokenizer=AutoTokenizer.from_pretrained(path / "spiece"), text_encoder=tiny_t5(seed),
                                   vae=None, transformer=tiny_transformer(seed, sample_size=16, in_channels=3),
                                   scheduler=DPMSolverMultistepScheduler())
    pipeline.save_pretrained(path)
    return str(path)
