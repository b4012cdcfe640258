"""
Train a Matryoshka Diffusion Model, progressively (section 3.3, appendix B).

`--res 64,256` trains in stages: stage 1 trains the model up to 64x64 (its innermost UNet
alone), stage 2 wraps that model (and its EMA) as the inner model of the full NestedUNet with
`grow` and trains all of it, the joint loss of Eq. 3 over every resolution. `--steps` and
`--batch` give one number per stage, in appendix B's form.

On a laptop CPU, the default (a small text-to-image model on the built-in emoji data set,
about 15 minutes on 2 cores):
    python train.py
On one GPU, or N GPUs of one machine (plain DDP through torchrun; bf16 autocast on GPUs):
    torchrun --standalone --nproc_per_node=8 train.py --config MDM-S64S256 --res 64,256 \\
        --steps 300000,500000 --batch 512,256 --data <imagenet folder>          # appendix B, ImageNet
On several machines (run on each, with its own --node_rank):
    torchrun --nnodes=4 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=<first node>:29500 train.py --config MDM-S64S256 --res 64,256 \\
        --steps 500000,500000 --batch 2048,1024 --data pixparse/cc12m-wds --streaming \\
        --image-column jpg --caption-column txt --text-encoder google/flan-t5-xl   # CC12M
A run that was stopped or killed goes on where it stopped:
    python train.py --resume                  # the newest run in runs/
    python train.py --resume runs/<name>      # that run

Each run writes a folder runs/<name>/: args.json, log.jsonl (losses per resolution, steps/s,
images/s), loss.png, samples/ (grids every --sample-every steps), checkpoint.pt (the whole
state, written atomically) and ema.safetensors (EMA weights with their config, for sample.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import utils
import video
from diffusion import DiffusionConfig, MatryoshkaDiffusion
from nested_unet import PRESETS, NestedUNet, NestedUNetConfig, grow, preset, summary, to_device
import pipeline
from pipeline import save_weights


# ---------------------------------------------------------------------------------------
# Arguments, and the checks that run before any training
# ---------------------------------------------------------------------------------------

def parse_sizes(s: str) -> list[tuple[int, int]]:
    """--res "64,256" -> [(1, 64), (1, 256)]; video stages "64,16x64,16x256" -> frames x size."""
    try:
        return [tuple(int(u) for u in v.split("x")) if "x" in v else (1, int(v)) for v in s.split(",")]
    except ValueError:
        raise SystemExit(f"train.py: --res {s}: expected sizes like 64,256 (or 64,16x64 for video: frames x size)")


int_list, float_list = utils.comma_list(int, "300,800"), utils.comma_list(float, "1,4")


def parse_args(argv=None):
    p = utils.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and stages")
    g.add_argument("--config", default="CPU-S16S32", help="a preset of nested_unet.py, or a JSON config file")
    g.add_argument("--res", default="16,32", help="top resolution of each stage, e.g. 64,256 (video: 64,16x64)")
    g.add_argument("--steps", type=int_list, default=[300, 800], help="optimizer steps of each stage")
    g.add_argument("--batch", type=int_list, default=[64, 32], help="global batch of each stage")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation: micro-batches per step")
    g.add_argument("--init-from", default=None, help="start from a trained run's weights (a run folder or "
                   "ema.safetensors, e.g. a released model converted by release.py): fine-tune it, or grow it "
                   "into the inner levels of --config")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="emoji", help="emoji, fashion-mnist, a folder of images, or a "
                   "Hugging Face data set name")
    g.add_argument("--data-limit", type=int, default=0, help="use only the first N images (0: all)")
    g.add_argument("--cond", choices=["auto", "text", "label", "none"], default="auto",
                   help="condition on captions, class labels or nothing (auto: what the data has)")
    g.add_argument("--text-encoder", default=None, help="minilm (offline, the default) or a transformers name "
                   "or folder, e.g. google/flan-t5-xl (the paper's); with --init-from: that run's")
    g.add_argument("--text-tokenization", choices=["hf", "ml-mdm"], default=None,
                   help="hf: the tokenizer's own; ml-mdm: as the released models' code (default: --init-from's, or hf)")
    g.add_argument("--image-column", default="image")
    g.add_argument("--caption-column", default="text")
    g.add_argument("--label-column", default="label")
    g.add_argument("--streaming", action="store_true", help="stream a large hub data set (CC12M)")
    g.add_argument("--workers", type=int, default=0, help="data loader processes per rank")
    g = p.add_argument_group("optimisation (appendix B)")
    g.add_argument("--lr", type=float, default=None, help="1e-4 (appendix B); the CPU presets: 6e-4")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear LR warm-up steps per stage (default: min(30000, stage steps / 10))")
    g.add_argument("--clip", type=float, default=2.0, help="gradient clipping norm")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay (reached after the EMA warm-up)")
    g.add_argument("--ema-power", type=float, default=2 / 3, help="EMA warm-up: decay = 1 - (1 + step)^-power")
    g.add_argument("--high-res-fraction", type=float, default=None,
                   help="mixed-resolution training: share of each batch that also goes through the "
                   "highest resolution (default 0.5; the CPU presets: 1, all)")
    g.add_argument("--cond-drop", type=float, default=0.1, help="conditioning dropout for guidance")
    g.add_argument("--loss-levels", choices=["all", "top"], default="all",
                   help="all: the joint loss of Eq. 3; top: only the highest resolution (simple DM)")
    g.add_argument("--loss-weights", type=float_list, default=None, help="extra weight per resolution")
    g.add_argument("--shift-power", type=float, default=2.0)
    g = p.add_argument_group("speed and memory")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there is one)")
    g.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the outer levels")
    g.add_argument("--channels-last", action="store_true")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs", help="folder of the run folders")
    g.add_argument("--name", default=None, help="run name (default: date-time and data)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume the newest run, or the run folder given")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--ckpt-every", type=int, default=200)
    g.add_argument("--sample-every", type=int, default=400)
    g.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample grids")
    g.add_argument("--sample-guidance", type=float, default=3.0)
    g.add_argument("--no-samples", action="store_true", help="no sample grids (tests)")
    g.add_argument("--eval-every", type=int, default=0, help="FD-EffNet (and class accuracy) every N steps, "
                   "at the final resolution (evaluate.py); 0: never")
    g.add_argument("--eval-samples", type=int, default=256, help="generated images per evaluation")
    g.add_argument("--eval-real", type=int, default=1000, help="real images of the FD statistics")
    g.add_argument("--eval-steps", type=int, default=25, help="DDIM steps of the evaluation samples (no guidance)")
    g.add_argument("--stop-after", type=int, default=0, help="stop (with a checkpoint) after this many "
                   "steps of this invocation; --resume goes on (for jobs with a time limit)")
    return p.parse_args(argv)


# Appendix B's recipe, except for the small CPU presets: trained for minutes, not days, they
# take a larger step (6e-4 gave a cleaner demo than 3e-4 in the same 15 minutes), and every
# sample goes through the highest level (there the inner UNet costs more than the outer
# level, so skipping the outer level would save little).
RECIPES = {"paper": {"lr": 1e-4, "high_res_fraction": 0.5}, "cpu": {"lr": 6e-4, "high_res_fraction": 1.0}}


def fill_recipe(args):
    recipe = RECIPES["cpu" if args.config.startswith("CPU-") else "paper"]
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def load_model_config(name: str) -> NestedUNetConfig:
    if name.endswith(".json"):
        # A config file as `NestedUNetConfig.to_dict()` writes it (inner levels nested).
        try:
            return NestedUNetConfig(**json.loads(Path(name).read_text()))
        except OSError as e:
            raise SystemExit(f"train.py: --config {name}: cannot read it ({e.strerror})")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SystemExit(f"train.py: --config {name}: not valid JSON ({e})")
        except (TypeError, ValueError) as e:           # unknown keys, or values the config refuses
            raise SystemExit(f"train.py: --config {name}: not a NestedUNet config: {e}")
    if name in video.VIDEO_PRESETS:
        return video.preset(name)
    if name not in PRESETS:
        raise SystemExit(f"train.py: --config {name}: not a JSON file and not a preset; the presets are "
                         f"{', '.join(list(PRESETS) + list(video.VIDEO_PRESETS))}")
    return preset(name)


def check_args(args, world_size: int, cfg: NestedUNetConfig):
    """Every mistake we can see before training starts, each said in one line that names the
    flag, its value and what is expected."""
    def fail(msg):
        raise SystemExit(f"train.py: {msg}")

    pos_int, nonneg_int = utils.at_least(1), utils.at_least(0)
    utils.check_flags("train.py", args, [
        ("--steps", pos_int, "at least 1 step per stage, e.g. 300,800"),
        ("--batch", pos_int, "a batch of at least 1 per stage, e.g. 64,32"),
        ("--accum", pos_int, "at least 1 micro-batch per step"),
        ("--data-limit", nonneg_int, "a number of images >= 0 (0: all)"),
        ("--workers", nonneg_int, "a number of loader processes >= 0"),
        ("--lr", utils.positive, "a positive learning rate, e.g. 1e-4"),
        ("--warmup", nonneg_int, "a number of warm-up steps >= 0"),
        ("--clip", lambda v: v > 0, "a positive gradient norm (inf: no clipping)"),
        ("--ema", lambda v: utils.finite(v) and 0 <= v < 1, "an EMA decay in [0, 1), e.g. 0.9999"),
        ("--ema-power", utils.positive, "a positive EMA warm-up power, e.g. 0.667"),
        ("--high-res-fraction", lambda v: utils.finite(v) and 0 < v <= 1, "a fraction in (0, 1]"),
        ("--cond-drop", lambda v: utils.finite(v) and 0 <= v < 1, "a dropout probability in [0, 1), e.g. 0.1"),
        ("--loss-weights", utils.at_least(0), "weights >= 0, one per level, e.g. 1,4"),
        ("--shift-power", utils.at_least(0), "an exponent >= 0 (2: SNR / s^2; 1: the official 256 px model)"),
        ("--seed", nonneg_int, "an integer >= 0"),
        ("--log-every", pos_int, "a number of steps >= 1"),
        ("--ckpt-every", pos_int, "a number of steps >= 1"),
        ("--sample-every", pos_int, "a number of steps >= 1"),
        ("--sample-steps", pos_int, "at least 1 sampling step"),
        ("--sample-guidance", utils.finite, "a finite guidance scale, e.g. 3"),
        ("--eval-every", nonneg_int, "a number of steps >= 0 (0: never)"),
        ("--eval-samples", utils.at_least(2), "at least 2 images (a covariance needs 2)"),
        ("--eval-real", utils.at_least(2), "at least 2 images (a covariance needs 2)"),
        ("--eval-steps", pos_int, "at least 1 sampling step"),
        ("--stop-after", nonneg_int, "a number of steps >= 0 (0: run to the end)"),
    ])
    utils.check_device("train.py", args.device)
    if args.name is not None and (not args.name.strip() or "/" in args.name or args.name in (".", "..")):
        fail(f"--name {args.name!r}: expected a folder name (no '/'), e.g. --name my-run")
    if args.loss_weights is not None and not any(args.loss_weights):
        fail(f"--loss-weights {fmt(args.loss_weights)}: at least one weight must be > 0")
    sizes = parse_sizes(args.res)
    if not (len(sizes) == len(args.steps) == len(args.batch)):
        fail(f"--res {args.res}, --steps {fmt(args.steps)} and --batch {fmt(args.batch)} must have "
             f"one entry per stage each (got {len(sizes)}, {len(args.steps)} and {len(args.batch)})")
    for lo, hi in zip(sizes, sizes[1:]):
        if hi == lo or any(h < l or h % l for h, l in zip(hi, lo)):
            fail(f"--res {args.res}: each resolution must be an integer multiple of the previous one, "
                 f"and larger ({fmt_size(hi)} / {fmt_size(lo)} is not)")
    levels = cfg.level_sizes()
    names = fmt(fmt_size(s) for s in levels)
    if len(sizes) > len(levels):
        fail(f"--res {args.res} has {len(sizes)} stages, but {args.config} has only {len(levels)} levels ({names})")
    for s in sizes:
        if s not in levels:
            fail(f"--res {args.res}: {args.config} has no level of size {fmt_size(s)}; its levels are {names}")
    for b in args.batch:
        if b % (world_size * args.accum):
            fail(f"--batch {fmt(args.batch)}: each batch must be divisible by the number of processes "
                 f"({world_size}) times --accum ({args.accum})")
    if any(s < 1 for s in args.steps):
        fail(f"--steps {fmt(args.steps)}: every stage needs at least one step")
    if not 0 < args.high_res_fraction <= 1:
        fail(f"--high-res-fraction {args.high_res_fraction}: must be in (0, 1]")
    if args.loss_weights is not None and len(args.loss_weights) != len(levels):
        fail(f"--loss-weights {fmt(args.loss_weights)}: expected one weight per level of the model, "
             f"lowest first ({len(levels)}: {names})")
    if args.channels_last and cfg.frames > 1:
        fail("--channels-last is for images (4-D tensors); a video model's inputs are 5-D")
    if args.eval_every and (args.streaming or cfg.frames > 1):
        fail("--eval-every measures images against a local data set's real images; for a streamed "
             "data set or a video model, evaluate the saved model afterwards (evaluate.py, video.py evaluate)")


def fmt(values) -> str:
    return ",".join(str(v) for v in values)


def fmt_size(size) -> str:
    frames, res = size
    return f"{frames}x{res}" if frames > 1 else str(res)


# ---------------------------------------------------------------------------------------
# Distributed data parallel (plain torch: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
# ---------------------------------------------------------------------------------------

def setup_distributed(device_arg):
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if not use_cuda:                           # share the cores between the processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return rank, world, device


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


# ---------------------------------------------------------------------------------------
# EMA (appendix B: decay 0.9999), with k-diffusion's warm-up so that short runs average
# over a window that grows with the run instead of over their random initialisation
# ---------------------------------------------------------------------------------------

def ema_decay(step: int, max_decay: float, power: float) -> float:
    return min(max_decay, 1 - (1 + step) ** -power)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)             # e = decay * e + (1 - decay) * p


# ---------------------------------------------------------------------------------------
# Randomness per sample: the diffusion time, the noise of every resolution, the conditioning
# dropout and the mixed-resolution draw of a sample are a function of (seed, step, its index
# in the data set). A step then computes the same thing however the batch is split over
# processes or micro-batches (1 process = N processes = gradient accumulation), and a
# resumed run draws exactly what the run it continues would have drawn.
#
# A generator per sample would need a Python loop over the batch. Instead the numbers are
# drawn by a counter-based generator: number j of stream s of a sample is a hash of (sample,
# s, j), computed for the whole batch at once on the device. The hash is Chris Wellons'
# "lowbias32" (every input bit flips every output bit with probability close to 1/2), in
# int64 arithmetic that never overflows; two uniforms make two normals (Box-Muller).
# ---------------------------------------------------------------------------------------

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for 32-bit values held in int64, in two 16-bit halves of c (no overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=16)
def _hashed_counter(n: int, device: torch.device) -> torch.Tensor:
    return hash32(torch.arange(n, device=device, dtype=torch.int64))


def uniforms(sample_keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """(B, n) uniforms in (0, 1): number j of the given stream of each sample."""
    base = hash32((sample_keys + stream * 0x9E3779B9) & M32)          # one key per (sample, stream)
    j = _hashed_counter(n, sample_keys.device)
    return ((hash32(j[None, :] ^ base[:, None]) >> 8).float() + 0.5) / 2 ** 24   # 24 random bits


def normals(sample_keys: torch.Tensor, stream: int, shape: tuple) -> torch.Tensor:
    n = math.prod(shape)
    u = uniforms(sample_keys, stream, 2 * n)
    z = torch.sqrt(-2 * torch.log(u[:, :n])) * torch.cos(2 * math.pi * u[:, n:])
    return z.view(-1, *shape)


def per_sample_randomness(keys: torch.Tensor, step: int, seed: int, shapes: list[tuple], device):
    """For each sample (its index in the data set in `keys`): its diffusion time t, the noise
    of every level (shapes without the batch), and two uniforms for the conditioning dropout
    and the mixed-resolution draw. Those two stay on the CPU, where the batch is reordered;
    what goes to the device goes without waiting for it (to_device)."""
    k = torch.as_tensor(keys, dtype=torch.int64).cpu() & M32
    k = hash32(hash32(hash32(torch.tensor(seed & M32)) ^ (step & M32)) ^ k)
    t, u_drop, u_high = uniforms(k, 0, 3).unbind(1)
    k = to_device(k, device)
    noises = [normals(k, 1 + i, shape) for i, shape in enumerate(shapes)]
    return to_device(t, device), noises, u_drop, u_high


def prepare_batch(batch: dict, model, encoder, cond_kind: str, step: int, args, rank: int, world: int, device):
    """One micro-batch from the loader, made ready for diffusion.loss: images, diffusion
    times, noises and conditions on the device, with the conditioning dropout and the
    mixed-resolution draw applied. Returns (x, t, noises, cond, n_high)."""
    # x: (B, 3, R, R) in [-1, 1] at this stage's top resolution R; for a video stage
    # (B, 3, T, R, R). An image stage of a video run takes the clips' first frames (video.py's
    # temporal D^r). B here is one process's micro-batch.
    x = to_device(batch["image"], device)          # (the loader pins it on a GPU machine)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # A sample's key: its index in the data set (a streamed set has no global index; its
    # position in this rank's stream, made unique across ranks).
    keys = batch["index"] * world + rank if args.streaming else batch["index"]
    shapes = [s[1:] for s in model.input_shapes(1)]
    t, noises, u_drop, u_high = per_sample_randomness(keys, step, args.seed, shapes, device)
    # Conditioning dropout (--cond-drop, 10% by default): those samples learn the null
    # condition, which classifier-free guidance contrasts with at sampling time (decided on
    # the CPU). Its null text is no visible token, or for the released models' architecture
    # (null_text="empty_prompt") the caption "".
    drop = u_drop < args.cond_drop
    # The condition: text features (B, L, text_channels) of the frozen encoder (a fixed
    # caption set is encoded once and looked up), or class labels (B,).
    cond = {}
    if cond_kind == "text":
        captions = batch["caption"]
        if model.config.null_text == "empty_prompt":
            captions, drop = ["" if d else c for c, d in zip(captions, drop.tolist())], torch.zeros_like(drop)
        cond = encoder.condition(captions, device)
    elif cond_kind == "label":
        cond = {"label": to_device(batch["label"], device)}
    cond = model.null_condition(cond, drop)
    # Mixed-resolution training (appendix B): each sample reaches the highest level with
    # probability --high-res-fraction; all samples train the lower levels. The NestedUNet
    # runs its outermost level on the first n_high rows only, so those samples go first;
    # the rest skip the costliest resolution.
    if len(model.resolutions) > 1:
        high = u_high < args.high_res_fraction
    else:
        high = torch.ones_like(u_high, dtype=torch.bool)
    order = torch.argsort((~high).int(), stable=True)
    n_high = int(high.sum())                       # on the CPU: no sync
    od = to_device(order, device)
    x, t = x[od], t[od]
    noises = [n[od] for n in noises]
    noises[-1] = noises[-1][:n_high]
    cond = {k: v[od] for k, v in cond.items()}
    return x, t, noises, cond, n_high


# ---------------------------------------------------------------------------------------
# Checkpoints: the whole state, written atomically
# ---------------------------------------------------------------------------------------

def rng_states() -> dict:
    """Every generator's state as tensors, numbers and tuples only, so that checkpoint.pt
    loads with torch.load(weights_only=True): numpy's state is (name, 624 uint32 keys, pos,
    has_gauss, cached_gaussian), its key array is stored as an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict):
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------
# Logs and pictures
# ---------------------------------------------------------------------------------------

