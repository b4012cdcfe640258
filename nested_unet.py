"""
The NestedUNet of Matryoshka Diffusion Models (Gu et al., ICLR 2024), section 3.2.

One network denoises an image at several resolutions at once. The lowest resolution is an
ordinary UNet; every higher resolution wraps the lower one like the shells of a matryoshka
doll. This is the paper's pseudocode, and `NestedUNet._forward` below follows it line by line:

    def NestedUNet(z: List[Tensor], h: Tensor = None, o: List[Tensor] = []):
        x = z[-1] if h is None else f_merge(z[-1], h)
        if len(z) > 1:  # move to next resolution
            x = f_skip(x, f_up(NestedUNet(z[:-1], f_down(x), o)))
        else:           # inner UNet at lowest resolution
            x = f_skip(x, f_up(f_mid(f_down(x))))
        o.append(x)     # return results of all resolutions
        return x

Inputs and outputs are lists ordered from the lowest to the highest resolution, as in the
pseudocode. Most parameters live in the innermost 64x64 UNet (appendix A: about 450M of
them); the outer levels are thin. The layers that connect a level to its inner model start
at zero, so that a model grown for progressive training reproduces its inner model exactly.

The layers are PyTorch's own (nn.GroupNorm, nn.Linear, F.scaled_dot_product_attention). A few
methods are hooks that other models of the family override: video.py's levels with a time
axis, and the authors' released models (tools/release.py).

Run it:
    python nested_unet.py                      # list the presets
    python nested_unet.py MDM-S64S256          # print a preset's summary (the paper's Fig. 3 in text)
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------
# The config: appendix A, key for key
# ---------------------------------------------------------------------------------------

# Keys that appendix A writes once, at the outermost level, and that hold for the whole
# model. They are copied into every inner config, so each level can be built (and grown)
# on its own and all levels agree.
GLOBAL_KEYS = ("emb_channels", "num_lm_attn_layers", "lm_feature_projected_channels",
               "text_channels", "num_classes", "in_channels", "dropout")


@dataclass
class NestedUNetConfig:
    # Per level, as in appendix A. `resolutions` are the feature-map sizes inside this level,
    # highest first: [256, 128, 64] means the level takes 256x256 inputs, works at 256, 128
    # and 64, and hands its 64x64 features to `inner_config`, whose resolutions start at 64.
    resolutions: list = field(default_factory=lambda: [64, 32, 16])
    resolution_channels: list = field(default_factory=lambda: [256, 512, 768])
    num_res_blocks: list = field(default_factory=lambda: [2, 2, 2])
    num_attn_layers_per_block: list = field(default_factory=lambda: [0, 1, 5])
    num_heads: int = 8
    schedule: str = "cosine"              # "cosine-shift4": cosine with SNR / 4^2 (diffusion.py)
    inner_config: NestedUNetConfig | None = None
    # Whole-model keys of appendix A (GLOBAL_KEYS), set at the outermost level.
    emb_channels: int = 1024              # width of the time (+ condition) embedding
    num_lm_attn_layers: int = 2           # learned self-attention layers over the text tokens
    lm_feature_projected_channels: int = 1024
    # Beyond appendix A: what the model is conditioned on, and its image channels.
    text_channels: int = 0                # width of the frozen encoder's features (2048: FLAN-T5 XL); 0: no text
    num_classes: int = 0                  # class-conditional (ImageNet); 0: no labels
    in_channels: int = 3
    dropout: float = 0.0
    # Appendix A's video keys; levels with temporal_axis=True are built by video.py.
    temporal_axis: bool = False
    temporal_resolutions: list | None = None
    num_temporal_attn_layers_per_block: list | None = None

    def __post_init__(self):
        if isinstance(self.inner_config, dict):       # rebuilt from a checkpoint's JSON
            self.inner_config = type(self)(**self.inner_config)
        if self.inner_config is not None:             # the outermost level's global keys win
            self.inner_config = dataclasses.replace(
                self.inner_config, **{k: getattr(self, k) for k in GLOBAL_KEYS})
        self.validate()

    def validate(self):
        """Bad configs fail here, with a message a person can act on, not deep in a forward.
        (The schedule names are diffusion.py's, checked where the process is built.)"""
        n = len(self.resolution_channels)
        for key in ("resolutions", "num_res_blocks", "num_attn_layers_per_block"):
            if len(getattr(self, key)) != n and not (self.temporal_axis and key == "resolutions"):
                raise ValueError(f"{key}={getattr(self, key)} must have one entry per entry of "
                                 f"resolution_channels={self.resolution_channels}")
        for hi, lo in zip(self.resolutions, self.resolutions[1:]):
            if lo >= hi or hi % lo:
                raise ValueError(f"resolutions={self.resolutions}: each resolution must be an integer "
                                 f"multiple of the next, and larger ({hi} / {lo} is not)")
        if self.inner_config is not None and self.inner_config.resolutions[0] != self.resolutions[-1]:
            raise ValueError(
                f"a level with resolutions={self.resolutions} hands {self.resolutions[-1]}x"
                f"{self.resolutions[-1]} features to its inner model, but the inner config starts at "
                f"{self.inner_config.resolutions[0]}: inner_config.resolutions[0] must equal "
                f"resolutions[-1]")
        if self.text_channels and self.num_classes:
            raise ValueError("a model is conditioned on text or on class labels, not both")

    # -- the list view of the nesting, lowest resolution first (the pseudocode's order) --
    def levels(self) -> list[NestedUNetConfig]:
        inner = self.inner_config.levels() if self.inner_config is not None else []
        return inner + [self]

    @property
    def image_resolutions(self) -> list[int]:
        """The resolution of each input/output, lowest first: [64, 256] for MDM-S64S256."""
        return [c.resolutions[0] for c in self.levels()]

    @property
    def frames(self) -> int:
        """Frames of this level's input: 1 for images; a video level's frames, which the
        spatial levels around it carry too."""
        if self.temporal_axis:
            return self.temporal_resolutions[0]
        return self.inner_config.frames if self.inner_config is not None else 1

    def level_sizes(self) -> list[tuple[int, int]]:
        """(frames, resolution) of each level, lowest first: [(1, 64), (16, 64), (16, 256)]."""
        return [(c.frames, c.resolutions[0]) for c in self.levels()]

    def truncated(self, resolution: int, frames: int = 1) -> NestedUNetConfig:
        """The inner config whose top level takes `frames` x `resolution`^2 inputs (the model
        of a progressive-training stage)."""
        for c in self.levels():
            if (c.frames, c.resolutions[0]) == (frames, resolution):
                return c
        raise ValueError(f"no level of this model takes {frames} x {resolution}x{resolution} inputs; "
                         f"its levels take {self.level_sizes()} (frames, resolution)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer that ends a residual branch: the branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as usual; fewer for the thin channels of tiny CPU models.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding `emb` (time + condition) by scale and shift
    of its second normalisation (adaptive group norm, as in ADM and the official code)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb, tokens=None, mask=None):
        # x: (B, C_in, H, W); emb: (B, E), already passed through SiLU once per forward.
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)   # (B, C_out, 1, 1) each
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Attention(nn.Module):
    """What the attention layers share: softmax(q k^T / sqrt(d)) v over (B, heads, N, d)
    queries and (B, heads, M, d) keys and values, `mask` (True = may attend) broadcast to
    (B, heads, N, M). PyTorch's kernel (flash or memory-efficient attention on a GPU)."""

    def attend(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def heads(self, a):
        # (B, N, C) -> (B, heads, N, C / heads)
        return a.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


class AttentionBlock(Attention):
    """Self-attention over the H*W positions, plus cross-attention to the text tokens when the
    model has text, then a feed-forward layer at each position, as in a transformer block.

    Text is attended to as in Imagen: the text tokens are appended to the keys and values of
    the same attention, so one softmax weighs pixels and words together. A padding token (or
    every token of a dropped condition) gets no weight; a pixel always has some."""

    def __init__(self, channels: int, num_heads: int, cond_ch: int = 0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into num_heads={num_heads} heads")
        self.num_heads = num_heads
        self.norm, self.qkv = group_norm(channels), nn.Linear(channels, 3 * channels)
        if cond_ch:
            self.norm_cond, self.kv_cond = nn.LayerNorm(cond_ch), nn.Linear(cond_ch, 2 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))
        self.ffn = nn.Sequential(self.ffn_norm(channels), nn.Linear(channels, 4 * channels), nn.GELU(),
                                 zero_init(nn.Linear(4 * channels, channels)))

    def ffn_norm(self, channels: int) -> nn.Module:
        return nn.LayerNorm(channels)

    def forward(self, x, emb=None, tokens=None, mask=None):
        B, C, H, W = x.shape                    # one token per position
        h = self.norm(x).flatten(2).transpose(1, 2)                       # (B, HW, C)
        q, k, v = (self.heads(a) for a in self.qkv(h).chunk(3, dim=-1))   # (B, heads, HW, C / heads)
        if tokens is None:
            out = self.attend(q, k, v)
        else:                                   # tokens: (B, L, D), mask: (B, L) bool or None
            k_txt, v_txt = (self.heads(a) for a in self.kv_cond(self.norm_cond(tokens)).chunk(2, dim=-1))
            out = self.attend_text(q, k, v, k_txt, v_txt, mask)
        out = self.proj_out(out.transpose(1, 2).flatten(2))             # (B, HW, C)
        x = x + out.transpose(1, 2).unflatten(2, (H, W))
        return x + self.feed_forward(x)

    def attend_text(self, q, k, v, k_txt, v_txt, mask):
        # One softmax over pixels and tokens: pixels are always visible, padding never is.
        if mask is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], k.shape[2]), mask], 1)[:, None, None, :]
        return self.attend(q, torch.cat([k, k_txt], 2), torch.cat([v, v_txt], 2), mask)

    def feed_forward(self, x):
        # A LayerNorm of each position's features, then an MLP (4x wider) at each position.
        return self.ffn(x.flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(2, x.shape[2:])


class TokenAttention(Attention):
    """A transformer layer over a token sequence (B, L, D): the learned self-attention layers
    that run over the frozen text encoder's features (`num_lm_attn_layers`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm, self.qkv = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim)
        self.proj_out = zero_init(nn.Linear(dim, dim))
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 zero_init(nn.Linear(4 * dim, dim)))

    def forward(self, x, mask=None):
        q, k, v = (self.heads(a) for a in self.qkv(self.norm(x)).chunk(3, dim=-1))
        attn_mask = None
        if mask is not None:
            # A token may attend to the valid tokens and to itself. The diagonal keeps a fully
            # masked row (the null condition of classifier-free guidance) free of NaNs; such
            # tokens are masked everywhere downstream, so what they compute is never used.
            eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
            attn_mask = (mask[:, None, :] | eye)[:, None]
        out = self.attend(q, k, v, attn_mask)
        x = x + self.proj_out(out.transpose(1, 2).flatten(2))
        return x + self.ffn(x)


class Downsample(nn.Module):
    """Average-pool by an integer factor (2 everywhere in appendix A), then a 3x3 conv."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor, self.conv = factor, nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, *args):
        return self.conv(F.avg_pool2d(x, self.factor))


class Upsample(nn.Module):
    """Nearest-neighbour up by an integer factor, then a 3x3 conv."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor, self.conv = factor, nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, *args):
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


def sinusoid(x: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """(B,) values -> (B, dim) features cos(x f_i), then sin(x f_i), with the frequencies
    f_i = 10000^(-i / half) (ADM's)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=x.device) * -(math.log(10000) / half))
    args = x.to(dtype)[:, None] * freqs.to(dtype)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def timestep_embedding(t: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal features of the continuous time t in [0, 1], scaled by 1000 so that the
    frequencies match the usual 1000-step models: (B,) -> (B, dim)."""
    return sinusoid(1000 * t.to(dtype), dim, dtype)


def time_mlp(E: int) -> nn.Sequential:
    """The time embedding: sinusoidal features (E / 4 of them) -> Linear -> SiLU -> Linear -> (B, E)."""
    return nn.Sequential(nn.Linear(E // 4, E), nn.SiLU(), nn.Linear(E, E))


class ConditionEmbedding(nn.Module):
    """Everything the innermost UNet owns besides its layers: the condition, which is text, a
    class label, or nothing, and the time embedding that every level shares.

    Text (section 4.1): features of a frozen encoder (B, L, text_channels) are projected to
    `lm_feature_projected_channels`, run through `num_lm_attn_layers` learned self-attention
    layers, and (a) cross-attended by the UNet's attention blocks, (b) masked-mean pooled
    into the time embedding. Labels (appendix F): an embedding added to the time embedding,
    no cross-attention. The null condition of classifier-free guidance is an all-False text
    mask (no tokens at all) or the extra label `num_classes`."""

    def __init__(self, cfg: NestedUNetConfig):
        super().__init__()
        E = cfg.emb_channels
        self.time_mlp = time_mlp(E)
        if cfg.text_channels:
            D = cfg.lm_feature_projected_channels
            self.text_proj = nn.Linear(cfg.text_channels, D)
            self.text_layers = nn.ModuleList(TokenAttention(D, cfg.num_heads)
                                             for _ in range(cfg.num_lm_attn_layers))
            self.text_pool = nn.Linear(D, E)
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes + 1, E)   # + 1: the null class

    def forward(self, text=None, text_mask=None, label=None):
        """-> (the condition's embedding (B, E), added to every level's time embedding, or
        None; the projected text tokens (B, L, D) that the attention blocks attend to, or None)."""
        cond, tokens = None, None
        if text is not None:
            tokens = self.text_proj(text)
            for layer in self.text_layers:
                tokens = layer(tokens, text_mask)
            # Masked mean over the valid tokens; zero for the null condition (no tokens).
            w = (torch.ones(text.shape[:2], device=text.device) if text_mask is None
                 else text_mask.to(tokens.dtype))
            pooled = (tokens * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
            cond = self.text_pool(pooled)
        if label is not None:
            cond = self.label_emb(label)
        return cond, tokens


# ---------------------------------------------------------------------------------------
# The NestedUNet
# ---------------------------------------------------------------------------------------

class NestedUNet(nn.Module):
    """One level of the nesting. With `inner_config=None` it is a plain UNet (the innermost,
    lowest-resolution model, with its own mid block); otherwise it wraps an inner NestedUNet
    that takes the place of its mid block. Call the outermost level:

        outputs = model([z_64, z_256], t, text=..., text_mask=...)    # [v_64, v_256]

    Mixed-resolution training (appendix B, "mixed-resolution training") passes fewer samples
    at a higher resolution than at the one below it: the first B_r samples of every level
    carry level r, the others stop at the level below.
    """

    null_text = "mask"          # guidance's null text: no visible token (the releases: the empty prompt)

    def __init__(self, config: NestedUNetConfig):
        super().__init__()
        self.config = cfg = config
        chans, E, stage = cfg.resolution_channels, cfg.emb_channels, self.make_stage
        # The width of the text tokens that the attention blocks cross-attend to (0: no text).
        self.cond_ch = cfg.lm_feature_projected_channels if cfg.text_channels else 0
        self.gradient_checkpointing = False       # recompute this level's activations in backward

        # f_merge: the input conv; an outer level's features h are added to it (section 3.2).
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        # f_down: res blocks per resolution, down-sampling between resolutions. `skips` are
        # the channel counts of the activations the up path will concatenate (as in ADM).
        self.down, skips, ch = nn.ModuleList(), [chans[0]], chans[0]
        for i, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks[i]):
                self.down.append(stage(ch, out_ch, i))
                ch = out_ch
                skips.append(ch)
            if i < len(chans) - 1:
                self.down.append(nn.ModuleList([self.make_downsample(ch, i)]))
                skips.append(ch)

        if cfg.inner_config is None:
            # The innermost UNet: f_mid, and the conditioning that every level shares.
            self.inner = None
            self.mid = nn.ModuleList([nn.ModuleList([ResBlock(ch, ch, E, cfg.dropout), self.make_attention(ch),
                                                     ResBlock(ch, ch, E, cfg.dropout)])])
            self.cond_embed = ConditionEmbedding(cfg)
        else:
            self.inner = self.build_inner(cfg.inner_config)
            inner_ch = cfg.inner_config.resolution_channels[0]
            # The two connections to the inner model start at zero (section 3.3): the inner
            # model then sees exactly what it saw before it was wrapped, and the outer level
            # starts as a UNet of its own. `in_adapter` is the pseudocode's f_down(x) handed
            # to the inner f_merge; `out_adapter` is f_up.
            self.in_adapter = zero_init(nn.Conv2d(ch, inner_ch, 3, padding=1))
            self.out_adapter = zero_init(nn.Conv2d(inner_ch, ch, 3, padding=1))

        # f_up and f_skip: each resolution has one more res block than on the way down, and each
        # block concatenates one skip activation (the UNet's long skip connections).
        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks[i] + 1):
                self.up.append(stage(ch + skips.pop(), chans[i], i))
                ch = chans[i]
            if i > 0:
                self.up.append(nn.ModuleList([self.make_upsample(ch, i)]))
        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))

    # -- the layers of a level: hooks that video.py and the released models override --
    def make_stage(self, in_ch: int, out_ch: int, i: int) -> nn.ModuleList:
        """A res block followed by the attention layers of resolution i."""
        cfg = self.config
        return nn.ModuleList([ResBlock(in_ch, out_ch, cfg.emb_channels, cfg.dropout)] + [
            self.make_attention(out_ch) for _ in range(cfg.num_attn_layers_per_block[i])])

    def make_attention(self, ch: int) -> AttentionBlock:
        return AttentionBlock(ch, self.config.num_heads, self.cond_ch)

    def make_downsample(self, ch: int, i: int) -> nn.Module:
        return Downsample(ch, self.config.resolutions[i] // self.config.resolutions[i + 1])

    def make_upsample(self, ch: int, i: int) -> nn.Module:
        return Upsample(ch, self.config.resolutions[i - 1] // self.config.resolutions[i])

    def build_inner(self, config: NestedUNetConfig) -> NestedUNet:
        """The inner model (video.py builds levels with a time axis)."""
        if config.temporal_axis:
            raise ValueError("this config nests a video level (temporal_axis=True): "
                             "build it with video.py's build_level")
        return type(self)(config)

    def fold(self, z: torch.Tensor, cond: tuple) -> tuple:
        """This level's input as a batch of images, and its condition (video.py folds a
        video's frames into the batch)."""
        return z, cond

    def unfold(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x

    def time_embedding(self, t: torch.Tensor, cond: torch.Tensor | None):
        """The time embedding plus the condition's, (B, E), shared by every level. Every res
        block applies SiLU to it first: done once here."""
        mlp = self.innermost.cond_embed.time_mlp
        emb = mlp(timestep_embedding(t, mlp[0].in_features, dtype=mlp[0].weight.dtype))
        return F.silu(emb if cond is None else emb + cond)

    def level_embedding(self, emb, batch: int) -> torch.Tensor:
        """This level's share of the embedding: its first `batch` samples."""
        return emb[:batch]

    # -- the nesting as a list, lowest resolution first --
    def levels(self) -> list[NestedUNet]:
        return (self.inner.levels() if self.inner is not None else []) + [self]

    @property
    def innermost(self) -> NestedUNet:
        return self.levels()[0]

    @property
    def resolutions(self) -> list[int]:
        return self.config.image_resolutions

    def input_shapes(self, batch_size: int) -> list[tuple]:
        """The shape of each level's input z, lowest resolution first: (B, C, r, r) for
        images, (B, T, C, r, r) for the levels of a video."""
        return [(batch_size,) + ((c.frames,) if c.frames > 1 else ()) + (c.in_channels,) + (c.resolutions[0],) * 2
                for c in self.config.levels()]

    # -- conditioning helpers (used by training dropout and classifier-free guidance) --
    def null_condition(self, cond: dict, drop: torch.Tensor) -> dict:
        """Replace the condition of the samples where `drop` (B,) is True by the null
        condition: no text tokens at all, or the null class. (A `drop` on the CPU that drops
        nothing leaves the condition as it is, without asking a GPU anything.)"""
        cond = dict(cond)
        ref = next(iter(cond.values()), None)
        if ref is None or (drop.device.type == "cpu" and not drop.any()):    # unconditional, or nothing dropped
            return cond
        drop = drop.to(ref.device)
        if cond.get("text") is not None:
            if self.null_text != "mask":
                raise ValueError("this model's null text is the encoded empty prompt (as the released models "
                                 "were trained): encode \"\" instead of masking")
            mask = cond.get("text_mask")
            if mask is None:
                mask = torch.ones(cond["text"].shape[:2], dtype=torch.bool, device=drop.device)
            cond["text_mask"] = mask & ~drop[:, None]
        if cond.get("label") is not None:
            cond["label"] = torch.where(drop, torch.full_like(cond["label"], self.config.num_classes),
                                        cond["label"])
        return cond

    def check_inputs(self, z: list, t, text, text_mask, label):
        """Clear errors for inputs that do not fit the model (before any layer runs)."""
        cfg = self.config
        if not isinstance(z, (list, tuple)) or len(z) != len(cfg.levels()):
            raise ValueError(f"this model has {len(cfg.levels())} levels at resolutions "
                             f"{self.resolutions}: pass a list of {len(cfg.levels())} tensors, "
                             f"lowest resolution first (got {type(z).__name__} of "
                             f"{len(z) if isinstance(z, (list, tuple)) else '?'})")
        for i, (x, shape) in enumerate(zip(z, self.input_shapes(1))):
            if tuple(x.shape[1:]) != shape[1:]:
                raise ValueError(f"input {i} must be (B, {', '.join(map(str, shape[1:]))}), got "
                                 f"{tuple(x.shape)}; inputs go lowest resolution first")
            if i and x.shape[0] > z[i - 1].shape[0]:
                raise ValueError("a higher resolution may carry fewer samples than the one below it "
                                 "(mixed-resolution training), never more")
        if t.shape != (z[0].shape[0],):
            raise ValueError(f"t must have shape ({z[0].shape[0]},), one time per sample; got {tuple(t.shape)}")
        if text is not None and not cfg.text_channels:
            raise ValueError("text was given to a model that is not text-conditional "
                             "(text_channels=0); leave it out, or build the model with text_channels")
        if label is not None and not cfg.num_classes:
            raise ValueError("a class label was given to a model that is not class-conditional "
                             "(num_classes=0)")
        if text is not None and (text.dim() != 3 or text.shape[-1] != cfg.text_channels):
            raise ValueError(f"text features must be (B, L, {cfg.text_channels}), got {tuple(text.shape)}")
        if text_mask is not None and (text is None or text_mask.shape != text.shape[:2]):
            raise ValueError("text_mask must be (B, L) and come with text")

    def forward(self, z: list, t: torch.Tensor, text=None, text_mask=None, label=None) -> list:
        """z: inputs lowest resolution first, each (B_r, C, r, r); t: (B,) in [0, 1];
        text: (B, L, text_channels) with text_mask (B, L) bool (leave it out when nothing is
        padded: attention is faster without a mask); label: (B,) long.
        Returns one prediction (v) per resolution, lowest first."""
        self.check_inputs(z, t, text, text_mask, label)
        cond, tokens = self.innermost.cond_embed(text, text_mask, label)
        outputs = []
        self._forward(list(z), self.time_embedding(t, cond), tokens, text_mask, None, outputs)
        return outputs

    def _forward(self, z, emb, tokens, mask, h, o):
        """The pseudocode of section 3.2. `h` comes from the outer level, `o` collects the
        outputs. emb, tokens and mask hold every sample; under mixed-resolution training this
        level uses the first B of them and hands all of them on to its inner model."""
        B = z[-1].shape[0]
        cond = (self.level_embedding(emb, B), None if tokens is None else tokens[:B], None if mask is None else mask[:B])
        # x = z[-1] if h is None else f_merge(z[-1], h)
        x, cond = self.fold(z[-1], cond)
        x = self.conv_in(x)
        if h is not None:
            x = x + h
        skips = [x]
        x = self.run(self.down, x, cond, collect=skips)
        if self.inner is not None:
            # x = f_skip(x, f_up(NestedUNet(z[:-1], f_down(x), o)))
            h_inner = self.in_adapter(x)
            rows = self.config.inner_config.frames     # feature maps per sample handed in (a video's frames)
            if z[-2].shape[0] > B:                     # samples that skip this level get h = 0
                h_inner = torch.cat([h_inner, h_inner.new_zeros((z[-2].shape[0] - B) * rows, *h_inner.shape[1:])])
            x = x + self.out_adapter(self.inner._forward(z[:-1], emb, tokens, mask, h_inner, o)[:B * rows])
        else:
            # x = f_skip(x, f_up(f_mid(f_down(x))))
            x = self.run(self.mid, x, cond)
        x = self.run(self.up, x, cond, skips=skips)
        # o.append(x): this level's prediction
        o.append(self.unfold(self.conv_out(F.silu(self.norm_out(x))), B))
        return x                                   # its features go back to the outer level

    def run(self, stages, x, cond, collect=None, skips=None):
        """Run a list of stages. On the way down, `collect` gathers every stage's output; on
        the way up, each res block first concatenates the last of `skips` (the UNet's long
        skip connections)."""
        for stage in stages:
            if skips is not None and isinstance(stage[0], ResBlock):
                x = torch.cat([x, skips.pop()], dim=1)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(self.run_stage, stage, x, *cond, use_reentrant=False)
            else:
                x = self.run_stage(stage, x, *cond)
            if collect is not None:
                collect.append(x)
        return x

    def run_stage(self, stage, x, emb, tokens, mask):
        """A stage's layers on x, each given the condition (video.py's levels repeat it for the
        frames of every sample)."""
        for layer in stage:
            x = layer(x, emb, tokens, mask)
        return x


# ---------------------------------------------------------------------------------------
# Presets: the paper's named models (appendix A), and small ones a CPU can train
# ---------------------------------------------------------------------------------------

def mdm_s64(schedule="cosine", **kw):
    """The innermost 64x64 UNet of every paper model (MDM-S64, appendix A): most attention
    layers sit at 16x16, following SDXL (Podell et al., 2023)."""
    return NestedUNetConfig(resolutions=[64, 32, 16], resolution_channels=[256, 512, 768],
                            num_res_blocks=[2, 2, 2], num_attn_layers_per_block=[0, 1, 5],
                            num_heads=8, schedule=schedule, **kw)


def outer_level(inner, resolutions, channels, blocks, schedule, **kw):
    """An outer level without attention, as all of appendix A's outer levels are."""
    return type(inner)(resolutions=resolutions, resolution_channels=channels, num_res_blocks=blocks,
                       num_attn_layers_per_block=[0] * len(blocks), schedule=schedule, inner_config=inner, **kw)


# Appendix A's whole-model keys; the paper's text encoder is FLAN-T5 XL (2048 wide).
PAPER = dict(emb_channels=1024, num_lm_attn_layers=2, lm_feature_projected_channels=1024,
             text_channels=2048)
# Small models for a 2-core CPU: the same shape at a sixteenth of the width and a quarter of
# the resolution (the shift of an outer level is its resolution over the base's); a tinier one
# for the comparison of tools/evaluate.py (12 trainings in about two hours of a 2-core CPU).
CPU_INNER = dict(resolutions=[16, 8, 4], resolution_channels=[48, 96, 192], num_res_blocks=[1, 1, 2],
                 num_attn_layers_per_block=[0, 1, 2], num_heads=4, schedule="cosine")
TINY_INNER = dict(resolutions=[16, 8, 4], resolution_channels=[32, 64, 128], num_res_blocks=[1, 1, 1],
                  num_attn_layers_per_block=[0, 1, 1], num_heads=4, schedule="cosine")
CPU_KEYS = dict(emb_channels=256, num_lm_attn_layers=1, lm_feature_projected_channels=192)
TINY_KEYS = dict(emb_channels=32, num_lm_attn_layers=1, lm_feature_projected_channels=16)

PRESETS = {
    "MDM-S64": lambda **kw: mdm_s64(**{**PAPER, **kw}),
    "MDM-S64S256": lambda **kw: outer_level(mdm_s64(), [256, 128, 64], [64, 128, 256], [2, 2, 1],
                                            "cosine-shift4", **{**PAPER, **kw}),
    "MDM-S64S128S256": lambda **kw: outer_level(
        outer_level(mdm_s64(), [128, 64], [128, 256], [2, 1], "cosine-shift2"),
        [256, 128], [64, 128], [2, 1], "cosine-shift4", **{**PAPER, **kw}),
    "MDM-S64S256S1024": lambda **kw: outer_level(
        outer_level(mdm_s64(), [256, 128, 64], [64, 128, 256], [2, 2, 1], "cosine-shift4"),
        [1024, 512, 256], [32, 32, 64], [2, 2, 1], "cosine-shift16", **{**PAPER, **kw}),
    "MDM-S64S128S256S512S1024": lambda **kw: outer_level(outer_level(outer_level(outer_level(
        mdm_s64(), [128, 64], [128, 256], [2, 1], "cosine-shift2"),
        [256, 128], [64, 128], [2, 1], "cosine-shift4"),
        [512, 256], [32, 64], [2, 1], "cosine-shift8"),
        [1024, 512], [32, 32], [2, 1], "cosine-shift16", **{**PAPER, **kw}),
    "CPU-S16": lambda **kw: NestedUNetConfig(**{**CPU_INNER, **CPU_KEYS, **kw}),
    "CPU-S16S32": lambda **kw: outer_level(NestedUNetConfig(**CPU_INNER), [32, 16], [32, 48], [1, 1],
                                           "cosine-shift2", **{**CPU_KEYS, **kw}),
    "CPU-S16S32S64": lambda **kw: outer_level(
        outer_level(NestedUNetConfig(**CPU_INNER), [32, 16], [32, 48], [1, 1], "cosine-shift2"),
        [64, 32], [32, 32], [1, 1], "cosine-shift4", **{**CPU_KEYS, **kw}),
    "CPU-tiny-S16S32": lambda **kw: outer_level(NestedUNetConfig(**TINY_INNER), [32, 16], [16, 32], [1, 1],
                                                "cosine-shift2", **{**CPU_KEYS, **kw}),
    # A toy for the tests: a few thousand parameters per level.
    "tiny": lambda **kw: NestedUNetConfig(resolutions=[8, 4], resolution_channels=[8, 16],
                                          num_res_blocks=[1, 1], num_attn_layers_per_block=[0, 1],
                                          num_heads=2, **{**TINY_KEYS, **kw}),
}


def preset(name: str, **overrides) -> NestedUNetConfig:
    """A named config; `overrides` set whole-model keys, e.g. preset("MDM-S64S256",
    text_channels=0, num_classes=1000) for the class-conditional ImageNet model."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


# ---------------------------------------------------------------------------------------
# Progressive training: grow a trained model into the inner model of a bigger one
# ---------------------------------------------------------------------------------------

def grow(model: NestedUNet, config: NestedUNetConfig, build=None) -> NestedUNet:
    """A NestedUNet built from `config` whose inner levels are `model`, with its trained
    weights (section 3.3, "progressive training"). `model` must be exactly the inner part of
    `config` up to its own top resolution; it may be several levels down (--res 64,256 on
    MDM-S64S128S256 adds two levels at once). The new connections start at zero, so the new
    model's lower-resolution outputs equal the old model's. `build` makes the new model from
    its config (video.py passes its own, to grow an image model into a video model)."""
    inner_cfg = config.truncated(model.config.resolutions[0], model.config.frames)
    if inner_cfg.to_dict() != model.config.to_dict():
        diff = {k: (v, inner_cfg.to_dict()[k]) for k, v in model.config.to_dict().items()
                if v != inner_cfg.to_dict()[k]}
        raise ValueError(f"cannot grow: the trained model differs from the inner part of the new "
                         f"config in {diff} (trained, new)")
    p = next(model.parameters())
    new = (build or model.__class__)(config).to(device=p.device, dtype=p.dtype)
    target = new.levels()[len(model.levels()) - 1]
    # Strict loading: every tensor of the trained model has its place, and no place is left
    # empty (the official code's progressive loading silently loaded nothing).
    target.load_state_dict(model.state_dict(), strict=True)
    return new


# ---------------------------------------------------------------------------------------
# A model's summary: the paper's Fig. 3 in text
# ---------------------------------------------------------------------------------------

def sum_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(model: NestedUNet, name: str = "") -> str:
    cfg = model.config
    size = lambda frames, res: f"{frames}x{res}x{res}" if frames > 1 else f"{res}x{res}"   # noqa: E731
    rows = [f"{name or 'NestedUNet'}: {len(cfg.levels())} level(s) at "
            f"{' -> '.join(size(f, r) for f, r in cfg.level_sizes())}, {sum_params(model) / 1e6:.1f}M parameters",
            f"{'level':<6}{'input':>10}  {'feature maps (size x channels)':<36}{'res blocks':<12}"
            f"{'attention':<11}{'schedule':<16}{'params':>9}"]
    for i, level in enumerate(model.levels()):
        c = level.config
        own = sum_params(level) - (sum_params(level.inner) if level.inner is not None else 0)
        maps = " -> ".join(f"{r}x{ch}" for r, ch in zip(c.resolutions, c.resolution_channels))
        rows.append(f"{i + 1:<6}{size(c.frames, c.resolutions[0]):>10}  {maps:<36}"
                    f"{','.join(map(str, c.num_res_blocks)):<12}{','.join(map(str, c.num_attn_layers_per_block)):<11}"
                    f"{c.schedule:<16}{own / 1e6:>8.1f}M")
    what = (f"text ({cfg.text_channels}-wide features -> {cfg.lm_feature_projected_channels}, "
            f"{cfg.num_lm_attn_layers} self-attention layers)" if cfg.text_channels else
            f"{cfg.num_classes} classes" if cfg.num_classes else "unconditional")
    rows.append(f"conditioning: {what}; time + condition embedding {cfg.emb_channels} wide, "
                f"{sum_params(model.innermost.cond_embed) / 1e6:.1f}M parameters (counted in level 1)")
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[-1])
        print("presets:", ", ".join(PRESETS))
        sys.exit(0)
    with torch.device("meta"):            # no memory, no time: shapes and counts only
        print(summary(NestedUNet(preset(sys.argv[1])), sys.argv[1]))
