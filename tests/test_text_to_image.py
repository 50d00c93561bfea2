"""Text-to-image through the scripts on a tiny random PixArt pipeline saved to disk (CPU, offline):
extraction from a prompt file (1 process and 2 gloo processes), training and its resume,
sampling, the CLIP score, and the bad inputs that must stop before any expensive work."""
import json
import math
import os
import shutil
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import extract_trajectories as et
import pixart
import sample
import sample_ddp
import train
from diffusion import create_diffusion, student_timesteps
from models import read_checkpoint
from evaluations import clip_score
from tiny_pixart import (MAX_TOKENS, WORDS, save_tiny_components, save_tiny_pipeline, save_tiny_pixel_pipeline,
                         save_tiny_transformer_only, tiny_tokenizer, tiny_transformer)
from utils import index_noise_and_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red car", "the cat on the grass", "a blue house", "a dog", "the tree on the sky"]
K, S, SEED, NUM_SAMPLES, SHARD_SIZE, BATCH_SIZE, NUM_SHARDS = 4, 6, 3, 12, 4, 3, 3
TEXT_CHUNK = 2  # 5 prompts and the negative one: 3 chunks, so 2 processes share the encoding


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pixart") / "pipeline")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")  # a blank line is skipped
    return str(path)


def extract_argv(pipeline, prompts, out, *extra):
    return ["--prompts", prompts, "--ckpt", pipeline, "--out", str(out), "--num-samples", str(NUM_SAMPLES),
            "--shard-size", str(SHARD_SIZE), "--batch-size", str(BATCH_SIZE), "--num-steps", str(K),
            "--teacher-steps", str(S), "--seed", str(SEED), "--text-chunk", str(TEXT_CHUNK), *map(str, extra)]


