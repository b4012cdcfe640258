"""
Text-to-video Matryoshka Diffusion (section 4, appendix A: MDM-S64T16, MDM-S64T16S256).

The same nesting carries time. For MDM-S64T16S256 the levels are, lowest first,

    1. the first frame, as an image, 64x64          (the image UNet of MDM-S64)
    2. all 16 frames at 64x64                        (a "temporal" level)
    3. all 16 frames at 256x256                      (a spatial level over frames)

and D^r, the down-sampling operator of Eq. 2, is average pooling in space and first-frame
indexing in time (section 4.1): the image level's target is the video's first frame.

The temporal level works at one spatial size and several *temporal resolutions* (appendix A:
`temporal_resolutions=[16, 8, 4, 2, 1]`). Going down, it keeps every second frame (first-frame
indexing again, inside the level), until one frame is left: the first, which it hands to the
image UNet. Going up, features return to the frames they came from. Frames exchange
information only through temporal attention (attention over the frame axis at each
position, `num_temporal_attn_layers_per_block`): without it, every frame would be denoised
on its own. Everything else (res blocks, spatial attention, text conditioning, the
schedules, loss and samplers of diffusion.py) is the image code, applied to the frames of a
video folded into the batch.

    python train.py --config CPU-S16T8 --data emoji-motion --res 16,8x16 --steps 600,450 --batch 64,24
                                                            # the CPU demo (about 15 minutes)
    python video.py sample "a panda moving to the right"    # a GIF and the frames of every level
    python video.py evaluate                                # does the motion follow the caption?
    python video.py MDM-S64T16S256                          # a preset's summary
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

import data
import fast_layers
import utils
from diffusion import SAMPLERS, DiffusionConfig, MatryoshkaDiffusion
from nested_unet import CPU_KEYS, PAPER, TINY_INNER, NestedUNet, NestedUNetConfig, mdm_s64, zero_init
from utils import summary

# ---------------------------------------------------------------------------------------
# Layers with a time axis. Inside a video level a tensor is (B * T, C, H, W): the frames of
# each sample side by side in the batch. Each layer knows its T from the config (the
# temporal resolution it works at), not from the batch: under mixed-resolution training a
# level may receive no sample at all (B = 0), and 0 rows say nothing about T.
# ---------------------------------------------------------------------------------------


def frame_position_embedding(n: int, stride: int, dim: int, device) -> torch.Tensor:
    """Sinusoidal features of each frame's index in the clip (frame k of a level that keeps
    every stride-th frame is frame k * stride): attention alone does not know frame order,
    and motion is all about order. (n, dim)"""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None] * stride
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, device=device) / (dim // 2))
    return torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=-1)


class TemporalAttention(nn.Module):
    """Self-attention over the frames at each spatial position, then a feed-forward layer:
    (B * T, C, H, W) -> (B * H * W, T, C) -> attention -> back. Zero-initialised outputs: a
    new temporal layer starts as the identity, so an image model grown into a video model
    first denoises every frame as it would denoise an image."""

    def __init__(self, channels: int, num_heads: int, frames: int, stride: int):
        super().__init__()
        self.num_heads, self.frames, self.stride = num_heads, frames, stride
        self.norm, self.qkv = nn.LayerNorm(channels), nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))
        self.ffn = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, 4 * channels), nn.GELU(),
                                 zero_init(nn.Linear(4 * channels, channels)))

    def forward(self, x, emb, tokens=None, mask=None):
        T = self.frames
        BT, C, H, W = x.shape
        seq = x.reshape(BT // T, T, C, H * W).permute(0, 3, 1, 2).reshape(-1, T, C)   # (B*H*W, T, C)
        h = self.norm(seq) + frame_position_embedding(T, self.stride, C, x.device).to(seq.dtype)
        q, k, v = (a.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for a in self.qkv(h).chunk(3, dim=-1))
        seq = seq + self.proj_out(fast_layers.attention(q, k, v).transpose(1, 2).flatten(2))
        seq = seq + self.ffn(seq)
        return seq.reshape(BT // T, H * W, T, C).permute(0, 2, 3, 1).reshape(BT, C, H, W)


class FrameDownsample(nn.Module):
    """Halve the frames by first-frame indexing (keep frames 0, 2, 4, ...), then a per-frame
    3x3 conv. No frame is mixed with another. `frames`: the frames it receives."""

    def __init__(self, channels: int, factor: int, frames: int):
        super().__init__()
        self.factor, self.frames = factor, frames
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb, *args):
        x = x.unflatten(0, (-1, self.frames))[:, :: self.factor].flatten(0, 1)
        return self.conv(x)


class FrameUpsample(nn.Module):
    """The way back: each feature returns to the frame it came from; the frames in between
    get zeros (their information arrives through the skip connections and, from the other
    frames, through temporal attention). Then a per-frame 3x3 conv. `frames`: the frames it
    receives."""

    def __init__(self, channels: int, factor: int, frames: int):
        super().__init__()
        self.factor, self.frames = factor, frames
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb, *args):
        y = x.unflatten(0, (-1, self.frames))
        out = y.new_zeros(y.shape[0], self.frames * self.factor, *y.shape[2:])
        out[:, :: self.factor] = y
        return self.conv(out.flatten(0, 1))


# ---------------------------------------------------------------------------------------
# The levels of a video model
# ---------------------------------------------------------------------------------------

class VideoNestedUNet(NestedUNet):
    """A spatial level over the frames of a video (level 3 of MDM-S64T16S256): the image
    level's layers, run on every frame. Its inner levels are built by `build_level`."""

    def build_inner(self, config):
        return build_level(config)

    def fold_input(self, z):
        return z.flatten(0, 1) if z.dim() == 5 else z          # (B, T, C, H, W) -> (B * T, C, H, W)

    def unfold_output(self, x, batch):
        return x.unflatten(0, (batch, self.config.frames)) if self.config.frames > 1 else x


