"""Text-to-video Matryoshka Diffusion (section 4, appendix A: MDM-S64T16, MDM-S64T16S256).

The same nesting carries time. For MDM-S64T16S256 the levels are, lowest first,

    1. the first frame, as an image, 64x64          (the image UNet of MDM-S64)
    2. all 16 frames at 64x64                        (a "temporal" level)
    3. all 16 frames at 256x256                      (a spatial level over frames)

and D^r, the down-sampling operator of Eq. 2, is average pooling in space and first-frame indexing in time
(section 4.1): the image level's target is the video's first frame.

The temporal level works at one spatial size and several *temporal resolutions* (appendix A:
`temporal_resolutions=[16, 8, 4, 2, 1]`). Going down, it keeps every second frame (first-frame indexing again,
inside the level), until one frame is left: the first, which it hands to the image UNet. Going up, features
return to the frames they came from. Frames exchange information only through temporal attention (attention
over the frame axis at each position, `num_temporal_attn_layers_per_block`): without it, every frame would be
denoised on its own. Everything else (res blocks, spatial attention, text conditioning, the schedules, loss
and samplers of diffusion.py) is the image code, applied to the frames of a video folded into the batch.

The emoji that move as their captions say (data.py's emoji-motion) are the CPU demo's data:

    python train.py --config CPU-S16T8 --data emoji-motion --res 16,8x16 --steps 600,450 --batch 64,24
    python sample.py --ckpt runs/<that run> "panda moving to the right"   # a GIF, every level's frames
    python -m tools.evaluate video --ckpt runs/<that run>                 # does the motion follow the caption?
    python video.py MDM-S64T16S256                                        # a preset's summary
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import DiffusionConfig, MatryoshkaDiffusion
from nested_unet import (CPU_KEYS, PAPER, TINY_INNER, NestedUNet, NestedUNetConfig, TokenAttention, mdm_s64,
                         summary)

# --- Layers with a time axis -----------------------------------------------------------------
# Inside a video level a tensor is (B * T, C, H, W): the frames of each sample side by side in the batch. Each
# layer knows its T from the config (the temporal resolution it works at), not from the batch: under
# mixed-resolution training a level may receive no sample at all (B = 0), and 0 rows say nothing about T.
def frame_position_embedding(n: int, stride: int, dim: int, device) -> torch.Tensor:
    """Sinusoidal features (n, dim) of each frame's index in the clip (frame k of a level keeping every
    stride-th frame is frame k * stride): attention alone does not know frame order; motion is all order."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None] * stride
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, device=device) / (dim // 2))
    return torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=-1)