@pytest.fixture(scope="module")
def single(pipeline, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "traj"
    et.main(extract_argv(pipeline, prompt_file, out))
    return str(out)


def contents(directory):
    """{relative path: bytes} of every file under `directory`."""
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def must_not_run(*args, **kwargs):
    raise AssertionError("expensive work started before the error")


# ---------------------------------------------------------------------------- extraction

def test_two_processes_write_the_same_bytes_as_one(single, pipeline, prompt_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "extract_trajectories.py"), *extract_argv(pipeline, prompt_file, tmp_path / "traj"),
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    expected = ["meta.json", "prompts.json", *[f"text/chunk_{c:05d}.safetensors" for c in range(3)],
                *[f"shard_{i:05d}.safetensors" for i in range(3)]]
    assert sorted(contents(single)) == sorted(expected)
    assert contents(single) == contents(tmp_path / "traj")
    os.remove(tmp_path / "traj" / "text" / "chunk_00001.safetensors")  # a re-run: one rank has nothing to encode
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert contents(single) == contents(tmp_path / "traj")


def test_resume_writes_only_the_missing_shard_and_encodes_nothing(single, pipeline, prompt_file, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "traj"
    shutil.copytree(single, out)
    os.remove(out / "shard_00001.safetensors")
    written = []
    write = et.atomic_write
    monkeypatch.setattr(et, "atomic_write", lambda path, fn: (written.append(os.path.basename(path)), write(path, fn)))
    monkeypatch.setattr(pixart, "PromptEncoder", must_not_run)
    et.main(extract_argv(pipeline, prompt_file, out))
    assert written == ["shard_00001.safetensors"]
    assert contents(out) == contents(single)


def test_resume_encodes_only_the_missing_text_chunk(single, pipeline, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "traj"
    shutil.copytree(single, out)
    os.remove(out / "text" / "chunk_00001.safetensors")
    encoded = []
    encode = pixart.PromptEncoder.encode
    monkeypatch.setattr(pixart.PromptEncoder, "encode", lambda self, p: (encoded.append(list(p)), encode(self, p))[1])
    et.main(extract_argv(pipeline, prompt_file, out))
    assert encoded == [PROMPTS[2:4]] and contents(out) == contents(single)
    os.remove(out / "text" / "chunk_00000.safetensors")
    with pytest.raises(FileNotFoundError, match="not numbered from 0 without gaps"):
        pixart.TextTable(str(out / "text"))


def test_trajectories_with_the_single_file_text_table_stop(single, tmp_path):
    out = tmp_path / "traj"
    shutil.copytree(single, out)
    meta = json.loads((out / "meta.json").read_text())
    del meta["text_chunk"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="before the chunked text table"):
        et.TrajectoryDataset(str(out))


def test_a_rank_holds_one_text_chunk_at_a_time(pipeline, prompt_file, tmp_path, monkeypatch):
    """Every embedding the encoder returns is tracked; when a chunk is written (and when the next batch is
    encoded) no more than one chunk's embeddings are alive."""
    alive, peaks = weakref.WeakSet(), []
    encode, write = pixart.PromptEncoder.encode, pixart.write_text_chunk

    def tracked_encode(self, prompts):
        peaks.append(len(alive))
        embeddings = encode(self, prompts)
        alive.update(embeddings)
        return embeddings

    def tracked_write(path, embeddings):
        peaks.append(len(alive))
        write(path, embeddings)
    monkeypatch.setattr(pixart.PromptEncoder, "encode", tracked_encode)
    monkeypatch.setattr(pixart, "write_text_chunk", tracked_write)
    et.main(extract_argv(pipeline, prompt_file, tmp_path / "traj", "--text-chunk", 4, "--batch-size", 2,
                         "--num-samples", 4))
    assert len(peaks) == 2 + 1 + 2 and max(peaks) == 4  # chunk 0: 2 batches, a write; chunk 1 (2 texts): 1, 1
    assert peaks[3] == 0  # chunk 0's embeddings are gone before chunk 1 is encoded


def test_toy_text_encoder_is_rebuilt_byte_for_byte_and_gives_one_token_a_word(tmp_path):
    a, b = (pixart.build_toy_text_encoder(str(tmp_path / name), WORDS, seed=3) for name in ("a", "b"))
    assert contents(a) == contents(b) and contents(a) != contents(pixart.build_toy_text_encoder(
        str(tmp_path / "c"), WORDS, seed=4))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(a, subfolder="tokenizer")
    ids = tokenizer("the cat on the grass").input_ids
    assert len(ids) == 6 and ids[-1] == 1 and len(set(ids[:-1])) == 4 and 2 not in ids  # 5 words, eos; no unk
    assert tokenizer("a zebra").input_ids[1] == 2  # a word outside the vocabulary is unk


def test_prompt_encoder_is_the_pipelines_encode_prompt_and_encodes_a_prompt_once(pipeline, monkeypatch):
    from diffusers import PixArtSigmaPipeline
    encoder = pixart.PromptEncoder(pipeline, torch.device("cpu"))
    reference = PixArtSigmaPipeline(tokenizer=encoder.tokenizer, text_encoder=encoder.encoder, vae=None,
                                    transformer=None, scheduler=None)
    prompts = [PROMPTS[1], " A Dog ", "", PROMPTS[1]]
    full, mask = reference.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                         max_sequence_length=pixart.TEXT_TOKENS, clean_caption=False)[:2]
    calls = []
    encode = pixart.PromptEncoder.encode
    monkeypatch.setattr(pixart.PromptEncoder, "encode", lambda self, p: (calls.append(list(p)), encode(self, p))[1])
    got = encoder(prompts)
    for e, f, m in zip(got, full, mask):
        torch.testing.assert_close(e, f[: int(m.sum())], rtol=1e-5, atol=1e-6)
    assert encoder(prompts[:2])[0] is got[0] and calls == [[PROMPTS[1]], [" A Dog "], [""]]


@pytest.fixture(scope="module")
def pixel_pipeline(tmp_path_factory):
    return save_tiny_pixel_pipeline(tmp_path_factory.mktemp("pixel") / "pipeline")


def test_pixel_space_is_stated_and_clips_like_every_pixel_teacher(pixel_pipeline, pipeline, prompt_file, tmp_path):
    assert (pixart.pipeline_vae(pixel_pipeline), pixart.pipeline_vae(pipeline)) == ("none", pipeline)
    out = tmp_path / "traj"
    et.main(extract_argv(pixel_pipeline, prompt_file, out))
    meta = json.load(open(out / "meta.json"))
    assert (meta["vae"], meta["clip_denoised"], meta["shape"]) == ("none", True, [3, 16, 16])
    final = load_file(out / "shard_00000.safetensors")["state"][:, -1].float()
    assert final.abs().max() <= 1  # DDIM's last step returns the clipped x0-prediction
    grid = tmp_path / "grid.png"
    sample.main(["--ckpt", pixel_pipeline, "--sampler", "ddim", "--num-sampling-steps", "3", "--prompt", PROMPTS[0],
                 "--out", str(grid), "--device", "cpu"])
    assert grid.stat().st_size > 0


def test_a_pipeline_without_vae_or_t5_whose_default_source_is_unreachable_stops_before_any_weights(pipeline, tmp_path,
                                                                                                  monkeypatch):
    """Neither latent (vae/) nor stated pixel space, or without text_encoder/: the piece comes from pixart.COMPONENTS
    (here a folder that is not there, as the hub offline), and its error names it."""
    from diffusers import PixArtTransformer2DModel
    monkeypatch.setattr(PixArtTransformer2DModel, "from_pretrained", must_not_run)
    monkeypatch.setattr(pixart, "COMPONENTS", str(tmp_path / "offline"))
    for piece in ("vae", "text_encoder"):
        partial = tmp_path / f"without-{piece}"
        shutil.copytree(pipeline, partial)
        shutil.rmtree(partial / piece)
        with pytest.raises(FileNotFoundError,
                           match=f"could not load '{piece}' of '.*offline'.*--text-encoder and --vae"):
            pixart.load_pixart(str(partial))


@pytest.fixture(scope="module")
def hub_split(tmp_path_factory):
    """save_tiny_pipeline's pieces laid out as the hub's two repositories: (transformer-only, components)."""
    hub = tmp_path_factory.mktemp("hub")
    return (save_tiny_transformer_only(hub / "PixArt-Sigma-XL-2-512-MS"),
            save_tiny_components(hub / "pixart_sigma_sdxlvae_T5_diffusers"))


def test_the_hubs_transformer_only_repository_extracts_the_whole_pipelines_trajectories(single, hub_split, prompt_file,
                                                                                       tmp_path, monkeypatch):
    """A transformer-only repository whose config is diffusers' legacy Transformer2DModel, with its T5, tokenizer and
    VAE from --text-encoder and --vae, or by default from pixart.COMPONENTS (here the local components folder), gives
    the whole pipeline's trajectories byte for byte; its meta differs only in where each piece came from."""
    transformer, components = hub_split
    monkeypatch.setattr(pixart, "COMPONENTS", components)
    whole = json.load(open(os.path.join(single, "meta.json")))
    for name, flags in (("flagged", ["--text-encoder", components, "--vae", components]), ("default", [])):
        et.main(extract_argv(transformer, prompt_file, tmp_path / name, *flags))
        meta = json.load(open(tmp_path / name / "meta.json"))
        assert (meta["teacher_ckpt"], meta["text_encoder"], meta["vae"]) == (transformer, components, components)
        assert {k for k in whole if meta[k] != whole[k]} == {"teacher_ckpt", "text_encoder", "vae"}
        split, full = contents(tmp_path / name), contents(single)
        del split["meta.json"], full["meta.json"]
        assert split == full


def test_the_hubs_split_pipeline_trains_and_samples_as_the_whole_one(pipeline, hub_split, prompt_file, tmp_path):
    """sample.py's teacher from the two repositories draws the whole pipeline's grid; a student trained on their
    trajectories records the components and sample.py takes its T5 and VAE from them."""
    transformer, components = hub_split
    grid = ["--sampler", "ddim", "--num-sampling-steps", "2", "--prompt", PROMPTS[0], "--device", "cpu"]
    sample.main(["--ckpt", pipeline, "--out", str(tmp_path / "whole.png"), *grid])
    sample.main(["--ckpt", transformer, "--text-encoder", components, "--vae", components,
                 "--out", str(tmp_path / "split.png"), *grid])
    assert (tmp_path / "whole.png").read_bytes() == (tmp_path / "split.png").read_bytes()
    et.main(extract_argv(transformer, prompt_file, tmp_path / "traj", "--text-encoder", components, "--vae",
                         components))
    experiment = run(train_argv(transformer, str(tmp_path / "traj"), tmp_path / "r", "--iterations", 1,
                                "--ckpt-every", 1))
    recorded = checkpoint(experiment, 1)["args"]
    assert (recorded["teacher"], recorded["text_encoder"], recorded["vae"]) == (transformer, components, components)
    student = os.path.join(experiment, "checkpoints", "0000001")
    sample.main(["--ckpt", student, "--prompt", PROMPTS[0], "--out", str(tmp_path / "student.png"), "--device", "cpu"])
    with pytest.raises(ValueError, match="is a student: its text encoder and VAE are its own"):
        sample.main(["--ckpt", student, "--prompt", PROMPTS[0], "--vae", components, "--out", str(tmp_path / "x.png"),
                     "--device", "cpu"])


@pytest.mark.parametrize("problem", ["dit_legacy", "text_channels"])
def test_a_split_pipeline_that_does_not_fit_stops_before_any_weights(hub_split, toy_text_encoder, tmp_path,
                                                                     monkeypatch, problem):
    transformer, components = hub_split
    from diffusers import PixArtTransformer2DModel
    monkeypatch.setattr(PixArtTransformer2DModel, "from_pretrained", must_not_run)
    if problem == "dit_legacy":  # the legacy class with DiT's norm_type is what diffusers loads as a DiT
        legacy = tmp_path / "dit"
        shutil.copytree(transformer, legacy)
        config = json.loads((legacy / "transformer" / "config.json").read_text())
        (legacy / "transformer" / "config.json").write_text(json.dumps(dict(config, norm_type="ada_norm_zero")))
        with pytest.raises(ValueError, match="must be a PixArtTransformer2DModel, its transformer/ is a "
                                             "'Transformer2DModel'"):
            pixart.load_pixart(str(legacy), components, components)
    else:
        with pytest.raises(ValueError, match="gives 16-channel embeddings; the transformer of .* takes 24"):
            pixart.load_pixart(transformer, toy_text_encoder, components)


@pytest.fixture(scope="module")
def toy_text_encoder(tmp_path_factory):
    from data import caption_words
    return pixart.build_toy_text_encoder(str(tmp_path_factory.mktemp("toy_t5")), caption_words(), d_model=16)


def teacher_argv(text_encoder, results, *extra):
    return ["--stage", "teacher", "--data-path", "shapes-text", "--image-size", "16", "--vae", "none",
            "--text-encoder", text_encoder,
            "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4", "--global-batch-size", "8",
            "--iterations", "4", "--ckpt-every", "2", "--sample-every", "4", "--log-every", "2", "--num-workers", "0",
            "--sample-steps", "2", "--results-dir", str(results), *map(str, extra)]


def test_pixel_pixart_teacher_trains_resumes_bit_identically_and_exports_a_pipeline(toy_text_encoder, tmp_path):
    torch.manual_seed(0)
    full = train.main(teacher_argv(toy_text_encoder, tmp_path / "full"))
    torch.manual_seed(0)
    half = train.main(teacher_argv(toy_text_encoder, tmp_path / "half", "--iterations", 2))
    train.main(["--resume", half, "--iterations", "4"])
    a, b = (read_checkpoint(os.path.join(e, "checkpoints", "0000004")) for e in (full, half))
    assert all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]) for k in a["model"])
    start = read_checkpoint(os.path.join(full, "checkpoints", "0000002"))
    assert any(not torch.equal(start["model"][k], a["model"][k]) for k in a["model"])  # it trains
    assert (a["args"]["family"], a["args"]["vae"]) == ("pixart", "none")
    assert os.path.getsize(os.path.join(full, "samples", "0000004.png")) > 0

    pipeline = str(tmp_path / "pipeline")
    train.main(["--export", os.path.join(full, "checkpoints", "0000004"), pipeline])
    transformer, info = pixart.load_pixart(pipeline)
    assert info["vae"] == "none" and info["shape"] == [3, 16, 16]
    assert all(torch.equal(v, a["ema"][k]) for k, v in transformer.state_dict().items())
    train.main(["--export", os.path.join(full, "checkpoints", "0000004"), f"{pipeline}-half", "--export-half"])
    half = pixart.load_pixart(f"{pipeline}-half")[0].state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, a["ema"][k].half().float()) for k, v in half.items())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a striped red disc\na blue shape\n")
    et.main(["--prompts", str(prompts), "--ckpt", pipeline, "--out", str(tmp_path / "traj"), "--num-samples", "4",
             "--shard-size", "4", "--batch-size", "4", "--teacher-steps", "4", "--num-steps", "2"])
    assert json.load(open(tmp_path / "traj" / "meta.json"))["clip_denoised"] is True
    with pytest.raises(FileExistsError, match="exists"):
        train.main(["--export", os.path.join(full, "checkpoints", "0000004"), pipeline])


