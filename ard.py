"""The ARD student (Kim et al., CVPR 2025): a teacher DiT that generates in K steps, each
step seeing the whole history of its trajectory.

The K stage inputs [x_T, x_τ1, ..., x_τ(K-1)] are patchified into K·L tokens. Stage k is
conditioned on its own time τ_k through adaLN, computed once per stage. The lower N blocks
attend across stages (M4: stage k sees stages 0..k), stage by stage over the keys it sees; the upper
blocks process every stage on its own, exactly like the teacher. One output head per stage, read
either as the prediction itself ("direct") or as the teacher reads its own output ("ddim": an
ε-prediction mapped through the DDIM step from the stage's input to the next stage's time; "euler", for
flow-matching teachers: a velocity mapped through the Euler step).
"""
import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils.checkpoint import checkpoint

from diffusion import ddim_jump, stage_alphas, student_timesteps
from models import KVCache, StageKeys, build_network, describe_checkpoint, load_state_dict_strict, unpatchify
from transport import CONVENTIONS, euler_jump

MASKS = ("M1", "M2", "M3", "M4")
PARAMETRIZATIONS = ("direct", "ddim", "euler")
SOLVER_READOUTS = {"ddim": "ddpm", "euler": "flow"}  # the teacher family each solver readout belongs to
# What the history tokens hold: the trajectory's stage inputs, or (a control) the same stages computed from
# zero inputs, which carry the stage times and the label but nothing of the sample.
HISTORY_INPUTS = ("trajectory", "zeros")
TARGETS = ("state", "x0")


def stage_mask(variant, num_steps):
    """(K, K) boolean: may stage q attend to stage k? The paper's ablation variants:
    M1 itself only (step distillation), M2 itself and the previous stage, M3 itself and x_T,
    M4 itself and every earlier stage (block-causal)."""
    if variant not in MASKS:
        raise ValueError(f"unknown mask {variant!r}; choose from {', '.join(MASKS)}")
    eye = torch.eye(num_steps, dtype=torch.bool)
    if variant == "M1":
        return eye
    if variant == "M2":
        return eye | eye.roll(-1, dims=1).tril()
    if variant == "M3":
        return eye | (torch.arange(num_steps) == 0)
    return torch.ones(num_steps, num_steps, dtype=torch.bool).tril()


def solver_readout(family):
    """The readout of a teacher family's own solver step (train.py's default)."""
    return next(readout for readout, owner in SOLVER_READOUTS.items() if owner == family)


def check_student_settings(num_steps, history_layers, depth, stage_times=None, teacher_steps=25,
                           parametrization="direct", target="state", history_input="trajectory", time_convention=None):
    """The K stage times of a student with N history blocks out of `depth`, validated: for a DDPM teacher
    (`time_convention` None) integer timesteps, by default the points of a `teacher_steps`-step grid nearest
    to T(K-k)/K; for a flow teacher its model times in [0, 1], given (they come from its trajectories)."""
    if history_input not in HISTORY_INPUTS:
        raise ValueError(f"history_input must be one of {', '.join(HISTORY_INPUTS)}, got {history_input!r}")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {', '.join(PARAMETRIZATIONS)}, got {parametrization!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= history_layers <= depth:
        raise ValueError(f"history_layers must be in [0, {depth}] for a depth-{depth} teacher, got {history_layers}")
    family = "ddpm" if time_convention is None else "flow"
    if SOLVER_READOUTS.get(parametrization, family) != family:
        raise ValueError(f"parametrization {parametrization!r} reads a {SOLVER_READOUTS[parametrization]} teacher's "
                         f"output; this student's teacher is a {family} teacher")
    if stage_times is None:
        if time_convention is not None:
            raise ValueError("a flow student's stage times come from its trajectories (meta boundary_times)")
        stage_times = student_timesteps(num_steps, teacher_steps)[1]
    if len(stage_times) != num_steps:
        raise ValueError(f"expected {num_steps} stage times, got {len(stage_times)}")
    return check_stage_times(stage_times, time_convention)


def check_stage_times(stage_times, time_convention):
    """DDPM stage times as ints, strictly decreasing and non-negative; flow stage times as floats in [0, 1] whose
    noise levels strictly decrease (a SiT student's times increase: SiT has data at t = 1)."""
    if time_convention is None:
        stage_times = [int(t) for t in stage_times]
        if any(a <= b for a, b in zip(stage_times, stage_times[1:])) or stage_times[-1] < 0:
            raise ValueError(f"stage times must be strictly decreasing and non-negative, got {stage_times}")
        return stage_times
    if time_convention not in CONVENTIONS:
        raise ValueError(f"time convention must be one of {', '.join(CONVENTIONS)}, got {time_convention!r}")
    stage_times = [float(t) for t in stage_times]
    if not all(0 <= t <= 1 for t in stage_times):
        raise ValueError(f"a flow student's stage times must lie in [0, 1], got {stage_times}")
    sigmas = [CONVENTIONS[time_convention].model_time(t) for t in stage_times]
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"stage times {stage_times} must go from noise to data ({time_convention!r} convention)")
    return stage_times


