"""Text-to-image ARD on PixArt-Sigma (diffusers' PixArtTransformer2DModel, T5 text, SDXL VAE).

The student is the class-conditional ARD of ard.py on PixArt's own blocks. The K stages of a
sample sit side by side in the batch (B·K rows of L tokens), so every block's adaLN-single is
applied per stage, once, and its cross-attention reads the sample's text per stage, unchanged.
In the lower N blocks a self-attention processor joins each sample's K·L tokens and lets each
stage attend to the stages the mask lets it see (or, when sampling, appends each stage's keys to
a cache); the upper blocks keep diffusers' processor and see one stage at a time. Stage 0 keeps the transformer's output head;
stages 1..K-1 get copies of it.

Text: prompts are encoded once, as PixArtSigmaPipeline.encode_prompt encodes them, and kept
without their padding (T5 ignores masked tokens, and so does PixArt's cross-attention);
`TextTable` holds them in chunk files, the negative prompt "" last, and pads them back to a
fixed length.
"""
import bisect
import copy
import inspect
import json
import os
import re
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from ard import (StageReadout, check_stage_shape, check_student_settings, full_precision, stage_mask, stage_runs,
                 student_kwargs)
from diffusion import create_diffusion
from models import Autoencoder, KVCache, StageKeys, describe_checkpoint, guided_output, load_state_dict_strict, \
    unpatchify, weights_sha256
from utils import atomic_write, save_json

PIXART_SIGMA = {512: "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", 1024: "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}
TEXT_TOKENS = 300  # PixArt-Sigma's max_sequence_length
CFG_SCALE = 4.5  # PixArt-Sigma's default guidance
TRANSFORMER_CLASS = "PixArtTransformer2DModel"
# PixArt-Sigma's T5, tokenizer and SDXL VAE, which its own README loads beside a transformer-only repository (the
# hub's PixArt-Sigma-XL-2-512-MS holds only transformer/): where a teacher without them takes them by default.
COMPONENTS = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"


def sigma_config(resolution):
    """PixArt-Sigma-XL/2's transformer config (as in the hub repos above) at 512 or 1024 pixels."""
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                cross_attention_dim=1152, sample_size=resolution // 8, patch_size=2, caption_channels=4096,
                use_additional_conditions=False)


# ---------------------------------------------------------------------------- loading

def _from_pretrained(load, source, subfolder, **kwargs):
    """load(source, subfolder=subfolder) (a from_pretrained or load_config) with an error that says what to do offline."""
    try:
        return load(source, subfolder=subfolder, **kwargs)
    except OSError as e:
        raise unavailable(source, subfolder, e.__class__.__name__) from None


def unavailable(source, subfolder, cause):
    return FileNotFoundError(f"could not load {subfolder!r} of {source!r} ({cause}); when offline, pass local folders: "
                             f"the teacher's with transformer/, and for --text-encoder and --vae ones with "
                             f"text_encoder/ and tokenizer/, and vae/")


def holds_vae(source):
    """Whether `source` (a folder or hub name) has a vae/."""
    from diffusers import AutoencoderKL
    try:
        AutoencoderKL.load_config(source, subfolder="vae")
    except OSError:
        return False
    return True


def pipeline_index(source):
    """`source`'s model_index.json; {} where it has none (a transformer-only repository)."""
    from diffusers import DiffusionPipeline
    try:
        return DiffusionPipeline.load_config(source)
    except OSError:
        return {}


def pipeline_vae(source, vae=None):
    """What the teacher's images live in: `vae` when given (a folder or hub name with vae/, or "none": pixel space);
    else "none" when `source`'s model_index.json states the VAE absent, as diffusers writes an absent component
    ("vae": [null, null]), `source` itself when it holds vae/, or COMPONENTS. Reads configs only."""
    from diffusers import AutoencoderKL
    if vae is None:
        if pipeline_index(source).get("vae") == [None, None]:
            return "none"
        vae = source if holds_vae(source) else COMPONENTS
    if vae != "none":
        _from_pretrained(AutoencoderKL.load_config, vae, "vae")
    return str(vae)


def t5_config(source):
    """The T5Config of `source`'s text_encoder/; None where it has none (transformers reads a missing one as {})."""
    from transformers import T5Config
    try:
        config, _ = T5Config.get_config_dict(source, subfolder="text_encoder")
    except OSError:
        return None
    return T5Config.from_dict(config) if config else None


