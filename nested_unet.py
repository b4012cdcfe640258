"""The NestedUNet of Matryoshka Diffusion Models (Gu et al., ICLR 2024), section 3.2.

One network denoises an image at several resolutions at once. The lowest resolution is an ordinary UNet; every
higher resolution wraps the lower one like the shells of a matryoshka doll. This is the paper's pseudocode,
and `NestedUNet._forward` below follows it line by line:

    def NestedUNet(z: List[Tensor], h: Tensor = None, o: List[Tensor] = []):
        x = z[-1] if h is None else f_merge(z[-1], h)
        if len(z) > 1:  # move to next resolution
            x = f_skip(x, f_up(NestedUNet(z[:-1], f_down(x), o)))
        else:           # inner UNet at lowest resolution
            x = f_skip(x, f_up(f_mid(f_down(x))))
        o.append(x)     # return results of all resolutions
        return x

Inputs and outputs are lists, lowest resolution first, as in the pseudocode. Most parameters live in the
innermost 64x64 UNet (appendix A: about 450M); the outer levels are thin. The layers connecting a level to its
inner model start at zero, so a model grown for progressive training reproduces its inner model exactly. The
layers are PyTorch's own; a few methods are hooks that video.py's levels and tools/release.py override.

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

# --- The config: appendix A, key for key -----------------------------------------------------
# Keys that appendix A writes once, at the outermost level, and that hold for the whole model. They are
# copied into every inner config, so each level can be built (and grown) on its own and all levels agree.
GLOBAL_KEYS = ("emb_channels", "num_lm_attn_layers", "lm_feature_projected_channels",
               "text_channels", "num_classes", "in_channels", "dropout")


@dataclass
class NestedUNetConfig:
    # Per level, as in appendix A. `resolutions`: the level's feature-map sizes, highest first; [256, 128, 64]
    # takes 256x256 inputs, works at 256, 128 and 64, and hands 64x64 features to `inner_config` (from 64 on).
    resolutions: list = field(default_factory=lambda: [64, 32, 16])
    resolution_channels: list = field(default_factory=lambda: [256, 512, 768])
    num_res_blocks: list = field(default_factory=lambda: [2, 2, 2])
    num_attn_layers_per_block: list = field(default_factory=lambda: [0, 1, 5])
    num_heads: int = 8                    # attention heads of every attention layer
    schedule: str = "cosine"              # "cosine-shift4": cosine with SNR / 4^2 (diffusion.py)
    inner_config: NestedUNetConfig | None = None
    # Whole-model keys of appendix A (GLOBAL_KEYS), set at the outermost level.
    emb_channels: int = 1024              # width of the time (+ condition) embedding
    num_lm_attn_layers: int = 2           # learned self-attention layers over the text tokens
    lm_feature_projected_channels: int = 1024   # width D of the text tokens, once projected
    # Beyond appendix A: what the model is conditioned on, and its image channels.
    text_channels: int = 0                # width of the frozen encoder's features (2048: FLAN-T5 XL); 0: no text
    num_classes: int = 0                  # class-conditional (ImageNet); 0: no labels
    in_channels: int = 3                  # image channels: the model denoises pixels, not latents
    dropout: float = 0.0                  # in every res block, before its last conv
    # Appendix A's video keys; levels with temporal_axis=True are built by video.py.
    temporal_axis: bool = False
    temporal_resolutions: list | None = None  # frames per resolution of the level, e.g. [16, 8, 4, 2, 1]
    num_temporal_attn_layers_per_block: list | None = None

    def __post_init__(self):
        if isinstance(self.inner_config, dict):       # rebuilt from a checkpoint's JSON
            self.inner_config = type(self)(**self.inner_config)
        if self.inner_config is not None:             # the outermost level's global keys win
            self.inner_config = dataclasses.replace(self.inner_config, **{k: getattr(self, k) for k in GLOBAL_KEYS})
        self.validate()

    def validate(self):
        """Bad configs fail here, not deep in a forward (schedule names are checked by diffusion.py)."""
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
            raise ValueError(f"a level with resolutions={self.resolutions} hands {self.resolutions[-1]}x"
                             f"{self.resolutions[-1]} features to its inner model, but the inner config "
                             f"starts at {self.inner_config.resolutions[0]}: inner_config.resolutions[0] "
                             f"must equal resolutions[-1]")
        if self.text_channels and self.num_classes:
            raise ValueError("a model is conditioned on text or on class labels, not both")

    # -- the list view of the nesting, lowest resolution first (the pseudocode's order) --
    def levels(self) -> list[NestedUNetConfig]:
        return (self.inner_config.levels() if self.inner_config is not None else []) + [self]

    @property
    def image_resolutions(self) -> list[int]:
        """The resolution of each input/output, lowest first: [64, 256] for MDM-S64S256."""
        return [c.resolutions[0] for c in self.levels()]

    @property
    def frames(self) -> int:
        """Frames of this level's input: 1 for images; a video level's (the levels around it too)."""
        if self.temporal_axis:
            return self.temporal_resolutions[0]
        return self.inner_config.frames if self.inner_config is not None else 1

    def level_sizes(self) -> list[tuple[int, int]]:
        """(frames, resolution) of each level, lowest first: [(1, 64), (16, 64), (16, 256)]."""
        return [(c.frames, c.resolutions[0]) for c in self.levels()]

    def truncated(self, resolution: int, frames: int = 1) -> NestedUNetConfig:
        """The inner config taking `frames` x `resolution`^2 inputs (a progressive-training stage's model)."""
        for c in self.levels():
            if (c.frames, c.resolutions[0]) == (frames, resolution):
                return c
        raise ValueError(f"no level of this model takes {frames} x {resolution}x{resolution} inputs; "
                         f"its levels take {self.level_sizes()} (frames, resolution)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- Building blocks -------------------------------------------------------------------------
def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer that ends a residual branch: the branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)   # 32 groups; fewer for tiny models' thin channels


class ResBlock(nn.Module):
    """Residual block, conditioned on the embedding `emb` (time + condition) by a scale and shift
    of its second normalisation (adaptive group norm, as in ADM)."""
    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb, tokens=None, mask=None):   # x: (B, C_in, H, W); emb: (B, E) after SiLU
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)   # (B, C_out, 1, 1) each
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Attention(nn.Module):
    """What the attention layers share: softmax(q k^T / sqrt(d)) v of (B, heads, N, d) queries and
    (B, heads, M, d) keys and values, `mask` (True: may attend) broadcast to (B, heads, N, M)."""
    def attend(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def heads(self, a):
        return a.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, N, C) -> (B, heads, N, C/heads)