def zero_history_layout(stages):
    """(2K, 2K) stage mask of the zero-history control over [zero-input copy of the K stages, the K stages]:
    the copy attends as `stages` says; stage k sees the copy's visible earlier stages and itself."""
    eye = torch.eye(len(stages), dtype=torch.bool)
    return torch.cat([torch.cat([stages, torch.zeros_like(stages)], 1), torch.cat([stages & ~eye, eye], 1)])


def stage_runs(stages):
    """Per stage q of a (K, K) stage mask, the stages it sees as spans [a, b) of consecutive stages:
    M4's stage k sees [(0, k+1)], M2's [(k-1, k+1)], M3's [(0, 1), (k, k+1)], M1's [(k, k+1)]."""
    runs = []
    for row in stages.tolist():
        edges = [s for s in range(len(row) + 1) if (s < len(row) and row[s]) != (s > 0 and row[s - 1])]
        runs.append(list(zip(edges[::2], edges[1::2])))
    return runs


def full_precision(device):
    """Autocast off on `device`, for the stage heads, their readout and the conditioning that feeds them (inputs
    cast to fp32): a ddim readout multiplies a head's error by up to sqrt(1/ᾱ - 1), 157 at t=999 for the x0
    target, so bf16's rounding there would rival the whole backbone's; these are a small share of the cost."""
    if not torch.amp.is_autocast_available(device.type):  # "meta" (counting FLOPs) has no autocast to turn off
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class StageReadout(nn.Module):
    """A stage's prediction from its head's raw output (DESIGN.md, stage heads), for both student families.

    "direct": the raw output is the prediction (the public re-implementation). "ddim": the raw
    output is read as the teacher reads its own, an ε-prediction at the stage's time τ_k, and the
    prediction is the deterministic DDIM step from the stage's input to τ_(k+1) (the final sample
    after the last stage), or for the x0 target the x0 of that step, with the teacher's x0
    clipping (`clip_x0`). "euler" (flow teachers, `time_convention` set): the raw output is the
    teacher's velocity and the step is Euler's on the linear path (flow solvers never clip). At
    initialisation a stage then equals the teacher's one-jump solve from its input. Stage inputs
    after x_T are states only for the state target: with the x0 target the step reads them as
    states all the same, and is the teacher's jump at stage 0 alone. The step is computed, and returned, in fp32.
    """

    def __init__(self, parametrization, target, stage_times, clip_x0, time_convention=None):
        super().__init__()
        self.parametrization, self.target, self.clip_x0 = parametrization, target, clip_x0
        if time_convention is None:
            levels = stage_alphas(stage_times)
        else:  # noise levels σ at each stage time and the next (0 after the last: the final sample)
            self.convention = CONVENTIONS[time_convention]
            now = [self.convention.model_time(t) for t in stage_times]
            levels = torch.tensor([now, now[1:] + [0.0]], dtype=torch.float64)
        self.register_buffer("levels", levels.float(), persistent=False)

    def forward(self, raw, stage_input, k):
        if self.parametrization == "direct":
            return raw
        level, level_next = self.levels[:, k]
        if self.parametrization == "euler":
            state, x0 = euler_jump(stage_input.float(), raw.float(), level, level_next, self.convention)
        else:
            state, x0 = ddim_jump(stage_input.float(), raw.float(), level, level_next, self.clip_x0)
        return x0 if self.target == "x0" else state