def pipeline_text_encoder(source, text_encoder=None):
    """(where the teacher's T5 and tokenizer come from, the T5's config): `text_encoder` when given, else `source`
    when it holds text_encoder/, else COMPONENTS. Reads configs only."""
    if text_encoder is None:
        text_encoder = source if t5_config(source) else COMPONENTS
    config = t5_config(text_encoder)
    if config is None:
        raise unavailable(text_encoder, "text_encoder", "no T5 config")
    return str(text_encoder), config


def check_pixart(source, text_encoder=None, vae=None):
    """(the transformer's config, {"text_encoder", "vae"}: where its T5 and tokenizer, and its VAE, come from;
    pipeline_text_encoder, pipeline_vae) of a PixArt teacher, raising unless `source` (a hub name or a folder)
    holds a PixArt transformer and they fit it. Reads configs only."""
    from diffusers import AutoencoderKL
    config = checked_transformer_config(source)
    text_encoder, t5 = pipeline_text_encoder(source, text_encoder)
    if t5.d_model != config["caption_channels"]:
        raise ValueError(f"the text encoder of {text_encoder} gives {t5.d_model}-channel embeddings; the transformer "
                         f"of {source} takes {config['caption_channels']}")
    vae = pipeline_vae(source, vae)
    latent_channels = config["in_channels"] if vae == "none" else AutoencoderKL.load_config(vae, subfolder="vae").get(
        "latent_channels")
    if latent_channels != config["in_channels"]:
        raise ValueError(f"the VAE of {vae} has {latent_channels} latent channels; the transformer of {source} "
                         f"takes {config['in_channels']}")
    return config, dict(text_encoder=text_encoder, vae=vae)


def transformer_class(config):
    """The class diffusers loads a transformer/ config as: a legacy Transformer2DModel (the hub's PixArt-Sigma uploads)
    as the class its norm_type maps to in diffusers' own remapping ("ada_norm_single": PixArt's)."""
    from diffusers.models.model_loading_utils import _CLASS_REMAPPING_DICT
    name = config.get("_class_name")
    return _CLASS_REMAPPING_DICT.get(name, {}).get(config.get("norm_type"), name)


def checked_transformer_config(source):
    """The config of `source`'s transformer/, which must be a learned-sigma PixArt transformer."""
    from diffusers import PixArtTransformer2DModel
    config = _from_pretrained(PixArtTransformer2DModel.load_config, source, "transformer")
    if transformer_class(config) != TRANSFORMER_CLASS:
        raise ValueError(f"{source}: the teacher must be a {TRANSFORMER_CLASS}, its transformer/ is a "
                         f"{config.get('_class_name')!r}")
    if config.get("out_channels") != 2 * config.get("in_channels", 4):
        raise ValueError(f"{source}: expected a learned-sigma transformer (out_channels = 2 x in_channels), got "
                         f"{config.get('out_channels')} and {config.get('in_channels')}")
    return config


def public_config(config):
    """A PixArt transformer's diffusers config as plain JSON-able fields: its constructor's arguments, without the
    bookkeeping entries (_class_name, ...) or the other fields of a legacy Transformer2DModel config."""
    from diffusers import PixArtTransformer2DModel
    arguments = inspect.signature(PixArtTransformer2DModel.__init__).parameters
    return {k: v for k, v in dict(config).items() if k in arguments}


def load_pixart(source, text_encoder=None, vae=None):
    """(PixArt transformer in eval mode, its description) from a hub name or a local pipeline folder, with its text
    encoder and VAE from `source` or the sources given (check_pixart)."""
    from diffusers import PixArtTransformer2DModel
    _, sources = check_pixart(source, text_encoder, vae)  # before any weights are read
    transformer = _from_pretrained(PixArtTransformer2DModel.from_pretrained, source, "transformer").eval()
    config = public_config(transformer.config)
    size = config["sample_size"]
    info = dict(family="pixart", teacher=str(source), pixart=config, shape=[config["in_channels"], size, size],
                weights_sha256=weights_sha256(transformer), **sources)
    return transformer, info


def load_vae(source):
    """The pipeline's VAE (vae/) with its own scaling factor (SDXL's 0.13025 for PixArt-Sigma); "none": pixel
    space (pipeline_vae)."""
    from diffusers import AutoencoderKL
    if source == "none":
        return Autoencoder()
    vae = _from_pretrained(AutoencoderKL.from_pretrained, source, "vae").eval()
    return Autoencoder(vae, vae.config.scaling_factor)