class AttentionBlock(Attention):
    """Self-attention over the H*W positions (and the text tokens, if any), then a feed-forward layer at each
    position, as in a transformer block. Text as in Imagen: its tokens join the same attention's keys and
    values, one softmax over pixels and words; a padding token (or a dropped condition's) gets no weight."""
    def __init__(self, channels: int, num_heads: int, cond_ch: int = 0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into num_heads={num_heads} heads")
        self.num_heads, self.norm, self.qkv = num_heads, group_norm(channels), nn.Linear(channels, 3 * channels)
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
        if mask is not None:   # one softmax over pixels and tokens: pixels always visible, padding never
            mask = torch.cat([mask.new_ones(mask.shape[0], k.shape[2]), mask], 1)[:, None, None, :]
        return self.attend(q, torch.cat([k, k_txt], 2), torch.cat([v, v_txt], 2), mask)

    def feed_forward(self, x):   # a LayerNorm of each position's features, then a 4x wider MLP at each
        return self.ffn(x.flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(2, x.shape[2:])


class TokenAttention(Attention):
    """A transformer layer over tokens (B, L, D): the `num_lm_attn_layers` over the frozen text features."""
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.norm, self.qkv = num_heads, nn.LayerNorm(dim), nn.Linear(dim, 3 * dim)
        self.proj_out = zero_init(nn.Linear(dim, dim))
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 zero_init(nn.Linear(4 * dim, dim)))

    def forward(self, x, mask=None):
        q, k, v = (self.heads(a) for a in self.qkv(self.norm(x)).chunk(3, dim=-1))
        attn_mask = None
        if mask is not None:
            # A token attends to the valid tokens and to itself: the diagonal keeps a fully masked row
            # (guidance's null condition) NaN-free; such tokens are masked downstream, their outputs unused.
            attn_mask = (mask[:, None, :] | torch.eye(x.shape[1], dtype=torch.bool, device=x.device))[:, None]
        x = x + self.proj_out(self.attend(q, k, v, attn_mask).transpose(1, 2).flatten(2))
        return x + self.ffn(x)


class Downsample(nn.Module):
    """Average-pool by an integer factor (2 everywhere in appendix A), then a 3x3 conv."""
    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor, self.conv = factor, nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, *args):
        return self.conv(F.avg_pool2d(x, self.factor))