class ARD(nn.Module):
    """Student initialised from (a copy of) `teacher`; see the module docstring.

    num_steps: K; history_layers: N, the number of lower blocks that see the history;
    mask: M1-M4; stage_times: the K timesteps the stages are conditioned on (default: the
    points of a `teacher_steps`-step grid nearest to T(K-k)/K); shared_head: one output head
    for all stages instead of one per stage; parametrization, target, clip_x0: how a head's
    output reads as the prediction of the next state or x0 (StageReadout); history_input:
    "trajectory", or the "zeros" control (HISTORY_INPUTS); attention: "sdpa" (any device) or "flex"
    (FlexAttention block mask in the history blocks, for compiled GPU training); time_convention: None
    for a DDPM teacher, else the flow teacher's (transport.CONVENTIONS), whose stage times are floats.
    """

    constant_buffers = True  # positions, stage times and mask, time frequencies (see train.distributed)

    def __init__(self, teacher, num_steps=4, history_layers=6, mask="M4", stage_times=None, teacher_steps=25,
                 shared_head=False, parametrization="direct", target="state", clip_x0=False,
                 history_input="trajectory", attention="sdpa", time_convention=None):
        super().__init__()
        stage_times = check_student_settings(num_steps, history_layers, len(teacher.blocks), stage_times,
                                             teacher_steps, parametrization, target, history_input, time_convention)
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be 'sdpa' or 'flex', got {attention!r}")
        self.settings = dict(num_steps=num_steps, history_layers=history_layers, mask=mask,
                             stage_times=stage_times, shared_head=shared_head, parametrization=parametrization,
                             target=target, clip_x0=clip_x0, history_input=history_input,
                             time_convention=time_convention)
        self.readout = StageReadout(parametrization, target, stage_times, clip_x0, time_convention)
        self.zero_history = history_input == "zeros" and history_layers > 0
        self.dit_config = dict(teacher.config)
        self.num_steps, self.history_layers, self.attention = num_steps, history_layers, attention
        self.in_channels, self.patch_size = teacher.in_channels, teacher.patch_size
        self.input_size = teacher.config["input_size"]
        self.grad_checkpointing = False

        teacher = copy.deepcopy(teacher)
        self.x_embedder, self.t_embedder, self.y_embedder = teacher.x_embedder, teacher.t_embedder, teacher.y_embedder
        self.register_buffer("pos_embed", teacher.pos_embed.data)
        self.blocks = teacher.blocks
        self.heads = nn.ModuleList([teacher.final_layer] + [copy.deepcopy(teacher.final_layer)
                                                            for _ in range(0 if shared_head else num_steps - 1)])
        self.out_channels = teacher.out_channels
        self.register_buffer("stage_times", torch.tensor(stage_times), persistent=False)
        stages = stage_mask(mask, num_steps)
        # The history blocks' stage layout: the K stages, or for the zero-history control 2K (the zero copy first).
        history = zero_history_layout(stages) if self.zero_history else stages
        self.register_buffer("stage_mask", stages, persistent=False)
        self.register_buffer("history_layout", history, persistent=False)
        self.history_keys = StageKeys(stage_runs(history), self.x_embedder.num_patches)
        self._block_mask = None

    # ------------------------------------------------------------------ pieces

    def conditioning(self, y):
        """(B, K, D), fp32: stage k's time embedding plus the label embedding (never dropped)."""
        with full_precision(self.stage_times.device):  # K + B rows: free, and it feeds the heads too
            return self.t_embedder(self.stage_times).unsqueeze(0) + self.y_embedder(y, train=False).unsqueeze(1)

    def head(self, x, c, k, stage_input):
        """Stage k's prediction (B, C, H, W), in fp32, from its tokens (B, L, D), conditioning (B, 1, D) and
        input (B, C, H, W); of a learned-sigma head only the first C channels are used."""
        head = self.heads[0 if len(self.heads) == 1 else k]
        with full_precision(x.device):
            raw = unpatchify(head(x.float(), c), self.patch_size, self.out_channels)[:, : self.in_channels]
            return self.readout(raw, stage_input, k)

    def history_mask(self):
        """The history blocks' attention: per-stage SDPA, or a FlexAttention block mask made from the
        stage layout (FlexAttention evaluates it once per (K·L)² position, when it is built)."""
        if self.attention == "sdpa":
            return self.history_keys
        stages = self.history_layout
        if self._block_mask is None or self._block_mask.kv_indices.device != stages.device:
            L, tokens = self.x_embedder.num_patches, len(stages) * self.x_embedder.num_patches
            self._block_mask = create_block_mask(lambda b, h, q, kv: stages[q // L, kv // L], None, None,
                                                 tokens, tokens, device=stages.device)
        return self._block_mask

    def run_block(self, block, x, c, mask=None, cache=None):
        if self.grad_checkpointing and self.training:
            return checkpoint(block, x, c, mask, cache, use_reentrant=False)
        return block(x, c, mask, cache)

    # ------------------------------------------------------------------ teacher forcing

    def forward(self, stages, y):
        """Teacher-forced predictions of all K stages in one pass.

        stages: (B, K, C, H, W), stage k's input (x_T first); y: (B,) labels.
        Returns (B, K, C, H, W): stage k's prediction of the next trajectory point.
        """
        check_stage_shape(self, stages, "stages", with_stages=True)
        B, K = stages.shape[:2]
        x = self.x_embedder(stages.flatten(0, 1)) + self.pos_embed  # (B·K, L, D)
        L, D = x.shape[1:]
        c = self.conditioning(y)
        N = self.history_layers
        if N:
            x, mask, c_lower = x.reshape(B, K * L, D), self.history_mask(), c
            if self.zero_history:  # the zero-input copy first, in the layout of zero_history_layout
                zeros = self.x_embedder(torch.zeros_like(stages[:, 0])) + self.pos_embed
                x, c_lower = torch.cat([zeros.repeat(1, K, 1), x], dim=1), torch.cat([c, c], dim=1)
            for block in self.blocks[:N]:
                x = self.run_block(block, x, c_lower, mask)
            x = x[:, -K * L:]
        x, c = x.reshape(B * K, L, D), c.reshape(B * K, 1, D)  # stages folded into the batch
        for block in self.blocks[N:]:
            x = self.run_block(block, x, c)
        x, c = x.view(B, K, L, D), c.view(B, K, 1, D)
        return torch.stack([self.head(x[:, k], c[:, k], k, stages[:, k]) for k in range(K)], dim=1)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def sample(self, noise, y, steps=None):
        """K-step generation from noise (B, C, H, W); returns every stage's output (B, K, C, H, W).

        Each step runs only its own L tokens; the lower N blocks keep the keys/values of
        earlier stages, so stage k attends to exactly what the mask lets it see in `forward`.
        `steps` < K stops after that many stages (and returns only theirs).
        """
        check_stage_shape(self, noise, "noise", with_stages=False)
        if self.zero_history:
            return self.sample_uncached(noise, y, steps)
        K, N, L = self.num_steps, self.history_layers, self.x_embedder.num_patches
        c_all = self.conditioning(y)
        caches = [KVCache(capacity=K * L) for _ in range(N)]
        x_in, outputs = noise, []
        for k, runs in enumerate(self.history_keys.runs[:steps]):
            for cache in caches:
                cache.visible = runs
            x = self.x_embedder(x_in) + self.pos_embed
            c = c_all[:, k:k + 1]
            for i, block in enumerate(self.blocks):
                x = block(x, c, None, caches[i]) if i < N else block(x, c)
            x_in = self.head(x, c, k, x_in)
            outputs.append(x_in)
        return torch.stack(outputs, dim=1)

    @torch.no_grad()
    def sample_uncached(self, noise, y, steps=None):
        """`sample` through teacher-forced passes over the stages so far (the zero-history control, whose
        history is no cache of earlier stages); stage k's output depends only on stages <= k."""
        stages = noise.new_zeros(noise.shape[0], self.num_steps, *noise.shape[1:])
        stages[:, 0], outputs = noise, []
        for k in range(steps or self.num_steps):
            outputs.append(self(stages, y)[:, k])
            if k + 1 < self.num_steps:
                stages[:, k + 1] = outputs[-1]
        return torch.stack(outputs, dim=1)


def check_stage_shape(student, tensor, what, with_stages):
    """Raises unless `tensor` is (B, K, C, H, W) stage inputs (or (B, C, H, W) noise) for `student`
    (any student with num_steps, in_channels and input_size: ARD or pixart.PixArtARD)."""
    expected = (student.num_steps,) * with_stages + (student.in_channels, student.input_size, student.input_size)
    if tuple(tensor.shape[1:]) != expected:
        layout = "(B, K, C, H, W)" if with_stages else "(B, C, H, W)"
        raise ValueError(f"{what} must be {layout} = (B, {', '.join(map(str, expected))}) for this student, "
                         f"got {tuple(tensor.shape)}")


@torch.no_grad()
def student_fed_stages(student, stages, *condition):
    """Stage inputs (B, K, C, H, W) fed the student's own outputs: x_T from `stages`, then the first
    K-1 outputs of its KV-cached `sample` from that x_T (no gradient), in the dtype of `stages`.
    `condition`: what the student's `sample` takes after the noise (labels; or text and its mask)."""
    rollout = student.sample(stages[:, 0], *condition, steps=student.num_steps - 1)
    return torch.cat([stages[:, :1], rollout.to(stages.dtype)], dim=1)


def distillation_loss(prediction, target):
    """Mean over stages of the per-stage MSE (equal weights); also returns the (K,) per-stage values."""
    per_stage = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(0, 2, 3, 4))
    return per_stage.mean(), per_stage.detach()