def test_pixart_teacher_without_a_text_encoder_stops(tmp_path):
    with pytest.raises(ValueError, match="needs --text-encoder"):
        train.main(["--stage", "teacher", "--data-path", "shapes-text", "--image-size", "16", "--iterations", "1",
                    "--results-dir", str(tmp_path)])


def test_meta_and_shards_hold_prompt_indices(single):
    meta = json.load(open(os.path.join(single, "meta.json")))
    assert (meta["condition"], meta["family"], meta["num_prompts"], meta["cfg_scale"]) == ("prompts", "pixart", 5, 4.5)
    assert meta["boundary_times"] == student_timesteps(K, S)[1]
    assert json.load(open(os.path.join(single, "prompts.json"))) == PROMPTS
    shard = load_file(os.path.join(single, "shard_00002.safetensors"))
    assert set(shard) == {"state", "x0", "prompts", "seeds"}
    assert shard["prompts"].tolist() == [i % 5 for i in range(8, 12)]  # balanced: sample i takes prompt i mod P


def test_text_table_is_the_pipelines_t5_without_padding(single, pipeline):
    """Row i: T5 on prompt i padded to PixArt-Sigma's 300 tokens, cut to its real tokens; the tokenizer
    read from the hub's layout (spiece.model)."""
    table = pixart.TextTable(os.path.join(single, "text"))
    assert (len(table), table.null) == (6, 5)
    from transformers import AutoTokenizer, T5EncoderModel
    tokenizer = AutoTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    t5 = T5EncoderModel.from_pretrained(pipeline, subfolder="text_encoder").eval()
    for i, prompt in enumerate([*PROMPTS, ""]):
        tokens = tokenizer(prompt, padding="max_length", max_length=pixart.TEXT_TOKENS, return_tensors="pt")
        with torch.no_grad():
            full = t5(**tokens).last_hidden_state[0]
        length = int(tokens["attention_mask"].sum())
        text, mask = table[i]
        assert mask.tolist() == [True] * length + [False] * (table.length - length)
        torch.testing.assert_close(text[:length], full[:length], atol=2e-3, rtol=2e-3)  # fp16 storage
        assert text[length:].abs().sum() == 0