class Upsample(Downsample):
    """Nearest-neighbour up by an integer factor, then a 3x3 conv (Downsample's layers)."""
    def forward(self, x, *args):
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


def sinusoid(x: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """(B,) values -> (B, dim) features cos(x f_i), then sin(x f_i), f_i = 10000^(-i / half) (ADM's)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=x.device) * -(math.log(10000) / half))
    args = x.to(dtype)[:, None] * freqs.to(dtype)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def timestep_embedding(t: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal features of 1000 t (the frequencies of 1000-step models), t in [0, 1]: (B,) -> (B, dim)."""
    return sinusoid(1000 * t.to(dtype), dim, dtype)


def time_mlp(E: int) -> nn.Sequential:
    """The time embedding: sinusoidal features (E / 4 of them) -> Linear -> SiLU -> Linear -> (B, E)."""
    return nn.Sequential(nn.Linear(E // 4, E), nn.SiLU(), nn.Linear(E, E))


class ConditionEmbedding(nn.Module):
    """The innermost UNet's time embedding (every level's) and condition. Text (section 4.1): a frozen
    encoder's features (B, L, text_channels) projected to `lm_feature_projected_channels`, through
    `num_lm_attn_layers` self-attention layers, (a) cross-attended by the attention blocks, (b) masked-mean
    pooled into the time embedding. Labels (appendix F): an embedding added to it. Guidance's null condition:
    an all-False text mask (no token), or the extra label `num_classes`."""
    def __init__(self, cfg: NestedUNetConfig):
        super().__init__()
        E, D = cfg.emb_channels, cfg.lm_feature_projected_channels
        self.time_mlp = time_mlp(E)
        if cfg.text_channels:
            self.text_proj = nn.Linear(cfg.text_channels, D)
            self.text_layers = nn.ModuleList(TokenAttention(D, cfg.num_heads) for _ in range(cfg.num_lm_attn_layers))
            self.text_pool = nn.Linear(D, E)
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes + 1, E)   # + 1: the null class

    def forward(self, text=None, text_mask=None, label=None):
        """-> (the condition's embedding (B, E) or None, the text tokens (B, L, D) or None)."""
        cond, tokens = None, None
        if text is not None:
            tokens = self.text_proj(text)
            for layer in self.text_layers:
                tokens = layer(tokens, text_mask)
            # Masked mean over the valid tokens; zero for the null condition (no tokens).
            w = torch.ones(text.shape[:2], device=text.device) if text_mask is None else text_mask.to(tokens.dtype)
            cond = self.text_pool((tokens * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1))
        if label is not None:
            cond = self.label_emb(label)
        return cond, tokens


# --- The NestedUNet --------------------------------------------------------------------------
class NestedUNet(nn.Module):
    """One level of the nesting: with `inner_config=None` a plain UNet (the innermost, with its own mid
    block), otherwise a UNet wrapped around an inner NestedUNet in place of its mid block:

        outputs = model([z_64, z_256], t, text=..., text_mask=...)    # [v_64, v_256]

    Mixed-resolution training (appendix B) passes fewer samples at a higher resolution than at the one below
    it: the first B_r samples carry level r, the others stop at the level below."""
    null_text = "mask"          # guidance's null text: no visible token (the releases: the empty prompt)

    def __init__(self, config: NestedUNetConfig):
        super().__init__()
        self.config = cfg = config
        chans, E, stage = cfg.resolution_channels, cfg.emb_channels, self.make_stage
        self.cond_ch = cfg.lm_feature_projected_channels if cfg.text_channels else 0   # text tokens' width
        self.gradient_checkpointing = False       # recompute this level's activations in backward
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)   # f_merge: + the outer level's h
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
        if cfg.inner_config is None:   # the innermost UNet: f_mid, and the conditioning every level shares
            self.inner = None
            self.mid = nn.ModuleList([nn.ModuleList([ResBlock(ch, ch, E, cfg.dropout), self.make_attention(ch),
                                                     ResBlock(ch, ch, E, cfg.dropout)])])
            self.cond_embed = ConditionEmbedding(cfg)
        else:
            self.inner = self.build_inner(cfg.inner_config)
            inner_ch = cfg.inner_config.resolution_channels[0]
            # The two connections to the inner model start at zero (section 3.3): the inner model then sees
            # what it saw before it was wrapped, and the outer level starts as a UNet of its own.
            # `in_adapter` is the pseudocode's f_down(x) handed to the inner f_merge; `out_adapter` is f_up.
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
        self.norm_out, self.conv_out = group_norm(ch), zero_init(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))

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
        """This level's input as a batch of images, and its condition (video.py folds frames into it)."""
        return z, cond

    def unfold(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x

    def time_embedding(self, t: torch.Tensor, cond: torch.Tensor | None):
        """The time + condition embedding (B, E) of every level, SiLU'd here once for all res blocks."""
        mlp = self.innermost.cond_embed.time_mlp
        emb = mlp(timestep_embedding(t, mlp[0].in_features, dtype=mlp[0].weight.dtype))
        return F.silu(emb if cond is None else emb + cond)

    def level_embedding(self, emb, batch: int) -> torch.Tensor:
        """This level's share of the embedding: its first `batch` samples."""
        return emb[:batch]

    def levels(self) -> list[NestedUNet]:
        return (self.inner.levels() if self.inner is not None else []) + [self]

    @property
    def innermost(self) -> NestedUNet:
        return self.levels()[0]

    @property
    def resolutions(self) -> list[int]:
        return self.config.image_resolutions

    def input_shapes(self, batch_size: int) -> list[tuple]:
        """Each level's input shape, lowest first: (B, C, r, r) for images, (B, T, C, r, r) for a video's."""
        return [(batch_size,) + ((c.frames,) if c.frames > 1 else ()) + (c.in_channels,) + (c.resolutions[0],) * 2
                for c in self.config.levels()]

    # -- conditioning helpers (used by training dropout and classifier-free guidance) --
    def null_condition(self, cond: dict, drop: torch.Tensor) -> dict:
        """`cond` with the null condition (no text token, or the null class) where `drop` (B,) is True."""
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
            cond["label"] = torch.where(drop, torch.full_like(cond["label"], self.config.num_classes), cond["label"])
        return cond

    def check_inputs(self, z: list, t, text, text_mask, label):
        """Clear errors for inputs that do not fit the model (before any layer runs)."""
        cfg, n = self.config, len(self.config.levels())
        if not isinstance(z, (list, tuple)) or len(z) != n:
            raise ValueError(f"this model has {n} levels at resolutions {self.resolutions}: pass a list "
                             f"of {n} tensors, lowest resolution first (got {type(z).__name__} of "
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
            raise ValueError("a class label was given to a model that is not class-conditional (num_classes=0)")
        if text is not None and (text.dim() != 3 or text.shape[-1] != cfg.text_channels):
            raise ValueError(f"text features must be (B, L, {cfg.text_channels}), got {tuple(text.shape)}")
        if text_mask is not None and (text is None or text_mask.shape != text.shape[:2]):
            raise ValueError("text_mask must be (B, L) and come with text")

    def forward(self, z: list, t: torch.Tensor, text=None, text_mask=None, label=None) -> list:
        """z: inputs, lowest resolution first, each (B_r, C, r, r); t: (B,) in [0, 1]; text: (B, L,
        text_channels), text_mask: (B, L) bool (None: nothing padded); label: (B,) long -> one v per
        resolution, lowest first."""
        self.check_inputs(z, t, text, text_mask, label)
        cond, tokens = self.innermost.cond_embed(text, text_mask, label)
        outputs = []
        self._forward(list(z), self.time_embedding(t, cond), tokens, text_mask, None, outputs)
        return outputs

    def _forward(self, z, emb, tokens, mask, h, o):
        """The pseudocode of section 3.2: `h` comes from the outer level, `o` collects the outputs.
        emb, tokens and mask hold every sample; this level uses its first B, the inner all."""
        B = z[-1].shape[0]
        cond = (self.level_embedding(emb, B), *(None if a is None else a[:B] for a in (tokens, mask)))
        # x = z[-1] if h is None else f_merge(z[-1], h)
        x, cond = self.fold(z[-1], cond)
        x = self.conv_in(x) if h is None else self.conv_in(x) + h
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
            x = self.run(self.mid, x, cond)            # x = f_skip(x, f_up(f_mid(f_down(x))))
        x = self.run(self.up, x, cond, skips=skips)
        o.append(self.unfold(self.conv_out(F.silu(self.norm_out(x))), B))  # o.append(x): this level's output
        return x                                   # its features go back to the outer level

    def run(self, stages, x, cond, collect=None, skips=None):
        """Run a list of stages. On the way down, `collect` gathers every stage's output; on the way up, each
        res block first concatenates the last of `skips` (the UNet's long skip connections)."""
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
        """A stage's layers on x, each given the condition (video.py repeats it for each sample's frames)."""
        for layer in stage:
            x = layer(x, emb, tokens, mask)
        return x


# --- Presets: the paper's named models (appendix A), and small ones a CPU can train ----------
def mdm_s64(schedule="cosine", **kw):
    """The innermost 64x64 UNet of every paper model (MDM-S64, appendix A): most attention
    layers sit at 16x16, following SDXL (Podell et al., 2023)."""
    return NestedUNetConfig(resolutions=[64, 32, 16], resolution_channels=[256, 512, 768], num_res_blocks=[2, 2, 2],
                            num_attn_layers_per_block=[0, 1, 5], num_heads=8, schedule=schedule, **kw)


def outer_level(inner, resolutions, channels, blocks, schedule, **kw):
    """An outer level without attention, as all of appendix A's outer levels are."""
    return type(inner)(resolutions=resolutions, resolution_channels=channels, num_res_blocks=blocks,
                       num_attn_layers_per_block=[0] * len(blocks), schedule=schedule, inner_config=inner, **kw)


# Appendix A's whole-model keys; the paper's text encoder is FLAN-T5 XL (2048 wide).
PAPER = dict(emb_channels=1024, num_lm_attn_layers=2, lm_feature_projected_channels=1024, text_channels=2048)
# Small models for a 2-core CPU: the same shape at 1/16 of the width and 1/4 of the resolution (an outer
# level's shift is its resolution over the base's); a tinier one for tools/evaluate.py (12 runs in ~2 h).
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
    "tiny": lambda **kw: NestedUNetConfig(resolutions=[8, 4], resolution_channels=[8, 16], num_res_blocks=[1, 1],
                                          num_attn_layers_per_block=[0, 1], num_heads=2, **{**TINY_KEYS, **kw}),
}


def preset(name: str, **overrides) -> NestedUNetConfig:
    """A named config; `overrides` set whole-model keys, e.g. preset("MDM-S64S256",
    text_channels=0, num_classes=1000) for the class-conditional ImageNet model."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


# --- Progressive training: grow a trained model into the inner model of a bigger one ---------
def grow(model: NestedUNet, config: NestedUNetConfig, build=None) -> NestedUNet:
    """A NestedUNet of `config` whose inner levels are `model`, with its trained weights (section 3.3,
    progressive training). `model` must be exactly the inner part of `config` up to its top resolution,
    possibly several levels down. The new connections start at zero, so the new model's lower-resolution
    outputs equal the old one's. `build` makes a config's model (video's levels, the released variant)."""
    want = config.truncated(model.config.resolutions[0], model.config.frames).to_dict()
    if want != model.config.to_dict():
        diff = {k: (v, want[k]) for k, v in model.config.to_dict().items() if v != want[k]}
        raise ValueError(f"cannot grow: the trained model differs from the inner part of the new "
                         f"config in {diff} (trained, new)")
    p = next(model.parameters())
    new = (build or model.__class__)(config).to(device=p.device, dtype=p.dtype)
    # Strict: every trained tensor has a place, none stays empty (the official code silently loaded nothing).
    new.levels()[len(model.levels()) - 1].load_state_dict(model.state_dict(), strict=True)
    return new


# --- A model's summary: the paper's Fig. 3 in text -------------------------------------------
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