def gflops(dit_config, num_steps=1, history_layers=0, mask="M4"):
    """GFLOPs (multiply-accumulates, DiT's convention) of K-step generation, i.e. of K stage
    passes of L tokens plus the cross-stage attention of the lower N blocks. The teacher's
    forward is num_steps=1; the teacher-forced `forward` does the same work when masked
    attention skips hidden stages. DiT-XL/2 at 256²: 118.6 (teacher), K=4: 474.4 (N=0),
    479.9 (N=6, M4), as in the paper's Table 1. LightningDiT's SwiGLU counts its own width (rotary positions and
    RMSNorm are elementwise, uncounted as DiT's LayerNorm is)."""
    p, C, D = dit_config["patch_size"], dit_config["in_channels"], dit_config["hidden_size"]
    depth, mlp_hidden = dit_config["depth"], int(dit_config["hidden_size"] * dit_config["mlp_ratio"])
    out_channels = 2 * C if dit_config["learn_sigma"] else C
    L = (dit_config["input_size"] // p) ** 2
    swiglu = dit_config.get("arch") == "lightningdit"  # w12 and w3 at 2/3 of the hidden width
    mlp = 3 * D * int(2 / 3 * mlp_hidden) if swiglu else 2 * D * mlp_hidden
    per_token = 3 * D * D + D * D + mlp  # qkv, proj, mlp
    block = 6 * D * D + L * per_token + 2 * L * L * D  # adaLN, linear layers, attention over the stage
    stage = (L * p * p * C * D + 256 * D + D * D  # patch embedding, timestep MLP
             + depth * block
             + 2 * D * D + L * D * p * p * out_channels)  # final layer
    earlier_visible = int(stage_mask(mask, num_steps).sum()) - num_steps
    history = history_layers * 2 * L * L * D * earlier_visible
    return (num_steps * stage + history) / 1e9


def student_kwargs(args):
    """The ARD constructor's settings as stored in a checkpoint's args."""
    return {k: args[k] for k in ("num_steps", "history_layers", "mask", "stage_times", "shared_head",
                                 "parametrization", "target", "clip_x0", "history_input")}


def load_student(path, attention="sdpa", found=None):
    """An ARD student (eval mode, EMA weights) and its checkpoint args, from one of our checkpoints (`found`: its
    describe_checkpoint, where the caller has it already)."""
    found = found or describe_checkpoint(path)
    args = found.settings
    if found.kind != "student":
        raise ValueError(f"{path} is not an ARD student checkpoint (a {found.kind} checkpoint)")
    if args.get("family") == "pixart":
        raise ValueError(f"{path} is a text-to-image student: sample it with prompts (sample.py --prompt)")
    model = ARD(build_network(args["dit"]), attention=attention, time_convention=args.get("time_convention"),
                **student_kwargs(args))
    return load_state_dict_strict(model, found.state_dict, source=str(path)).eval(), args