def test_final_point_is_the_guided_ddim_solve(single, pipeline):
    """Shard 0's final states against diffusion.ddim_sample_loop with PixArt's CFG on the negative prompt."""
    teacher = pixart.load_pixart(pipeline)[0]
    table = pixart.TextTable(os.path.join(single, "text"))
    noise, prompts = index_noise_and_labels(SEED, range(SHARD_SIZE), [4, 8, 8], 5, "balanced")
    text, mask = table.batch(prompts)
    null_text, null_mask = table.batch([table.null] * SHARD_SIZE)
    z = torch.cat([noise, noise])
    with torch.no_grad():
        final = create_diffusion(str(S)).ddim_sample_loop(
            pixart.guided_teacher(teacher, 4.5), z.shape, z, clip_denoised=False,
            model_kwargs=dict(text=torch.cat([text, null_text]), text_mask=torch.cat([mask, null_mask])))[:SHARD_SIZE]
        unguided = create_diffusion(str(S)).ddim_sample_loop(
            pixart.guided_teacher(teacher, 1), noise.shape, noise, clip_denoised=False,
            model_kwargs=dict(text=text, text_mask=mask))
    stored = load_file(os.path.join(single, "shard_00000.safetensors"))["state"][:, -1].float()
    torch.testing.assert_close(stored, final, atol=2e-3, rtol=2e-3)
    assert (stored - unguided).abs().max() > 0.02