class TemporalUNet(VideoNestedUNet):
    """The temporal level (level 2 of MDM-S64T16S256): one spatial size, and at temporal
    resolution i (frames T_i) its res blocks, spatial attention and
    `num_temporal_attn_layers_per_block[i]` temporal attention layers. Between temporal
    resolutions the frames are halved (first-frame indexing) on the way down and restored
    on the way up."""

    def make_stage(self, in_ch, out_ch, i):
        stage = super().make_stage(in_ch, out_ch, i)
        c = self.config
        stride = c.temporal_resolutions[0] // c.temporal_resolutions[i]
        for _ in range((c.num_temporal_attn_layers_per_block or [0] * len(c.resolution_channels))[i]):
            stage.append(TemporalAttention(out_ch, c.num_heads, c.temporal_resolutions[i], stride))
        return stage

    def make_downsample(self, ch, i):
        t = self.config.temporal_resolutions
        return FrameDownsample(ch, t[i] // t[i + 1], t[i])

    def make_upsample(self, ch, i):
        t = self.config.temporal_resolutions
        return FrameUpsample(ch, t[i - 1] // t[i], t[i])


def build_level(config: NestedUNetConfig) -> NestedUNet:
    """The right class for each level of a video model: the image UNet for levels without
    frames, TemporalUNet for levels with temporal_axis, VideoNestedUNet for spatial levels
    over frames."""
    if config.temporal_axis:
        return TemporalUNet(config)
    if config.frames > 1:
        return VideoNestedUNet(config)
    return NestedUNet(config)


def check_temporal(config: NestedUNetConfig):
    for c in config.levels():
        if not c.temporal_axis:
            continue
        t = c.temporal_resolutions or []
        if len(t) != len(c.resolution_channels):
            raise ValueError(f"temporal_resolutions={t} needs one entry per resolution_channels entry")
        for hi, lo in zip(t, t[1:]):
            if lo >= hi or hi % lo:
                raise ValueError(f"temporal_resolutions={t}: each must be an integer multiple of the next")
        if t[-1] != 1 or (c.inner_config is not None and c.inner_config.frames != 1):
            raise ValueError("a temporal level must end at one frame: the first frame, which its inner "
                             "image model takes (temporal_resolutions=[..., 1])")


# ---------------------------------------------------------------------------------------
# Presets (appendix A) and the CPU demo's
# ---------------------------------------------------------------------------------------

def _temporal(inner, frames, channels, blocks, t_attn, schedule, resolution, **kw):
    n = len(blocks)
    return NestedUNetConfig(temporal_axis=True, temporal_resolutions=[frames // 2 ** i for i in range(n)],
                            resolutions=[resolution], resolution_channels=[channels] * n, num_res_blocks=blocks,
                            num_attn_layers_per_block=[0] * n, num_temporal_attn_layers_per_block=t_attn,
                            schedule=schedule, inner_config=inner, **kw)


VIDEO_PRESETS = {
    "MDM-S64T16": lambda **kw: _temporal(mdm_s64(), 16, 256, [2, 2, 2, 2, 1], [1, 1, 1, 1, 0], "cosine-shift4", 64,
                                         **{**PAPER, **kw}),
    "MDM-S64T16S256": lambda **kw: NestedUNetConfig(
        resolutions=[256, 128, 64], resolution_channels=[64, 128, 256], num_res_blocks=[2, 2, 1],
        num_attn_layers_per_block=[0, 0, 0], schedule="cosine-shift16",
        inner_config=_temporal(mdm_s64(), 16, 256, [2, 2, 2, 2, 1], [1, 1, 1, 1, 0], "cosine-shift4", 64),
        **{**PAPER, **kw}),
    # The CPU demo: 8 frames of 16x16 around the 16x16 image UNet of the CPU presets.
    # 8 frames hold 8 times the pixels of one: the shift is sqrt(8) (16 frames: 4, as in the paper).
    "CPU-S16T8": lambda **kw: _temporal(NestedUNetConfig(**TINY_INNER), 8, 32, [1, 1, 1, 1], [1, 1, 1, 0],
                                        "cosine-shift2.828", 16, **{**CPU_KEYS, **kw}),
}


def preset(name: str, **overrides) -> NestedUNetConfig:
    if name not in VIDEO_PRESETS:
        raise ValueError(f"unknown video preset {name!r}; the presets are: {', '.join(VIDEO_PRESETS)}")
    config = VIDEO_PRESETS[name](**overrides)
    check_temporal(config)
    return config


# ---------------------------------------------------------------------------------------
# D^r for video (section 4.1): average pooling in space, first-frame indexing in time
# ---------------------------------------------------------------------------------------

def video_downsample(config: NestedUNetConfig):
    """D^r(x, level) for clips x (B, T, C, H, W), for the levels of `config`."""
    sizes = config.level_sizes()

    def D(x, level):
        frames, res = sizes[level]
        if x.dim() == 5:                                                # clips (B, T, C, H, W)
            x = x[:, :: x.shape[1] // frames] if frames > 1 else x[:, 0]   # first-frame indexing
        if x.shape[-1] != res:
            x = F.avg_pool2d(x.flatten(0, -4), x.shape[-1] // res).unflatten(0, x.shape[:-3])
        return x
    return D


def diffusion_for(model, config: DiffusionConfig | None = None) -> MatryoshkaDiffusion:
    """The image diffusion of diffusion.py, with the video D^r."""
    return MatryoshkaDiffusion.for_model(model, config, downsample_fn=video_downsample(model.config))


# ---------------------------------------------------------------------------------------
# A text-video data set a CPU can learn: emoji that move as their caption says
# ---------------------------------------------------------------------------------------

MOTIONS = ["moving to the left", "moving to the right", "moving up", "moving down", "growing", "shrinking"]


class EmojiMotion(Dataset):
    """Clips of one emoji on the white background, moving as the caption says: "panda moving to
    the left", "rocket moving up", "grinning face growing", ... 256 emoji (without skin-tone
    variants, spread over the list) times 6 motions. Clip i shows emoji i // 6 with
    motion i % 6, with a start position and speed drawn from a generator seeded by i (the same
    clip every epoch). Frames are drawn with an affine warp of the emoji's RGBA bitmap, so the
    motion is sub-pixel smooth. Items: {"image": (T, 3, size, size), "caption", "index"}."""

    def __init__(self, size: int = 16, frames: int = 8, num_emoji: int = 256):
        sprites, names = emoji_sprites(64)
        keep = [i for i, n in enumerate(names) if "skin tone" not in n]    # no near-duplicates
        keep = keep[:: max(1, len(keep) // num_emoji)][:num_emoji]        # spread over the (sorted) list
        self.sprites, self.names = sprites[keep], [names[i] for i in keep]
        self.size, self.frames = size, frames
        self.captions = [f"{n} {m}" for n in self.names for m in MOTIONS]

    def __len__(self):
        return len(self.names) * len(MOTIONS)

    def __getitem__(self, i):
        clip = render_clip(self.sprites[i // len(MOTIONS)], i % len(MOTIONS), self.size, self.frames,
                           torch.Generator().manual_seed(i))
        return {"image": clip, "caption": self.captions[i], "index": i}


def emoji_sprites(size: int):
    """All emoji as RGBA float tensors (N, 4, size, size) in [0, 1], and their names."""
    path = data.CACHE / f"emoji-rgba-{size}.npz"
    if not path.exists():
        from PIL import ImageFont
        font = ImageFont.truetype(data.EMOJI_FONT, 109)
        entries = data.emoji_entries()
        a = np.stack([np.asarray(data.render_emoji(e, font).crop((4, 0, 132, 128)).resize((size, size), Image.Resampling.LANCZOS))
                      for e, _ in entries])
        data.CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, rgba=a, names=np.array([n for _, n in entries]))
        os.replace(tmp, path)
    f = np.load(path)
    return torch.from_numpy(f["rgba"]).permute(0, 3, 1, 2).float() / 255, list(f["names"])


def render_clip(sprite: torch.Tensor, motion: int, size: int, frames: int, g: torch.Generator) -> torch.Tensor:
    """One clip (T, 3, size, size) in [-1, 1]: the sprite (4, h, w) composited on white, its
    scale and position following the motion linearly from the first frame to the last."""
    u = torch.rand(4, generator=g)
    s = torch.linspace(0, 1, frames)
    scale = torch.full((frames,), 0.45 + 0.1 * float(u[0]))            # sprite width / canvas width
    cx, cy = torch.full((frames,), 0.2 * (float(u[1]) - 0.5)), torch.full((frames,), 0.2 * (float(u[2]) - 0.5))
    # Canvas coordinates are [-1, 1]; the sprite stays inside while |centre| <= 1 - scale. The
    # centre travels 70 to 100% of that room: half the canvas or more.
    travel = (0.7 + 0.3 * float(u[3])) * 2 * (1 - float(scale[0]))
    if motion < 4:                                                      # left, right, up, down
        sign = -1 if motion in (0, 2) else 1
        path = sign * travel * (s - 0.5)
        if motion < 2:
            cx = path
        else:
            cy = path
    else:                                                               # growing, shrinking
        grow = s if motion == 4 else 1 - s
        scale = 0.25 + 0.6 * grow
    # Affine grid: canvas point p samples the sprite at (p - centre) / scale.
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -cx / scale, -cy / scale
    grid = F.affine_grid(theta, (frames, 4, size, size), align_corners=False)
    rgba = F.grid_sample(sprite.expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    rgb, alpha = rgba[:, :3], rgba[:, 3:]
    return (rgb * alpha + (1 - alpha)) * 2 - 1                          # on white, to [-1, 1]


# ---------------------------------------------------------------------------------------
# Measuring motion: where is the emoji, and how big, in each frame
# ---------------------------------------------------------------------------------------

def motion_of(clip: torch.Tensor) -> int:
    """The motion (index into MOTIONS) that a clip (T, 3, H, W) in [-1, 1] shows, from its
    non-background pixels: the centre of mass moves left, right, up or down, or the mass
    grows or shrinks, from the first frame to the last; whichever changes most (relative to
    what a clip of the data set changes) wins."""
    w = (1 - (clip.float().clamp(-1, 1) + 1) / 2).mean(1).clamp(min=0)    # darkness: (T, H, W)
    w = torch.where(w > 0.08, w, torch.zeros_like(w))                     # ignore background noise
    T, H, W = w.shape
    mass = w.sum((1, 2)).clamp(min=1e-6)
    ys, xs = torch.linspace(-1, 1, H), torch.linspace(-1, 1, W)
    cx = (w.sum(1) * xs).sum(1) / mass
    cy = (w.sum(2) * ys).sum(1) / mass
    # first vs last third of the clip, robust to one odd frame
    k = max(1, T // 3)
    dx = float(cx[-k:].mean() - cx[:k].mean())
    dy = float(cy[-k:].mean() - cy[:k].mean())
    ds = float(torch.log(mass[-k:].mean() / mass[:k].mean()))
    scores = [-dx, dx, -dy, dy, ds / 2, -ds / 2]                          # in MOTIONS order
    return int(np.argmax(scores))


# ---------------------------------------------------------------------------------------
# Pictures: an animated GIF, and the frames of every level
# ---------------------------------------------------------------------------------------

def save_gif(clips: torch.Tensor, path, scale: int = 6, fps: int = 6):
    """Clips (N, T, 3, H, W) in [-1, 1] side by side as one looping GIF."""
    a = utils.to_uint8(clips)                                   # (N, T, H, W, 3)
    N, T, H, W, _ = a.shape
    frames = []
    for t in range(T):
        row = np.concatenate([np.pad(a[n, t], ((0, 2), (0, 2), (0, 0)), constant_values=255) for n in range(N)], 1)
        frames.append(Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.Resampling.NEAREST))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def save_levels_figure(levels: list, path):
    """One clip per column block: the image level (first frame), then every frame of each
    video level, rows from the lowest level to the highest."""
    rows = []
    for x in levels:
        x = x[:1].float()
        rows.append(x[:, None] if x.dim() == 4 else x)         # (1, T, 3, H, W)
    T = max(r.shape[1] for r in rows)
    top = max(r.shape[-1] for r in rows)
    tiles = []
    for r in rows:
        frames = [F.interpolate(r[:, t], size=(top, top), mode="nearest") if t < r.shape[1] else
                  torch.ones(1, 3, top, top) for t in range(T)]
        tiles.append(torch.cat(frames))
    utils.save_matryoshka(tiles, path, captions=[f"frame {t}" for t in range(T)])


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

def sample_clips(pipe, captions, steps=50, sampler="ddim", guidance=4.0, seed=0):
    """Clips for captions: every level, lowest first (the top one (N, T, 3, H, W))."""
    return pipe.generate(pipe.condition(prompts=captions), len(captions), seed=seed, sampler=sampler,
                         num_inference_steps=steps, guidance_scale=guidance)


def evaluate(pipe, names, n_clips=48, **kw):
    """Sample n_clips clips, one motion per caption in turn, and measure the fraction whose
    motion (motion_of) is the caption's."""
    captions, truth = [], []
    rng = np.random.default_rng(0)
    for i in range(n_clips):
        captions.append(f"{names[rng.integers(len(names))]} {MOTIONS[i % len(MOTIONS)]}")
        truth.append(i % len(MOTIONS))
    clips = []
    for i in range(0, n_clips, 16):
        clips.append(sample_clips(pipe, captions[i:i + 16], seed=i, **kw)[-1].float().cpu())
    clips = torch.cat(clips)
    pred = [motion_of(c) for c in clips]
    per_motion = {m: float(np.mean([p == t for p, t in zip(pred, truth) if t == k])) for k, m in enumerate(MOTIONS)}
    return float(np.mean([p == t for p, t in zip(pred, truth)])), per_motion, clips, captions


def parse_args(argv):
    p = utils.ArgumentParser(prog="video.py", description=__doc__.strip().split("\n\n")[0],
                             epilog="python video.py MDM-S64T16S256 (or any video preset) prints its summary; "
                                    "train with train.py: python train.py --config CPU-S16T8 --data emoji-motion "
                                    "--res 16,8x16 --steps 600,450 --batch 64,24")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=utils.ArgumentParser)
    for cmd, what in (("sample", "a GIF and the frames of every level"),
                      ("evaluate", "does the motion follow the caption?")):
        c = sub.add_parser(cmd, help=what)
        c.add_argument("prompt", nargs="?", default="grinning face moving to the right")
        c.add_argument("--ckpt", default=None, help="a run folder or ema.safetensors (default: the newest video run)")
        c.add_argument("--num-clips", type=int, default=4)
        c.add_argument("--num-inference-steps", type=int, default=50)
        c.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
        c.add_argument("--guidance-scale", type=float, default=4.0)
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--out", default=None)
    a = p.parse_args(argv)
    utils.check_flags("video.py", a, [
        ("--num-clips", utils.at_least(1), "at least 1 clip"),
        ("--num-inference-steps", utils.at_least(1), "at least 1 step"),
        ("--guidance-scale", utils.finite, "a finite guidance scale (1: no guidance), e.g. 4"),
        ("--seed", utils.at_least(0), "an integer >= 0"),
    ])
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in VIDEO_PRESETS:
        name = argv[0] if argv else "MDM-S64T16S256"
        with torch.device("meta"):
            print(summary(build_level(preset(name)), name))
        return
    a = parse_args(argv)
    from pipeline import Pipeline
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        pipe = Pipeline(a.ckpt, device, video=True)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"video.py: {err}")
    if not pipe.is_video:
        raise SystemExit(f"video.py: {pipe.path} is an image model: sample it with `python sample.py`")
    model = pipe.model
    kw = dict(steps=a.num_inference_steps, sampler=a.sampler, guidance=a.guidance_scale)
    if a.cmd == "sample":
        levels = [x.float().cpu() for x in sample_clips(pipe, [a.prompt] * a.num_clips, seed=a.seed, **kw)]
        prefix = Path(a.out or Path("samples") / ("video-" + "-".join(a.prompt.split())[:50]))
        prefix.parent.mkdir(parents=True, exist_ok=True)
        save_gif(levels[-1], f"{prefix}.gif")
        save_levels_figure(levels, f"{prefix}-levels.png")
        print(f"wrote {prefix}.gif, {prefix}-levels.png")
    else:                        # evaluate
        ds = EmojiMotion(size=model.resolutions[-1], frames=model.config.frames)
        names = ds.names                             # the emoji the model was trained on
        acc, per_motion, clips, captions = evaluate(pipe, names, n_clips=max(a.num_clips, 32), **kw)
        real = [motion_of(ds[i]["image"]) == i % len(MOTIONS) for i in range(0, min(len(ds), 600))]
        out = Path(a.out or "samples/video-eval")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_gif(clips[:12], f"{out}.gif")
        result = {"clips": len(clips), "motion_accuracy": acc, "per_motion": per_motion,
                  "measure_on_real_clips": float(np.mean(real)), "chance": 1 / len(MOTIONS), "sampler": a.sampler,
                  "steps": a.num_inference_steps, "guidance_scale": a.guidance_scale}
        Path(f"{out}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