def plot_losses(log_path: Path, out: Path):
    """The loss of every resolution against steps; and, when the run was evaluated, its
    metrics (FD-EffNet, class accuracy) in a second panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    # Keys are loss_64, loss_256, or loss_16x64 for a video level (fmt_size): order by pixels.
    sizes = {k: parse_sizes(k[5:])[0] for r in rows for k in r if k.startswith("loss_")}
    evals = [k for k in ("eval_fd_effnet", "eval_class_acc") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(evals), figsize=(7 + 4 * len(evals), 4), squeeze=False)
    ax = axes[0, 0]
    for k in sorted(sizes, key=lambda k: math.prod(sizes[k])):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        frames, res = sizes[k]
        ax.plot(*zip(*pts), label=f"{res}x{res}" + (f", {frames} frames" if frames > 1 else ""))
    for r in rows:
        if "stage_start" in r:
            ax.axvline(r["stage_start"], color="grey", linestyle=":", lw=1)
    ax.set(xlabel="step", ylabel="v-prediction MSE", yscale="log",
           title="training loss per resolution (dotted: a new stage starts)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    for ax, k in zip(axes[0, 1:], evals):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), marker="o")
        ax.set(xlabel="step", title={"eval_fd_effnet": "FD-EffNet (lower is better)",
                                     "eval_class_acc": "class accuracy of samples"}[k])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

class Batches:
    """An endless stream of one rank's batches, whose position (epoch, samples seen in it) is
    saved in checkpoints and restored on resume."""

    def __init__(self, dataset, args, batch: int, rank: int, world: int, epoch=0, pos=0):
        self.dataset, self.args, self.batch, self.rank, self.world = dataset, args, batch, rank, world
        self.epoch, self.pos, self.skipped = epoch, pos, 0
        self._start()

    def _start(self):
        if self.args.streaming:
            stream = data.stream_hf(self.args.data, self.dataset.size, self.rank, self.world,
                                    self.args.seed + self.epoch, self.pos,
                                    image_column=self.args.image_column, caption_column=self.args.caption_column)
            self.it = self.chunks(stream)
            return
        sampler = data.ResumableSampler(self.dataset, self.world, self.rank, self.args.seed)
        sampler.set_position(self.epoch, self.pos)
        loader = DataLoader(self.dataset, batch_size=self.batch, sampler=sampler, drop_last=True,
                            collate_fn=data.collate, num_workers=self.args.workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        self.it = iter(loader)

    def chunks(self, stream):
        while len(chunk := list(itertools.islice(stream, self.batch))) == self.batch:
            yield data.collate(chunk)

    def __next__(self):
        while True:
            try:
                b = next(self.it)
            except StopIteration:                  # end of an epoch (or of the stream)
                self.epoch, self.pos = self.epoch + 1, 0
                self._start()
                continue
            self.pos += self.batch
            self.skipped += b["skipped"]
            if "image" in b:
                return b

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}


class StreamInfo:
    """What Batches needs to know of a streamed data set (it has no length)."""

    def __init__(self, size):
        self.size = size


def stage_of(ckpt) -> int:
    return ckpt["stage"] if ckpt else 0


def find_run(args) -> Path | None:
    if args.resume is None:
        return None
    if args.resume != "latest":
        run = Path(args.resume)
        if not (run / "checkpoint.pt").exists():
            raise SystemExit(f"train.py: --resume {run}: no checkpoint.pt in that folder")
        return run
    runs = sorted(Path(args.out).glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"train.py: --resume: no run with a checkpoint in {args.out}/")
    return runs[-1].parent


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))   # torchrun's; the processes start below, after the checks

    # -- resume: the run's own arguments win, the command line only says where it is --
    run_dir = find_run(args)
    ckpt = None
    if run_dir is not None:
        try:
            ckpt = utils.load_torch_file(run_dir / "checkpoint.pt")
        except ValueError as e:
            raise SystemExit(f"train.py: --resume: {e}")
        keep = {"resume": args.resume, "device": args.device, "workers": args.workers}
        defaults = vars(parse_args([]))            # for options newer than the checkpoint
        args = argparse.Namespace(**{**defaults, **ckpt["args"], **keep})

    # The config of the whole model (every level); each stage trains a truncation of it.
    fill_recipe(args)
    cfg_full = load_model_config(args.config)
    check_args(args, world, cfg_full)
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0

    # -- a trained run to start from (a converted released model, or one of ours) --
    init, init_meta = None, {}
    if args.init_from is not None and ckpt is None:
        try:
            init, init_meta = pipeline.load_weights(pipeline.find_weights(args.init_from))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: --init-from: {e}")
    if args.text_encoder is None:                  # resolved once, and saved with the arguments
        args.text_encoder = init_meta.get("text_encoder") or "minilm"
    if args.text_tokenization is None:
        args.text_tokenization = init_meta.get("text_tokenization", "hf")

    # -- data (its checks run before any model is built). Each stage reads its images at its
    # own top resolution, as the paper's stages do (its 64x64 stage is a 64x64 training run).
    sizes = parse_sizes(args.res)
    is_video = any(c.temporal_axis for c in cfg_full.levels())

    def make_dataset(size):
        frames, res = size
        if args.streaming:
            return StreamInfo(res)
        try:
            if args.data == "emoji-motion":     # video.py's clips; an image stage uses their first frames
                ds = video.EmojiMotion(size=res, frames=cfg_full.frames)
            else:
                ds = data.load_dataset(args.data, res, image_column=args.image_column,
                                       caption_column=args.caption_column, label_column=args.label_column)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: {e}")
        return torch.utils.data.Subset(ds, range(min(args.data_limit, len(ds)))) if args.data_limit else ds

    dataset = make_dataset(sizes[stage_of(ckpt)])
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset   # without --data-limit
    if args.streaming:
        has_text, class_names = True, None
    else:
        has_text = getattr(base, "captions", None) is not None or getattr(base, "caption_column", None)
        class_names = getattr(base, "class_names", None)
        if len(dataset) < args.batch[0] // world:
            raise SystemExit(f"train.py: --data {args.data} has {len(dataset)} images, fewer than one "
                             f"batch per process ({args.batch[0] // world})")
    cond_kind = args.cond if args.cond != "auto" else ("text" if has_text else "label" if class_names else "none")
    if cond_kind == "label" and not class_names:
        raise SystemExit(f"train.py: --cond label: {args.data} has no class labels")
    if cond_kind == "text" and not has_text:
        raise SystemExit(f"train.py: --cond text: {args.data} has no captions (--caption-column "
                         f"{args.caption_column})")
    # The text encoder is frozen (FLAN-T5 XL in the paper; MiniLM offline here):
    # it runs without gradients, and only the model's own projection of its features trains.
    encoder = None
    if cond_kind == "text":                        # a stream's captions do not come back: no cache
        try:
            encoder = data.TextEncoder(args.text_encoder, device=device, tokenization=args.text_tokenization,
                                       **({"cache_size": 0} if args.streaming else {}))
        except ValueError as e:
            raise SystemExit(f"train.py: {e}")
    if encoder is not None and not args.streaming:
        if base.captions is not None:
            encoder(list(dict.fromkeys(base.captions)))   # a fixed caption set: encode it once, now
    # The conditioning inputs are set by the data, not by the preset: the encoder's width, or
    # the number of classes (0 for what the run does not use).
    cfg_full = NestedUNetConfig(**{**cfg_full.to_dict(),
                                   "text_channels": encoder.dim if encoder else 0,
                                   "num_classes": len(class_names) if cond_kind == "label" else 0})
    # The sampling side of the diffusion config (its thresholding) comes with --init-from's run.
    dcfg = DiffusionConfig(shift_power=args.shift_power, loss_weights=args.loss_weights, loss_levels=args.loss_levels,
                           thresholding=init_meta.get("diffusion_config", {}).get("thresholding", "imagen"))

    # -- the run folder --
    if run_dir is None:
        name = args.name or f"{datetime.now():%Y%m%d-%H%M%S}-{Path(args.data).name}"
        run_dir = Path(args.out) / name
    if is_main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    log_path = run_dir / "log.jsonl"
    if ckpt and is_main and log_path.exists():     # drop what was logged after the checkpoint
        rows = [r for r in log_path.read_text().splitlines() if r.strip()]
        log_path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= ckpt["step"]))

    # -- model, EMA, optimizer of a stage --
    # A video model's levels are built by video.py (temporal attention, time-axis resampling);
    # everything else in this script is the same for images and video.
    build = video.build_level if is_video else NestedUNet

    def make_diffusion(model):
        """The diffusion process of a stage's model. --loss-weights gives one weight per level
        of the whole model, lowest first; a stage takes those of its own levels."""
        n = len(model.levels())
        stage_cfg = dataclasses.replace(dcfg, loss_weights=dcfg.loss_weights[:n] if dcfg.loss_weights else None)
        return (video.diffusion_for if is_video else MatryoshkaDiffusion.for_model)(model, stage_cfg)
    def build_stage(stage, model=None, ema=None):
        """Stage 0 builds the innermost model; a later stage grows the previous one."""
        cfg = cfg_full.truncated(sizes[stage][1], sizes[stage][0])
        if model is None:
            torch.manual_seed(args.seed)               # the same initial weights on every rank
            if init is not None and init.config.to_dict() != cfg.to_dict():
                # --init-from a smaller model: it becomes this stage's inner levels, and the new
                # levels start as grow() starts them (section 3.3).
                try:
                    model = grow(init.to(device), cfg, build)
                except ValueError as e:
                    raise SystemExit(f"train.py: --init-from {args.init_from}: {e}")
            else:
                model = build(cfg).to(device)
                if init is not None:               # --init-from the same model: fine-tuning
                    model.load_state_dict(init.state_dict())
            ema = build(cfg).to(device)
            ema.load_state_dict(model.state_dict())
        else:
            # The new level starts from the same random weights in the model and its EMA.
            torch.manual_seed(args.seed + stage)
            model = grow(model, cfg, build)
            torch.manual_seed(args.seed + stage)
            ema = grow(ema, cfg, build)
        ema.requires_grad_(False).eval()
        if args.grad_ckpt:
            for level in model.levels()[1:]:
                level.gradient_checkpointing = True
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # A fresh optimizer per stage (the grown model has new parameters), with its own
        # warm-up: appendix B's 30k steps, or a tenth of a short stage.
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
        warm = max(1, args.warmup if args.warmup is not None else min(30_000, args.steps[stage] // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return model, ema, opt, sched

    # Steps are counted over the whole run: stage s ends at stage_ends[s] (--steps 300,800
    # gives [300, 1100]).
    stage_ends = np.cumsum(args.steps).tolist()
    step = ckpt["step"] if ckpt else 0
    stage = ckpt["stage"] if ckpt else 0
    model, ema, opt, sched = build_stage(0)
    for s in range(1, stage + 1):                   # a resumed run rebuilds its stage's shape
        model, ema, opt, sched = build_stage(s, model, ema)
    if ckpt:
        # The whole state (DESIGN point 12): weights, EMA, Adam's moments, the schedule's step,
        # and each rank's RNG states (ranks beyond those saved take the last rank's).
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_states(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
    else:
        torch.manual_seed(args.seed * 1000 + rank)  # per-rank seed for everything not per-sample

    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # The model that runs the step: DDP all-reduces the gradients during backward. Compiling
    # the DDP-wrapped model is the order PyTorch documents (its DDPOptimizer cuts the graph at
    # the gradient buckets, so communication still overlaps the backward pass). `model` stays
    # the plain module: its state dict, the EMA and grow() use it.
    def wrap(model):
        m = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        return torch.compile(m) if args.compile else m

    train_model = wrap(model)
    diffusion = make_diffusion(model)
    # --batch is the global batch of a step: world processes x accum micro-batches x micro.
    micro = args.batch[stage] // (world * args.accum)
    batches = Batches(dataset, args, micro, rank, world, **(ckpt["data"] if ckpt else {}))
    # What sample.py needs besides the weights. The model and diffusion configs are those of
    # the current stage (written at save time): a file saved before the last stage holds the
    # weights of a smaller model, and its metadata must say so.
    meta = {"cond": cond_kind,
            "text_encoder": args.text_encoder if encoder else None, "class_names": class_names,
            "text_tokenization": args.text_tokenization, **({"sampling": init_meta["sampling"]} if "sampling" in init_meta else {}),
            "data": args.data, "res": args.res, "video": is_video, "data_limit": args.data_limit}

    # Fixed conditions for the sample grids: the same prompts all through the run.
    grid_cond, grid_captions = None, None
    if is_main and not args.no_samples:
        n = 8
        if cond_kind == "text":
            pool = getattr(base, "captions", None) or ["a smiling face", "a red heart", "a cat", "a rocket"]
            rng = np.random.default_rng(0)
            grid_captions = [pool[i] for i in rng.choice(len(pool), n, replace=False)] if len(pool) >= n else pool
            grid_cond = encoder.condition(grid_captions, device)
        elif cond_kind == "label":
            labels = torch.arange(n) % len(class_names)
            grid_captions = [class_names[i] for i in labels]
            grid_cond = {"label": labels.to(device)}
        else:
            grid_cond = {}

    def save_samples(tag):
        # The EMA model (what sample.py will use), guided, with DDIM and a fixed seed: the
        # grids of successive steps start from the same noise and differ by training alone.
        if grid_cond is None:
            return
        with autocast:
            levels = pipeline.generate(ema, make_diffusion(ema), grid_cond, len(grid_captions or [0] * 8),
                                       sampler="ddim", num_inference_steps=args.sample_steps,
                                       guidance_scale=args.sample_guidance, seed=0)
        if ema.config.frames > 1:
            video.save_levels_figure(levels, run_dir / "samples" / f"{tag}.png")
            video.save_gif(levels[-1], run_dir / "samples" / f"{tag}.gif")
        else:
            data.save_matryoshka(levels, run_dir / "samples" / f"{tag}.png", captions=grid_captions)

    # Metrics during training (evaluate.py), at the final resolution only: samples of the EMA
    # model without guidance (as in the paper's Fig. 4), FD-EffNet against real images, and for
    # class-conditional models the accuracy of a classifier of the real data on them.
    evaluator = None
    if args.eval_every and is_main:
        import evaluate
        evaluator = {"features": evaluate.EffNetFeatures(device)}
        evaluator["real"] = evaluate.real_stats(args.data, sizes[-1][1], args.eval_real, evaluator["features"])
        if cond_kind == "label":
            evaluator["classifier"] = evaluate.train_classifier(args.data, sizes[-1][1])[0]   # on the CPU, with the images

    def run_eval(train_seconds):
        import evaluate
        t0 = time.perf_counter()
        with autocast:
            images, labels = evaluate.generate_set(ema, make_diffusion(ema), cond_kind, args.eval_samples,
                                                   class_names, eval_captions, encoder, guidance=1.0,
                                                   steps=args.eval_steps, seed=1234)
        row = {"step": step, "eval_fd_effnet": evaluate.fd_effnet(images, evaluator["real"], evaluator["features"]),
               "time": train_seconds}
        if cond_kind == "label":
            row["eval_class_acc"] = evaluate.accuracy(evaluator["classifier"], images, labels)
        row["eval_seconds"] = time.perf_counter() - t0
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("eval_")))

    def save_checkpoint():
        # NaN guard: never write a checkpoint from a diverged model (on any rank).
        bad = nonfinite | ~torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        if mean_over_ranks(bad.float()).item() > 0:
            raise FloatingPointError
        states = [rng_states()]
        if dist.is_initialized():
            states = [None] * world
            dist.all_gather_object(states, rng_states())
        stage_meta = {**meta, "model_config": ema.config.to_dict(), "diffusion_config": vars(diffusion.config)}
        if is_main:
            utils.atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "step": step, "stage": stage, "rng": states,
                         "data": batches.state(), "args": vars(args), "meta": stage_meta,
                         "train_time": train_time["s"]}, run_dir / "checkpoint.pt")
            save_weights(run_dir / "ema.safetensors", ema.state_dict(), {**stage_meta, "step": step})

    # A polite stop (Ctrl-C, SIGTERM from a cluster) saves before exiting; SIGKILL cannot be
    # caught, and then the last checkpoint (at most --ckpt-every steps old) is what remains.
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *a: stop.update(now=True))

    if is_main:
        print(summary(model, f"{args.config} (stage {stage + 1} of {len(sizes)})"))
        print(f"run folder: {run_dir}   data: {args.data} ({cond_kind}-conditional)   device: {device}"
              f" x {world}{'   bf16' if use_bf16 else ''}")
    bar = tqdm(total=stage_ends[-1], initial=step, disable=not is_main, dynamic_ncols=True)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    train_time = {"s": ckpt.get("train_time", 0.0) if ckpt else 0.0}   # training seconds, evals excluded
    eval_captions = None
    if cond_kind == "text" and not args.streaming:
        eval_captions = [base.captions[i] for i in np.random.default_rng(1).permutation(len(base))]
    loss_sum = torch.zeros(len(model.resolutions) + 1, device=device)   # per level, then the total
    n_logged, t_log, wait = 0, time.perf_counter(), 0.0
    stage_start = ckpt is None
    try:
        steps_run = 0
        while step < stage_ends[-1]:
            model.train()
            for micro_step in range(args.accum):
                # The time spent here is time the model waits for data: logged as data_wait
                # (workers decode and resize the next batches while the model runs).
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                x, t, noises, cond, n_high = prepare_batch(batch, model, encoder, cond_kind, step, args,
                                                           rank, world, device)
                # Gradient accumulation under DDP: only the last micro-batch all-reduces the
                # gradients; the earlier ones add to .grad locally (no_sync). Not under
                # --compile, where no_sync is avoided: there every micro-batch all-reduces
                # (the same result, more communication).
                sync = micro_step == args.accum - 1 or world == 1
                ctx = train_model.no_sync() if (world > 1 and not sync and not args.compile) else nullcontext()
                with ctx, autocast:
                    loss, per_level = diffusion.loss(train_model, x, cond, t=t, noises=noises,
                                                     high_res_batch=n_high,
                                                     high_res_fraction=args.high_res_fraction
                                                     if len(model.resolutions) > 1 else None)
                    (loss / args.accum).backward()    # the mean over micro-batches, as one big batch
                # Summed on the device, read once per log interval: reading a loss every step
                # (.item()) would make the CPU wait for the GPU at every step.
                loss_sum += torch.stack([*per_level, loss]).detach() / args.accum
                nonfinite |= ~torch.isfinite(loss.detach())
            # Appendix B: gradients clipped at norm 2.0, Adam, linear warm-up, then the EMA.
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            update_ema(ema, model, ema_decay(step, args.ema, args.ema_power))
            n_logged += 1
            bar.update(1)

            if step % args.log_every == 0 or step == stage_ends[stage]:
                *losses, total = (mean_over_ranks(loss_sum) / n_logged).tolist()   # the one sync of a log interval
                if not all(math.isfinite(v) for v in losses) or nonfinite.item():
                    raise FloatingPointError
                dt = time.perf_counter() - t_log
                train_time["s"] += dt
                row = {"step": step, "stage": stage + 1, "time": train_time["s"], "mse_sum": sum(losses), "loss": total,
                       "lr": sched.get_last_lr()[0],
                       "steps_per_s": n_logged / dt, "images_per_s": n_logged * args.batch[stage] / dt,
                       "data_wait": wait / dt, "skipped": batches.skipped,
                       **{f"loss_{fmt_size(z)}": v for z, v in zip(model.config.level_sizes(), losses)}}
                if stage_start:
                    row["stage_start"], stage_start = step - n_logged, False   # the step the stage began at
                if is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix_str(" ".join(f"{fmt_size(z)}px {v:.4f}"
                                                 for z, v in zip(model.config.level_sizes(), losses)))
                loss_sum.zero_()
                n_logged, t_log, wait = 0, time.perf_counter(), 0.0
            # Sample grids and evaluations are not training: their time is left out of the
            # logged training time and speed (t_log moves on by as much). On a GPU the step's
            # queued work is waited for first, so that it counts as training.
            grids = is_main and not args.no_samples and (step % args.sample_every == 0 or step in stage_ends)
            evals = evaluator and sizes[stage] == sizes[-1] and (step % args.eval_every == 0 or step == stage_ends[-1])
            if grids or evals:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t_aside = time.perf_counter()
                if grids:
                    save_samples(f"step{step:07d}")
                    plot_losses(log_path, run_dir / "loss.png")
                if evals:
                    run_eval(train_time["s"] + t_aside - t_log)   # training seconds up to now
                t_log += time.perf_counter() - t_aside
            if step == stage_ends[stage] and stage < len(sizes) - 1:
                # Stage boundary: grow the model and its EMA into the next stage's NestedUNet,
                # and checkpoint the grown model (a run resumed from here starts the new stage).
                stage += 1
                model, ema, opt, sched = build_stage(stage, model, ema)
                train_model = wrap(model)
                diffusion = make_diffusion(model)
                dataset = make_dataset(sizes[stage])
                batches = Batches(dataset, args, args.batch[stage] // (world * args.accum), rank, world,
                                  **batches.state())
                loss_sum = torch.zeros(len(model.resolutions) + 1, device=device)
                stage_start = True
                if is_main:
                    bar.write(f"stage {stage + 1}: grown to {fmt(fmt_size(s) for s in model.config.level_sizes())}\n"
                              + summary(model))
                save_checkpoint()
            elif step % args.ckpt_every == 0 or step == stage_ends[-1] or stop["now"]:
                save_checkpoint()
            steps_run += 1
            if steps_run == args.stop_after and step < stage_ends[-1]:
                stop["now"] = True
                if step % args.ckpt_every and step not in stage_ends:
                    save_checkpoint()
            if stop["now"]:
                if is_main:
                    bar.write(f"stopped at step {step}; resume with: python train.py --resume {run_dir}")
                break
    except KeyboardInterrupt:
        save_checkpoint()
        if is_main:
            bar.write(f"\ninterrupted at step {step}; saved. Resume with: python train.py --resume {run_dir}")
    except FloatingPointError:
        if is_main:
            print(f"\ntrain.py: the loss is NaN or infinite at step {step}: stopping. The last good "
                  f"checkpoint ({run_dir / 'checkpoint.pt'}) is kept; try a lower --lr or a smaller --clip.",
                  file=sys.stderr)
        sys.exit(1)
    finally:
        bar.close()
    if is_main:
        plot_losses(log_path, run_dir / "loss.png")
        how = (f"python video.py sample --ckpt {run_dir} \"a prompt\"" if sizes[-1][0] > 1 else
               f"python sample.py --ckpt {run_dir} " + ("--label <class>" if cond_kind == "label" else
                                                         "\"a prompt\"" if cond_kind == "text" else ""))
        print(f"done: {run_dir}/ema.safetensors (sample with: {how.strip()})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    main()
