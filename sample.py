"""Sample a grid of images from a DiT teacher or an ARD student.

    python sample.py --ckpt DiT-XL-2-256x256.pt                       # DiT's defaults: DDPM 250, CFG 4.0
    python sample.py --ckpt DiT-XL-2-256x256.pt --sampler ddim --num-sampling-steps 25 --cfg-scale 1.5
    python sample.py --ckpt results/000-ard-N6/checkpoints/0300000.pt  # K steps, no guidance

A checkpoint written by train.py carries its own architecture, VAE and image size; official
checkpoints take them from --model, --image-size and --vae.

Text-to-image: prompts in place of labels, from a PixArt student checkpoint or a PixArt pipeline
(the teacher, with CFG on the negative prompt ""); the prompts are encoded by the pipeline's T5.

    python sample.py --ckpt results/000-ard-N6/checkpoints/0100000.pt --prompt "a red car" --prompt "a cat"
    python sample.py --ckpt PixArt-alpha/PixArt-Sigma-XL-2-512-MS --sampler ddim --num-sampling-steps 25 \
        --cfg-scale 4.5 --prompts prompts.txt
"""
import argparse
import os

import torch

import pixart
from ard import load_student
from diffusion import create_diffusion
from extract_trajectories import add_component_args, add_flow_args, check_flow_args, check_pixart_sources
from models import clips_x0, describe_checkpoint, is_sharded_checkpoint, load_autoencoder, load_teacher, with_guidance
from transport import ADAPTIVE, CONVENTIONS, GuidedVelocity, solve_adaptive, solve_progressive, time_grid
from utils import allow_tf32, autocast, save_grid

DIT_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes


def teacher_generator(model, sampler="ddim", steps=25, cfg_scale=1.5, guidance_channels=3, progress=False,
                      clip_denoised=False):
    """generate(noise, labels) -> samples, by DDIM or DDPM on a uniformly respaced grid; x0-predictions
    clipped to [-1, 1] with `clip_denoised` (pixel-space models, as in ADM; latents are never clipped)."""
    diffusion = create_diffusion(str(steps))
    loop = {"ddim": diffusion.ddim_sample_loop, "ddpm": diffusion.p_sample_loop}[sampler]

    def generate(noise, y):
        fn, z, labels = with_guidance(model, noise, y, cfg_scale, guidance_channels)
        return loop(fn, z.shape, z, clip_denoised=clip_denoised, model_kwargs=dict(y=labels),
                    progress=progress)[: len(noise)]
    return generate


def flow_generator(model, time_convention, solver="euler", steps=25, cfg_scale=1.0, guidance_channels=None,
                   guidance_interval=(0.0, 1.0), time_shift=1.0, last_step=None):
    """generate(noise, labels) -> samples of a flow teacher by its own solve (transport: Euler or Heun in float64 on
    the `steps`-step grid, Heun's last step `last_step`, or SiT's adaptive dopri5; CFG on its guided channels inside
    the guidance interval)."""
    grid = time_grid(steps, time_shift)
    velocity = GuidedVelocity(model, CONVENTIONS[time_convention], cfg_scale, guidance_channels, guidance_interval)

    def generate(noise, y):
        if solver == ADAPTIVE:
            return solve_adaptive(velocity, noise, y).to(noise.dtype)
        *_, last = solve_progressive(velocity, noise, grid, y, solver, last_step)
        return last["sample"].to(noise.dtype)
    return generate


def load_generator(ckpt, model="DiT-XL/2", image_size=256, vae="ema", sampler="ddim", steps=25, cfg_scale=1.5,
                   guidance_channels=3, progress=False, flow=None):
    """(generate(noise, labels) -> model-space samples, the network, its description).

    A student checkpoint samples in its K steps; teacher settings (sampler, steps, CFG) apply
    to teachers only. `flow`: the teacher family and a flow teacher's solve (teacher_family,
    time_convention, solver, last_step, time_shift, guidance_interval; extract_trajectories.add_flow_args);
    a flow teacher samples by its own solver, not `sampler`. Move the network to a device before generating.
    """
    found = describe_checkpoint(ckpt)  # read once: a checkpoint folder is the whole training state
    if found.kind == "student":
        student, args = load_student(ckpt, found=found)
        info = dict(dit=args["dit"], image_size=args["image_size"], vae=args["vae"], kind="student",
                    num_steps=student.num_steps)
        return (lambda noise, y: student.sample(noise, y)[:, -1]), student, info
    flow = flow or dict(teacher_family="ddpm", time_convention=None)
    teacher, info = load_teacher(ckpt, model, image_size, vae, family=flow["teacher_family"],
                                 time_convention=flow["time_convention"], found=found)
    if info["teacher_family"] == "flow":
        generate = flow_generator(teacher, info["time_convention"], flow["solver"], steps, cfg_scale,
                                  guidance_channels, flow["guidance_interval"], flow["time_shift"], flow["last_step"])
        return generate, teacher, dict(info, kind="teacher", num_steps=steps)
    generate = teacher_generator(teacher, sampler, steps, cfg_scale, guidance_channels, progress,
                                 clip_denoised=clips_x0(info["vae"]))
    return generate, teacher, dict(info, kind="teacher", num_steps=steps)