class PromptEncoder:
    """Prompts -> T5 embeddings as PixArt-Sigma's pipeline makes them (its encode_prompt without caption
    cleaning: lower-cased, stripped, at most `max_tokens` tokens), each cut to its real tokens. `encode` pads
    a batch to its own longest prompt, not to 300 tokens: T5 masks the padding, so the embeddings are the
    pipeline's (up to rounding) at a fraction of the cost, and it keeps nothing (extraction streams every
    prompt through it in fixed batches). A call encodes each prompt it has not seen alone and keeps it, so a
    prompt's embedding does not depend on which prompts came with it (nor on the world size); sampling holds
    the embeddings of its distinct prompts."""

    def __init__(self, source, device, max_tokens=TEXT_TOKENS):
        from transformers import AutoTokenizer, T5EncoderModel
        self.tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, "tokenizer")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # T5-XXL: 9.5 GB in bf16
        self.encoder = _from_pretrained(T5EncoderModel.from_pretrained, source, "text_encoder",
                                        dtype=dtype).to(device).eval()
        self.device, self.max_tokens, self.known = device, max_tokens, {}

    @torch.no_grad()
    def encode(self, prompts):
        tokens = self.tokenizer([p.lower().strip() for p in prompts], padding="longest", max_length=self.max_tokens,
                                truncation=True, add_special_tokens=True, return_tensors="pt").to(self.device)
        embeddings = self.encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        return [e[: int(m.sum())].float().cpu() for e, m in zip(embeddings, tokens.attention_mask)]

    def __call__(self, prompts):
        for prompt in dict.fromkeys(prompts):
            if prompt not in self.known:
                self.known[prompt] = self.encode([prompt])[0]
        return [self.known[p] for p in prompts]