def test_dataset_items_carry_the_text(single):
    data = et.TrajectoryDataset(single)
    inputs, targets, text, mask = data[7]
    assert inputs.shape == targets.shape == (K, 4, 8, 8)
    expected_text, expected_mask = data.text[7 % 5]
    assert torch.equal(text, expected_text) and torch.equal(mask, expected_mask)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert [tuple(t.shape) for t in batch] == [(4, K, 4, 8, 8), (4, K, 4, 8, 8), (4, data.text.length, 24),
                                               (4, data.text.length)]


def test_coco_captions_json(pipeline, tmp_path):
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "id": 5, "caption": " A dog. "},
                                                               {"image_id": 2, "id": 6, "caption": "a red car"}]}))
    assert pixart.read_prompts(str(path)) == ["A dog.", "a red car"]
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        pixart.read_prompts(str(path))


@pytest.mark.parametrize("problem", ["empty", "missing", "directory", "binary"])
def test_bad_prompt_file_stops_before_loading_anything(pipeline, tmp_path, monkeypatch, problem):
    path = tmp_path / "prompts.txt"
    if problem == "empty":
        path.write_text("\n  \n")
    elif problem == "directory":
        path.mkdir()
    elif problem == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81")
    monkeypatch.setattr(pixart, "load_pixart", must_not_run)
    message = "holds no prompts" if problem == "empty" else "cannot read the prompt file"
    with pytest.raises(ValueError, match=message):
        et.main(extract_argv(pipeline, str(path), tmp_path / "traj"))