def prompt_generator(ckpt, device, sampler="ddim", steps=25, cfg_scale=pixart.CFG_SCALE, progress=False,
                     text_encoder=None, vae=None):
    """(generate(noise, prompts) -> model-space samples, the network, its description) of a PixArt
    student checkpoint (its K steps, its text encoder and VAE) or a PixArt pipeline (the teacher; sampler, steps
    and CFG apply; its text encoder and VAE from `text_encoder` and `vae` when given, pixart.check_pixart)."""
    if os.path.isfile(ckpt) or is_sharded_checkpoint(ckpt):
        if text_encoder or vae:
            raise ValueError(f"{ckpt} is a student: its text encoder and VAE are its own; drop --text-encoder and "
                             f"--vae")
        student, args = pixart.load_student(ckpt)
        size = args["pixart"]["sample_size"]
        info = dict(family="pixart", kind="student", num_steps=student.num_steps, vae=args["vae"],
                    text_encoder=args.get("text_encoder", args["teacher"]),  # before it was recorded: the teacher's
                    shape=[args["pixart"]["in_channels"], size, size])
        guided, network = False, student

        def run(noise, text, mask):
            return student.sample(noise, text, mask)[:, -1]
    else:
        network, info = pixart.load_pixart(ckpt, text_encoder, vae)
        info = dict(info, kind="teacher", num_steps=steps)
        run, guided = pixart.teacher_solver(network, sampler, steps, cfg_scale, clips_x0(info["vae"]), progress)
    encode = pixart.PromptEncoder(info["text_encoder"], device)

    def generate(noise, prompts):
        """Under CFG the negative prompt's rows follow the prompts', padded alike."""
        embeddings = encode(list(prompts) + [""] * len(prompts) * guided)
        text, mask = pixart.pad_texts([e.to(noise.device) for e in embeddings])
        return run(noise, text, mask)
    return generate, network, info


def load_decoder(info):
    """The autoencoder a generator's samples decode with: the PixArt pipeline's VAE, or DiT's."""
    return pixart.load_vae(info["vae"]) if info.get("family") == "pixart" else load_autoencoder(info["vae"])


def add_generator_args(p):
    """The flags that pick and configure a generator, shared with sample_ddp.py."""
    p.add_argument("--ckpt", default=None, help="official DiT name, a teacher or a student checkpoint "
                                                "(default: the official DiT-XL/2 at --image-size)")
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--image-size", type=int, default=256)
    add_component_args(p)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--num-sampling-steps", type=int, default=250)
    p.add_argument("--guidance-channels", type=int, default=3, help="guide the first C eps channels; DiT: 3")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="fp32", help="autocast on GPU")
    p.add_argument("--prompts", help="text-to-image: a prompt file (one per line, or COCO captions .json)")
    add_flow_args(p, adaptive=True)


def checkpoint_from_args(args):
    """--ckpt, or the official DiT-XL/2 at --image-size."""
    return args.ckpt or f"DiT-XL-2-{args.image_size}x{args.image_size}.pt"


def generator_from_args(args, device, text_to_image=False, progress=False):
    if text_to_image:
        if not args.ckpt:
            raise ValueError("text-to-image needs --ckpt: a PixArt student checkpoint or a PixArt pipeline")
        return prompt_generator(args.ckpt, device, args.sampler, args.num_sampling_steps, args.cfg_scale, progress,
                                args.text_encoder, args.vae)
    flow = {k: getattr(args, k) for k in ("teacher_family", "time_convention", "solver", "last_step", "time_shift",
                                          "guidance_interval")}
    return load_generator(checkpoint_from_args(args), args.model, args.image_size, args.vae, args.sampler,
                          args.num_sampling_steps, args.cfg_scale, args.guidance_channels, progress, flow)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_args(p)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="default: DiT's eight ImageNet classes, or every class once for smaller label sets")
    p.add_argument("--prompt", action="append", help="text-to-image: a prompt (repeat the flag for more)")
    p.add_argument("--nrow", type=int, default=8, help="images per row of the grid")
    p.add_argument("--out", default="sample.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.cfg_scale < 1:
        p.error(f"--cfg-scale must be >= 1, got {args.cfg_scale}")
    check_flow_args(p, args)
    check_pixart_sources(p, args, text_to_image=bool(args.prompt or args.prompts))

    torch.manual_seed(args.seed)
    allow_tf32(False)  # fp32 is IEEE fp32, as in sample_ddp.py
    device = torch.device(args.device)
    prompts = args.prompt or (pixart.read_prompts(args.prompts) if args.prompts else None)
    generate, network, info = generator_from_args(args, device, text_to_image=bool(prompts), progress=True)
    network.to(device)
    if prompts:
        conditions, shape = prompts, info["shape"]
    else:
        num_classes = info["dit"]["num_classes"]
        labels = args.class_labels or (DIT_LABELS if num_classes == 1000 else list(range(num_classes)))
        if not all(0 <= y < num_classes for y in labels):
            p.error(f"class labels must be in [0, {num_classes}), got {labels}")
        conditions = torch.tensor(labels, device=device)
        shape = (info["dit"]["in_channels"], info["dit"]["input_size"], info["dit"]["input_size"])
    noise = torch.randn(len(conditions), *shape, device=device)
    with autocast(device, args.precision):
        samples = generate(noise, conditions)
    images = load_decoder(info).to(device).decode(samples.float())
    save_grid(images.clamp(-1, 1), args.out, nrow=min(len(conditions), args.nrow),
              scale=max(1, 64 // images.shape[-1]))
    print(f"{info['kind']} ({info['num_steps']} steps): {len(conditions)} images in {args.out}")


if __name__ == "__main__":
    main()