def build_toy_text_encoder(path, words, seed=0, d_model=64):
    """A toy T5 text encoder in a pipeline's layout (`path`/tokenizer, `path`/text_encoder), the same files
    for the same arguments: a word-level SentencePiece model over `words` (one token per word, no
    normalisation, T5's ids: pad 0, eos 1, unk 2) with a tokenizer_config.json naming T5Tokenizer, as the
    hub's repos store it; and a random T5 encoder (T5 v1.1's gated GELU, 2 layers, `d_model` wide). Frozen, it
    tells prompts apart by their words, which is all a toy needs of it."""
    import io
    import sentencepiece
    from transformers import T5Config, T5EncoderModel
    vocabulary = sorted(set(words))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(vocabulary)]), model_writer=model, model_type="word",
        vocab_size=len(vocabulary) + 3, normalization_rule_name="identity", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, minloglevel=2)
    tokenizer = os.path.join(path, "tokenizer")
    os.makedirs(tokenizer, exist_ok=True)
    with open(os.path.join(tokenizer, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    save_json(dict(tokenizer_class="T5Tokenizer", extra_ids=0, model_max_length=TEXT_TOKENS, eos_token="</s>",
                   pad_token="<pad>", unk_token="<unk>"), os.path.join(tokenizer, "tokenizer_config.json"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = T5EncoderModel(T5Config(vocab_size=len(vocabulary) + 3, d_model=d_model, d_kv=d_model // 4,
                                          d_ff=2 * d_model, num_layers=2, num_heads=4,
                                          feed_forward_proj="gated-gelu"))
    encoder.eval().save_pretrained(os.path.join(path, "text_encoder"))
    return path


def read_prompts(path):
    """Prompts from a text file (one per line, blank lines skipped) or a COCO captions JSON
    (its annotations' captions, in file order)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the prompt file {path}: {e}") from None
    if path.endswith(".json"):
        try:
            prompts = [a["caption"].strip() for a in json.loads(text)["annotations"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a COCO captions file (annotations with a caption each): "
                             f"{e.__class__.__name__}: {e}") from None
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"the prompt file {path} holds no prompts")
    return prompts


# ---------------------------------------------------------------------------- the text table

def pad_text(embedding, length):
    """(text (length, C), mask (length,)): a prompt's embedding (tokens, C) padded with zeros."""
    text = embedding.new_zeros(length, embedding.shape[1])
    text[: len(embedding)] = embedding
    return text, torch.arange(length, device=embedding.device) < len(embedding)


def pad_texts(embeddings):
    """(text (n, T, C), mask (n, T)) of prompt embeddings, padded to the longest."""
    length = max(len(e) for e in embeddings)
    texts, masks = zip(*(pad_text(e, length) for e in embeddings))
    return torch.stack(texts), torch.stack(masks)


def text_chunk_path(directory, chunk):
    return os.path.join(directory, f"chunk_{chunk:05d}.safetensors")


def write_text_chunk(path, embeddings):
    """One safetensors file of variable-length embeddings: their rows end to end and the offsets."""
    offsets = torch.tensor([0] + [len(e) for e in embeddings]).cumsum(0)
    tensors = {"embeddings": torch.cat(embeddings).half().contiguous(), "offsets": offsets}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


class TextTable:
    """Embeddings of the prompts, the negative prompt last (index `null`), each returned padded
    with zeros to `length` tokens with its mask; read from the chunk files of `directory`
    (chunk_00000.safetensors, ... in prompt order), each memory-mapped."""

    def __init__(self, directory):
        names = sorted(n for n in os.listdir(directory) if re.fullmatch(r"chunk_\d{5}\.safetensors", n)) \
            if os.path.isdir(directory) else []
        if not names or names[-1] != os.path.basename(text_chunk_path(directory, len(names) - 1)):
            raise FileNotFoundError(f"incomplete text table in {directory} ({len(names)} chunk files, not numbered "
                                    f"from 0 without gaps): re-run extract_trajectories.py to complete it")
        self.directory, self._files, offsets = directory, {}, []
        for name in names:
            with safe_open(os.path.join(directory, name), "pt") as f:
                offsets.append(f.get_tensor("offsets"))
                self.channels = f.get_slice("embeddings").get_shape()[1]
        self.offsets = offsets
        self.starts = [0, *torch.tensor([len(o) - 1 for o in offsets]).cumsum(0).tolist()]
        lengths = torch.cat([o.diff() for o in offsets])
        self.null, self.length = len(lengths) - 1, int(lengths.max())

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"prompt {index} of a text table of {len(self)}")
        chunk = bisect.bisect_right(self.starts, index) - 1
        if chunk not in self._files:  # opened lazily: each DataLoader worker maps the files itself
            self._files[chunk] = safe_open(text_chunk_path(self.directory, chunk), "pt")
        offsets, local = self.offsets[chunk], index - self.starts[chunk]
        start, end = int(offsets[local]), int(offsets[local + 1])
        return pad_text(self._files[chunk].get_slice("embeddings")[start:end].float(), self.length)

    def batch(self, indices):
        """(text (n, length, C), mask (n, length)) of the prompts at `indices`."""
        texts, masks = zip(*(self[int(i)] for i in indices))
        return torch.stack(texts), torch.stack(masks)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}


# ---------------------------------------------------------------------------- teacher

def text_conditioning(transformer, text, text_mask):
    """(projected text (B, T, D), additive cross-attention bias (B, 1, T)) as PixArt's forward makes them."""
    bias = (1 - text_mask.to(text.dtype)) * -10000.0
    return transformer.caption_projection(text), bias.unsqueeze(1)


def toy_config(image_size, in_channels, caption_channels, depth=4, hidden_size=128, num_heads=4, patch_size=2):
    """A small PixArtTransformer2DModel config in PixArt-Sigma's layout (learned sigma, no size conditioning),
    for teachers trained here."""
    return dict(num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=in_channels,
                out_channels=2 * in_channels, num_layers=depth, cross_attention_dim=hidden_size,
                sample_size=image_size, patch_size=patch_size, caption_channels=caption_channels,
                use_additional_conditions=False)


def teacher_solver(transformer, sampler, steps, cfg_scale, clip_denoised, progress=False):
    """(run(noise, text, mask) -> samples, guided): the teacher's DDIM or DDPM solve; under CFG (`guided`)
    the rows of text and mask after the first len(noise) are the negative prompt's."""
    diffusion = create_diffusion(str(steps))
    loop = {"ddim": diffusion.ddim_sample_loop, "ddpm": diffusion.p_sample_loop}[sampler]
    model_fn, guided = guided_teacher(transformer, cfg_scale), cfg_scale > 1

    def run(noise, text, mask):
        z = torch.cat([noise, noise]) if guided else noise
        return loop(model_fn, z.shape, z, clip_denoised=clip_denoised, model_kwargs=dict(text=text, text_mask=mask),
                    progress=progress)[: len(noise)]
    return run, guided


def export_pipeline(checkpoint, checkpoint_path, out, half=False):
    """A PixArt teacher checkpoint's EMA weights (`checkpoint`: its {"ema", "args"}, of `checkpoint_path`) as a
    pipeline folder in the hub's layout (transformer/, text_encoder/ and tokenizer/ from its text encoder,
    scheduler/, and a model_index.json stating pixel space: "vae": [null, null]), which extraction, training
    and sampling take like a hub name. With `half` the transformer is stored in float16 (it loads back as
    float32, as every pipeline here)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel
    out = os.path.normpath(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists: export a pipeline into a new folder")
    args = checkpoint["args"]
    transformer = PixArtTransformer2DModel(**args["pixart"])
    load_state_dict_strict(transformer, checkpoint["ema"], checkpoint_path)
    if half:
        transformer.half()
    text = args["text_encoder"]
    pipeline = PixArtSigmaPipeline(tokenizer=AutoTokenizer.from_pretrained(text, subfolder="tokenizer"),
                                   text_encoder=T5EncoderModel.from_pretrained(text, subfolder="text_encoder"),
                                   vae=None, transformer=transformer.eval(), scheduler=DPMSolverMultistepScheduler())
    tmp = f"{out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp)
    os.replace(tmp, out)  # readers see the whole folder or none


def guided_teacher(transformer, cfg_scale):
    """model_fn(x, t, text, text_mask) for the DDIM solver: PixArt's output (eps and learned sigma);
    with cfg_scale > 1 the batch's second half holds the negative prompt and the eps channels of
    both halves are the guided ones (PixArt guides every channel)."""
    def model_fn(x, t, text, text_mask):
        out = transformer(x, encoder_hidden_states=text, encoder_attention_mask=text_mask, timestep=t).sample
        return out if cfg_scale == 1 else guided_output(out, cfg_scale, x.shape[1])
    return model_fn


# ---------------------------------------------------------------------------- student

class StageAttention:
    """Self-attention processor of the history blocks (diffusers' processor interface).

    Teacher forcing (`cache` None): the batch holds the K stages of each sample as consecutive
    rows, which are joined into one sequence of K·L tokens attended to stage by stage (`keys`, a
    models.StageKeys). Sampling: the rows are
    one stage, whose keys/values are appended to `cache`, and the queries read what it returns.
    """

    def __init__(self):
        self.num_steps, self.keys, self.cache = 1, None, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        rows, L, D = hidden_states.shape
        batch, tokens = (rows, L) if self.cache is not None else (rows // self.num_steps, self.num_steps * L)
        q, k, v = (proj(hidden_states).view(batch, tokens, attn.heads, -1).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        if self.cache is None:
            x = self.keys(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, *self.cache.append(k, v))
        return attn.to_out[1](attn.to_out[0](x.transpose(1, 2).reshape(rows, L, D)))


class StageHead(nn.Module):
    """A copy of PixArt's output head: its modulation table and projection (its norm has no weights)."""

    def __init__(self, transformer):
        super().__init__()
        self.scale_shift_table = nn.Parameter(transformer.scale_shift_table.detach().clone())
        self.proj_out = copy.deepcopy(transformer.proj_out)


class PixArtARD(nn.Module):
    """ARD student initialised from (a copy of) a PixArt transformer; see the module docstring.

    The arguments are ard.ARD's. The transformer's weights keep diffusers' names under
    `transformer.`, so a teacher's state dict loads into it as it is (`load_teacher_weights`).
    """

    constant_buffers = True  # stage times, the transformer's positions (see train.distributed)

    def __init__(self, teacher, num_steps=4, history_layers=6, mask="M4", stage_times=None, teacher_steps=25,
                 shared_head=False, parametrization="direct", target="state", clip_x0=False,
                 history_input="trajectory"):
        super().__init__()
        if type(teacher).__name__ != TRANSFORMER_CLASS:
            raise TypeError(f"the teacher must be a diffusers {TRANSFORMER_CLASS}, got {type(teacher).__name__}")
        if teacher.use_additional_conditions:
            raise ValueError("teachers with resolution/aspect-ratio conditions (PixArt-alpha 1024) are not supported; "
                             "PixArt-Sigma has none")
        stage_times = check_student_settings(num_steps, history_layers, len(teacher.transformer_blocks), stage_times,
                                             teacher_steps, parametrization, target, history_input)
        if history_input != "trajectory":
            raise ValueError(f"history_input {history_input!r}: the zero-history control is the DiT student's "
                             "(a study control); the PixArt student's history is its trajectory")
        self.settings = dict(num_steps=num_steps, history_layers=history_layers, mask=mask,
                             stage_times=stage_times, shared_head=shared_head, parametrization=parametrization,
                             target=target, clip_x0=clip_x0, history_input=history_input)
        self.readout = StageReadout(parametrization, target, stage_times, clip_x0)
        self.pixart_config = public_config(teacher.config)
        self.num_steps, self.history_layers = num_steps, history_layers
        self.in_channels, self.patch_size = teacher.config.in_channels, teacher.config.patch_size
        self.input_size = teacher.config.sample_size
        self.grad_checkpointing = False

        self.transformer = copy.deepcopy(teacher)
        self.extra_heads = nn.ModuleList([StageHead(teacher) for _ in range(0 if shared_head else num_steps - 1)])
        self.register_buffer("stage_times", torch.tensor(stage_times), persistent=False)
        self.tokens = (self.input_size // self.patch_size) ** 2
        self.history_keys = StageKeys(stage_runs(stage_mask(mask, num_steps)), self.tokens)
        self.history = [StageAttention() for _ in range(history_layers)]
        for block, processor in zip(self.transformer.transformer_blocks, self.history):
            block.attn1.set_processor(processor)

    def load_teacher_weights(self, state_dict, source="teacher state dict"):
        """A diffusers state dict of the teacher, loaded strictly; every stage head starts as its head again."""
        load_state_dict_strict(self.transformer, state_dict, source)
        for head in self.extra_heads:
            head.load_state_dict(StageHead(self.transformer).state_dict())
        return self

    # ------------------------------------------------------------------ pieces

    def stage_conditioning(self, repeats):
        """adaLN-single of the K stage times in fp32, once per stage: (timestep (repeats·K, 6D), embedded
        (repeats·K, D)), row r·K + k for stage k."""
        with full_precision(self.stage_times.device):
            t, embedded = self.transformer.adaln_single(self.stage_times, None, batch_size=self.num_steps,
                                                        hidden_dtype=self.transformer.pos_embed.proj.weight.dtype)
        return t.repeat(repeats, 1), embedded.repeat(repeats, 1)

    def head(self, x, embedded_t, k, stage_input):
        """Stage k's prediction (B, C, H, W), in fp32, from its tokens (B, L, D) and its input (B, C, H, W),
        through the first C of the 2C channels and the readout."""
        head = self.transformer if k == 0 or not self.extra_heads else self.extra_heads[k - 1]
        with full_precision(x.device):
            shift, scale = (head.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
            x = self.transformer.norm_out(x.float()) * (1 + scale) + shift
            out_channels = self.transformer.out_channels
            raw = unpatchify(head.proj_out(x), self.patch_size, out_channels)[:, : self.in_channels]
            return self.readout(raw, stage_input, k)

    def run_block(self, block, x, t, text, bias):
        if self.grad_checkpointing and self.training:
            return checkpoint(block, x, None, text, bias, t, use_reentrant=False)
        return block(x, encoder_hidden_states=text, encoder_attention_mask=bias, timestep=t)

    def check_inputs(self, x, text, text_mask, what, with_stages):
        check_stage_shape(self, x, what, with_stages)
        channels = self.pixart_config["caption_channels"]
        if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[2] != channels:
            raise ValueError(f"text must be (B={x.shape[0]}, T, {channels}), got {tuple(text.shape)}")
        if tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")

    def use_history(self, caches=None):
        """Sets the history blocks' processors: teacher forcing (no caches), or a sampling step's caches."""
        for i, processor in enumerate(self.history):
            processor.num_steps, processor.keys = self.num_steps, self.history_keys
            processor.cache = None if caches is None else caches[i]

    # ------------------------------------------------------------------ teacher forcing

    def forward(self, stages, text, text_mask):
        """Teacher-forced predictions (B, K, C, H, W) of all K stages from their inputs (B, K, C, H, W)
        (x_T first), the T5 text (B, T, C_text) and its mask (B, T)."""
        self.check_inputs(stages, text, text_mask, "stages", with_stages=True)
        B, K = stages.shape[:2]
        x = self.transformer.pos_embed(stages.flatten(0, 1))  # (B·K, L, D)
        t, embedded_t = self.stage_conditioning(B)
        text, bias = (c.repeat_interleave(K, dim=0) for c in text_conditioning(self.transformer, text, text_mask))
        self.use_history()
        for block in self.transformer.transformer_blocks:
            x = self.run_block(block, x, t, text, bias)
        x, embedded_t = x.unflatten(0, (B, K)), embedded_t.unflatten(0, (B, K))
        return torch.stack([self.head(x[:, k], embedded_t[:, k], k, stages[:, k]) for k in range(K)], dim=1)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def sample(self, noise, text, text_mask, steps=None):
        """K-step generation from noise (B, C, H, W); every stage's output (B, K, C, H, W), the last
        the sample. As ard.ARD.sample: each step runs its own L tokens, the history blocks cache keys."""
        self.check_inputs(noise, text, text_mask, "noise", with_stages=False)
        B, K, L = noise.shape[0], self.num_steps, self.tokens
        t_all, embedded_all = self.stage_conditioning(1)
        text, bias = text_conditioning(self.transformer, text, text_mask)
        caches = [KVCache(capacity=K * L) for _ in self.history]
        x_in, outputs = noise, []
        for k, runs in enumerate(self.history_keys.runs[:steps]):
            for cache in caches:
                cache.visible = runs
            self.use_history(caches)
            x = self.transformer.pos_embed(x_in)
            t = t_all[k:k + 1].expand(B, -1)
            for block in self.transformer.transformer_blocks:
                x = block(x, encoder_hidden_states=text, encoder_attention_mask=bias, timestep=t)
            x_in = self.head(x, embedded_all[k:k + 1].expand(B, -1), k, x_in)
            outputs.append(x_in)
        self.use_history()
        return torch.stack(outputs, dim=1)


def build_student(pixart_config, args):
    """A PixArtARD of the architecture in `pixart_config` (random weights) with a checkpoint's settings."""
    from diffusers import PixArtTransformer2DModel
    return PixArtARD(PixArtTransformer2DModel.from_config(pixart_config), **student_kwargs(args))


def load_student(path):
    """A PixArt student (eval mode, EMA weights) and its checkpoint args, from one of our checkpoints."""
    found = describe_checkpoint(path)
    args = found.settings
    if found.kind != "student" or args.get("family") != "pixart":
        raise ValueError(f"{path} is not a text-to-image ARD checkpoint (a {found.kind} checkpoint)")
    model = build_student(args["pixart"], args)
    return load_state_dict_strict(model, found.state_dict, source=str(path)).eval(), args


# ---------------------------------------------------------------------------- cost

def gflops(config, num_steps=1, history_layers=0, text_tokens=TEXT_TOKENS, mask="M4"):
    """GFLOPs (multiply-accumulates) of one image: K stage passes of L tokens, each with
    cross-attention to `text_tokens` T5 tokens, the history attention of the lower N blocks and
    one caption projection. num_steps=1 is one teacher forward. The T5 encoder is not counted."""
    D = config["num_attention_heads"] * config["attention_head_dim"]
    p, C, depth = config["patch_size"], config["in_channels"], config["num_layers"]
    L, T = (config["sample_size"] // p) ** 2, text_tokens
    block = (4 * L * D * D + 2 * L * L * D  # self-attention
             + 2 * L * D * D + 2 * T * D * D + 2 * L * T * D  # cross-attention
             + 8 * L * D * D)  # MLP (4x)
    stage = (L * p * p * C * D + 256 * D + D * D + 6 * D * D  # patch embedding, adaLN-single
             + depth * block + L * D * p * p * config["out_channels"])
    caption = T * (config["caption_channels"] * D + D * D)
    earlier_visible = int(stage_mask(mask, num_steps).sum()) - num_steps
    history = history_layers * 2 * L * L * D * earlier_visible
    return (num_steps * stage + caption + history) / 1e9


def teacher_gflops(config, steps, cfg_scale=CFG_SCALE, text_tokens=TEXT_TOKENS):
    """GFLOPs of the teacher's `steps`-step solve of one image; CFG doubles every forward."""
    return steps * (2 if cfg_scale > 1 else 1) * gflops(config, text_tokens=text_tokens)