def test_teacher_that_is_not_pixart_stops_before_loading_weights(prompt_file, tmp_path, monkeypatch):
    from diffusers import DiTTransformer2DModel
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
                          num_embeds_ada_norm=10).save_pretrained(tmp_path / "dit" / "transformer")
    monkeypatch.setattr(pixart, "load_pixart", must_not_run)
    with pytest.raises(ValueError, match="must be a PixArtTransformer2DModel, its transformer/ is a 'DiTTransformer2D"):
        et.main(extract_argv(str(tmp_path / "dit"), prompt_file, tmp_path / "traj"))
    with pytest.raises(FileNotFoundError, match="could not load 'transformer'"):
        et.main(extract_argv(str(tmp_path / "nothing-here"), prompt_file, tmp_path / "traj"))


# ---------------------------------------------------------------------------- training

QUIET = ["--num-workers", "0", "--sample-every", "1000", "--log-every", "1"]


def train_argv(pipeline, traj, results, *extra):
    return ["--stage", "ard", "--teacher", pipeline, "--data-path", traj, "--history-layers", "1",
            "--global-batch-size", "4", "--results-dir", str(results), *QUIET, *extra]


def run(argv):
    torch.manual_seed(0)
    return train.main([str(a) for a in argv])


def checkpoint(experiment, step):
    return read_checkpoint(os.path.join(experiment, "checkpoints", f"{step:07d}"))


@pytest.fixture(scope="module")
def run4(pipeline, single, tmp_path_factory):
    """4 uninterrupted steps, checkpoints at 2 and 4, and a sample grid at the end."""
    return run(train_argv(pipeline, single, tmp_path_factory.mktemp("whole"), "--iterations", 4, "--ckpt-every", 2))