class TemporalAttention(TokenAttention):
    """Self-attention over the frames at each spatial position, then a feed-forward layer (TokenAttention's
    layers): (B * T, C, H, W) -> (B * H * W, T, C) -> attention -> back. Zero-initialised outputs: a new
    temporal layer starts as the identity, so an image model grown into a video model first denoises every
    frame as it would denoise an image."""
    def __init__(self, channels: int, num_heads: int, frames: int, stride: int):
        super().__init__(channels, num_heads)
        self.frames, self.stride = frames, stride

    def forward(self, x, emb, tokens=None, mask=None):
        T = self.frames
        BT, C, H, W = x.shape
        seq = x.reshape(BT // T, T, C, H * W).permute(0, 3, 1, 2).reshape(-1, T, C)   # (B*H*W, T, C)
        h = self.norm(seq) + frame_position_embedding(T, self.stride, C, x.device).to(seq.dtype)
        q, k, v = (self.heads(a) for a in self.qkv(h).chunk(3, dim=-1))
        seq = seq + self.proj_out(self.attend(q, k, v).transpose(1, 2).flatten(2))
        seq = seq + self.ffn(seq)
        return seq.reshape(BT // T, H * W, T, C).permute(0, 2, 3, 1).reshape(BT, C, H, W)


class FrameDownsample(nn.Module):
    """Halve the frames by first-frame indexing (keep frames 0, 2, 4, ...), then a per-frame 3x3 conv. No
    frame is mixed with another. `frames`: the frames it receives."""
    def __init__(self, channels: int, factor: int, frames: int):
        super().__init__()
        self.factor, self.frames = factor, frames
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb, *args):
        return self.conv(x.unflatten(0, (-1, self.frames))[:, :: self.factor].flatten(0, 1))


class FrameUpsample(FrameDownsample):
    """The way back (FrameDownsample's layers): each feature returns to the frame it came from; the frames in
    between get zeros (their information arrives through the skip connections and, from the other frames,
    through temporal attention). Then a per-frame 3x3 conv. `frames`: the frames it receives."""
    def forward(self, x, emb, *args):
        y = x.unflatten(0, (-1, self.frames))
        out = y.new_zeros(y.shape[0], self.frames * self.factor, *y.shape[2:])
        out[:, :: self.factor] = y
        return self.conv(out.flatten(0, 1))


# --- The levels of a video model -------------------------------------------------------------
class VideoNestedUNet(NestedUNet):
    """A spatial level over the frames of a video (level 3 of MDM-S64T16S256): the image level's layers, run
    on every frame. Its inner levels are built by `build_level`."""
    def build_inner(self, config):
        return build_level(config)

    def fold(self, z, cond):
        return z.flatten(0, 1), cond                            # (B, T, C, H, W) -> (B * T, C, H, W)

    def run_stage(self, stage, x, *cond):
        # Each sample's embedding, tokens and mask serve all its frames: x holds B * T_i rows (T_i: the
        # frames of this temporal resolution).
        frames = x.shape[0] // max(cond[0].shape[0], 1)
        return super().run_stage(stage, x, *(None if a is None else a.repeat_interleave(frames, 0) for a in cond))

    def unfold(self, x, batch):
        return x.unflatten(0, (batch, self.config.frames))


class TemporalUNet(VideoNestedUNet):
    """The temporal level (level 2 of MDM-S64T16S256): one spatial size, and at temporal resolution i (frames
    T_i) its res blocks, spatial attention and `num_temporal_attn_layers_per_block[i]` temporal attention
    layers. Between temporal resolutions the frames are halved (first-frame indexing) on the way down and
    restored on the way up."""
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
    """The class of each level of a video model: the image UNet for levels without frames, TemporalUNet for
    levels with temporal_axis, VideoNestedUNet for spatial levels over frames."""
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


# --- Presets (appendix A) and the CPU demo's -------------------------------------------------
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


# --- D^r for video (section 4.1): average pooling in space, first-frame indexing in time -----
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


# --- Measuring motion: where is the emoji, and how big, in each frame ------------------------
def motion_of(clip: torch.Tensor) -> int:
    """The motion (index into data.MOTIONS) that a clip (T, 3, H, W) in [-1, 1] shows, from its non-background
    pixels: the centre of mass moves left, right, up or down, or the mass grows or shrinks, from the first
    frame to the last; whichever changes most (relative to what a clip of the data set changes) wins."""
    w = (1 - (clip.float().clamp(-1, 1) + 1) / 2).mean(1).clamp(min=0)    # darkness: (T, H, W)
    w = torch.where(w > 0.08, w, torch.zeros_like(w))                     # ignore background noise
    T, H, W = w.shape
    mass = w.sum((1, 2)).clamp(min=1e-6)
    ys, xs = torch.linspace(-1, 1, H), torch.linspace(-1, 1, W)
    cx, cy = (w.sum(1) * xs).sum(1) / mass, (w.sum(2) * ys).sum(1) / mass
    k = max(1, T // 3)   # first vs last third of the clip, robust to one odd frame
    dx, dy = (float(c[-k:].mean() - c[:k].mean()) for c in (cx, cy))
    ds = float(torch.log(mass[-k:].mean() / mass[:k].mean()))
    return int(np.argmax([-dx, dx, -dy, dy, ds / 2, -ds / 2]))            # scores in data.MOTIONS order


if __name__ == "__main__":
    # A preset's summary (training: train.py; sampling: sample.py; the motion measure: tools/evaluate.py).
    import argparse
    p = argparse.ArgumentParser(prog="video.py", description="Print a video preset's summary: its levels and sizes.")
    p.add_argument("preset", nargs="?", default="MDM-S64T16S256", choices=list(VIDEO_PRESETS))
    name = p.parse_args().preset
    with torch.device("meta"):
        print(summary(build_level(preset(name)), name))