def test_training_resumes_bit_identically(run4, pipeline, single, tmp_path):
    part = run(train_argv(pipeline, single, tmp_path, "--iterations", 2, "--ckpt-every", 2))
    assert run(["--resume", part, "--iterations", 4]) == part
    a, b = checkpoint(run4, 4), checkpoint(part, 4)
    for key in ("model", "ema", "opt"):
        for name, tensor in a[key].items() if key != "opt" else a[key]["state"].items():
            other = b[key][name] if key != "opt" else b[key]["state"][name]
            if isinstance(tensor, dict):
                assert all(torch.equal(tensor[k], other[k]) for k in tensor), (key, name)
            else:
                assert torch.equal(tensor, other), (key, name)
    assert any(not torch.equal(checkpoint(run4, 2)["model"][k], v) for k, v in a["model"].items())
    assert a["args"]["family"] == "pixart" and a["args"]["teacher"] == pipeline
    assert os.path.isfile(os.path.join(run4, "samples", "0000004.png"))


def test_two_processes_train_like_one(run4, pipeline, single, tmp_path):
    """`torchrun train.py` on 2 gloo processes, the same global batch split over them: the same
    training up to float rounding (DDP over the PixArt student: every parameter gets a gradient)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    argv = train_argv(pipeline, single, tmp_path, "--iterations", 4, "--ckpt-every", 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *map(str, argv), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (experiment,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    one, two = checkpoint(run4, 4), checkpoint(experiment, 4)
    for key in ("model", "ema"):
        for name, tensor in one[key].items():
            torch.testing.assert_close(two[key][name], tensor, rtol=1e-4, atol=1e-6, msg=f"{key}.{name}")


def test_student_fed_training_runs(pipeline, single, tmp_path):
    experiment = run(train_argv(pipeline, single, tmp_path, "--iterations", 1, "--student-fed", 1))
    assert checkpoint(experiment, 1)["step"] == 1


@pytest.mark.parametrize("extra, error, message", [
    (["--num-steps", 2], ValueError, "num_steps is 4, expected 2"),
    (["--history-layers", 4], ValueError, r"history_layers must be in \[0, 3\]"),
    (["--attention", "flex", "--compile"], ValueError, "--attention flex is for the DiT student"),
])
def test_mismatches_stop_before_the_teacher_loads(pipeline, single, tmp_path, monkeypatch, extra, error, message):
    monkeypatch.setattr(pixart, "load_pixart", must_not_run)
    with pytest.raises(error, match=message):
        run(train_argv(pipeline, single, tmp_path, *extra))


def test_shape_and_teacher_mismatches(single, tmp_path, monkeypatch):
    bigger = save_tiny_pipeline(tmp_path / "bigger", transformer=tiny_transformer(sample_size=16))
    with pytest.raises(ValueError, match=r"shape is \[4, 8, 8\], expected \[4, 16, 16\]"):
        run(train_argv(bigger, single, tmp_path))
    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="teacher_weights_sha256 is"):
        run(train_argv(other, single, tmp_path))


def test_a_pixart_student_exports_its_ema_weights_as_safetensors(run4, tmp_path):
    path = os.path.join(run4, "checkpoints", "0000004")
    out = str(tmp_path / "student.safetensors")
    train.main(["--export", path, out])
    student, args = pixart.load_student(out)
    assert args["stage"] == "ard" and all(torch.equal(v, read_checkpoint(path)["ema"][k])
                                          for k, v in student.state_dict().items())


def test_gan_stage_is_class_conditional_only(run4, single, tmp_path):
    with pytest.raises(ValueError, match="class-conditional only"):
        run(["--stage", "gan", "--init", os.path.join(run4, "checkpoints", "0000004"), "--data-path", single,
             "--real-data", "digits", "--results-dir", tmp_path, *QUIET])


# ---------------------------------------------------------------------------- sampling and evaluation

def test_student_checkpoint_samples_what_its_model_samples(run4, pipeline, tmp_path):
    path = os.path.join(run4, "checkpoints", "0000004")
    generate, student, info = sample.prompt_generator(path, torch.device("cpu"))
    noise = torch.randn(2, *info["shape"])
    got = generate(noise, PROMPTS[:2])
    encoded = pixart.PromptEncoder(pipeline, torch.device("cpu"))(PROMPTS[:2])
    torch.testing.assert_close(got, student.sample(noise, *pixart.pad_texts(encoded))[:, -1])
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", path, "--prompt", PROMPTS[0], "--prompt", PROMPTS[3], "--out", str(out), "--device", "cpu"])
    assert out.stat().st_size > 0
    with pytest.raises(ValueError, match="text-to-image student: sample it with prompts"):
        sample.load_generator(path)


def test_teacher_pipeline_samples_with_guidance(pipeline, tmp_path):
    generate, teacher, info = sample.prompt_generator(pipeline, torch.device("cpu"), steps=3, cfg_scale=4.5)
    noise = torch.randn(2, *info["shape"])
    guided = generate(noise, PROMPTS[:2])
    plain = sample.prompt_generator(pipeline, torch.device("cpu"), steps=3, cfg_scale=1)[0](noise, PROMPTS[:2])
    assert guided.shape == (2, 4, 8, 8) and (guided - plain).abs().max() > 0.01


def test_sample_ddp_identifies_a_hub_pipeline_by_name(prompt_file, tmp_path):
    args = sample_ddp.parse_args(["--ckpt", pixart.PIXART_SIGMA[512], "--prompts", prompt_file,
                                  "--out", str(tmp_path / "s.npz")])
    settings = sample_ddp.parts_settings(args)
    assert settings["ckpt"] == "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
    assert settings["prompts"]["path"] == os.path.abspath(prompt_file)


def save_tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                                         eos_token_id=1, pad_token_id=0, bos_token_id=1),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8), projection_dim=8)
    CLIPModel(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


def test_sample_ddp_npz_and_its_clip_score(run4, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    encoded = []
    encode = pixart.PromptEncoder.encode
    monkeypatch.setattr(pixart.PromptEncoder, "encode", lambda self, p: (encoded.append(list(p)), encode(self, p))[1])
    sample_ddp.main(["--ckpt", os.path.join(run4, "checkpoints", "0000004"), "--prompts", prompt_file,
                     "--num-fid-samples", "6", "--per-proc-batch-size", "4", "--chunk-size", "3", "--labels", "balanced",
                     "--out", str(out)])
    with np.load(out) as f:
        images, indices = f["arr_0"], f["arr_1"]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8  # the tiny VAE upsamples by 2
    assert indices.tolist() == [0, 1, 2, 3, 4, 0]
    assert encoded == [[p] for p in PROMPTS]  # each distinct prompt once, alone, over both batches of 3
    clip = save_tiny_clip(tmp_path / "clip")
    score = clip_score.main([str(out), prompt_file, "--clip-model", clip, "--device", "cpu"])
    model, tokenizer, processor = clip_score.load_clip(clip)
    texts = [PROMPTS[i] for i in indices]
    with torch.no_grad():
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        o = model(**tokens, pixel_values=processor(images=list(images), return_tensors="pt")["pixel_values"])
    by_hand = 100 * torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds).clamp(min=0).mean()
    assert score == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(SystemExit, match="another prompt file"):
        short = tmp_path / "short.txt"
        short.write_text("a dog\n")
        clip_score.main([str(out), str(short), "--clip-model", clip, "--device", "cpu"])


def test_clip_score_closed_forms():
    e = torch.randn(3, 8)
    assert torch.allclose(clip_score.clip_score_of_embeddings(e, 2.5 * e), torch.full((3,), 100.0))
    angle = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)], [0.0, 1.0], [-1.0, 0.2]])
    torch.testing.assert_close(clip_score.clip_score_of_embeddings(angle, text), torch.tensor([50.0, 0.0, 0.0]))
