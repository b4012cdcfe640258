"""
Faster ways for a CPU to compute the NestedUNet's layers, swapped into a model by one call,
`use_fast_layers(model)` (helpers.devices.prepare makes it on a CPU): the same parameters and
state dict, the same values (tests check them, gradients included, against the plain layers).
A GPU keeps the plain layers. A CPU differs where oneDNN's convolutions beat its matmuls and
where PyTorch's kernels carry fixed costs that dominate at small sizes (docs/results.md):

    attention        on small maps, a plain matmul and softmax instead of the CPU flash kernel
    Linear           at every position of a channels-last map, as a 1x1 convolution
    group norm       of channels-last maps, by sums over positions, with its own backward; in a
                     res block the time embedding's scale and shift fold into it
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nested_unet import Attention, AttentionBlock, ResBlock


def use_fast_layers(model: nn.Module) -> nn.Module:
    """Swap the CPU's ways in, in place. A layer keeps its parameters and only changes how it
    computes; each checks at run time that its input is what it is faster for (a CPU, float32,
    channels-last), and computes as the plain layer does otherwise."""
    channels_last = any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                        and not p.is_contiguous() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Attention):
            m.attend = attention                   # an instance attribute: this layer's attend
        if isinstance(m, nn.GroupNorm):
            m.__class__ = GroupNorm
        if isinstance(m, ResBlock):
            m.__class__ = FoldedResBlock
        if isinstance(m, AttentionBlock) and channels_last:
            for linear in (m.qkv, m.proj_out, m.ffn[1], m.ffn[3]):
                linear.__class__ = PointwiseLinear
    return model


SMALL_ATTENTION = 8192      # query-key pairs up to which a CPU attends with a plain matmul and softmax


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, as F.scaled_dot_product_attention computes it, written out
    (the mask as a 0 / -inf bias) on a CPU's small maps (N * M <= SMALL_ATTENTION: up to 8x8
    positions and 64 keys more), where the CPU flash kernel's fixed cost dominates."""
    if q.device.type == "cpu" and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION:
        weights = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
        if mask is not None:
            weights += torch.zeros(mask.shape, dtype=weights.dtype, device=mask.device).masked_fill_(~mask, -math.inf)
        return torch.matmul(weights.softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PointwiseLinear(nn.Linear):
    """nn.Linear on the tokens (B, N, C) of a channels-last map (whose memory they are, in
    that order) as a 1x1 convolution with the Linear's weights: oneDNN runs it faster than the
    matmul. Other inputs: nn.Linear."""

    def forward(self, x):
        if x.dim() != 3 or not x.is_contiguous() or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        maps = x.transpose(1, 2).unsqueeze(-2)                               # (B, C, 1, N), channels-last
        return F.conv2d(maps, self.weight[:, :, None, None], self.bias).squeeze(-2).transpose(1, 2)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, computed by group_norm below."""

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class FoldedResBlock(ResBlock):
    """ResBlock, whose second norm takes the time embedding's scale and shift in one pass."""

    def forward(self, x, emb, tokens=None, mask=None):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        n = self.norm2
        h = F.silu(group_norm(h, n.num_groups, n.weight, n.bias, n.eps, scale, shift))
        return self.skip(x) + self.conv2(self.dropout(h))


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float, scale=None, shift=None) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps), times (1 + scale) plus shift if they are
    given ((B, C, 1, 1) each), computed by ChannelsLastGroupNorm for float32 channels-last CPU
    maps larger than 4x4 (at 4x4 its fixed cost of a dozen small operations loses to PyTorch's
    kernel, which stays there, under autocast and everywhere else).

    The scale and shift fold into the norm's own weight and bias, which become per sample:
    (x_hat w + b) (1 + s) + t = x_hat w' + b' with w' = w (1 + s), b' = b (1 + s) + t: the map is
    written once instead of three times (autograd takes the gradients of s and t through w', b')."""
    if (x.device.type == "cpu" and x.dim() == 4 and x.shape[2] * x.shape[3] > 16 and x.dtype == torch.float32
            and weight is not None and not torch.is_autocast_enabled("cpu")
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
        if scale is not None:
            scale, shift = scale.flatten(1) + 1, shift.flatten(1)                  # (B, C) each
            weight, bias = weight * scale, torch.addcmul(shift, bias, scale)
        return ChannelsLastGroupNorm.apply(x, weight, bias, groups, eps)
    y = F.group_norm(x, groups, weight, bias, eps)
    return y if scale is None else y * (1 + scale) + shift


NATIVE_FORWARD = 1024      # positions from which ChannelsLastGroupNorm's forward is PyTorch's kernel's


class ChannelsLastGroupNorm(torch.autograd.Function):
    """Group norm of a channels-last map x (B, C, H, W), whose memory is (B, HW, C): each group
    of D = C / G channels normalised over its D * HW values, y = (x - mean) * rstd * w + b.
    Statistics per channel first (a sum over positions, then the two-pass variance), combined
    into the group's by the law of total variance; then y = x * scale + shift per (sample,
    channel). From 1024 positions (32x32 maps) the forward is PyTorch's kernel's, one contiguous
    pass there (its one-pass variance errs by a few 1e-5 where the mean is 2.5 standard
    deviations from zero); below, that kernel parallelises over groups and is slower.

    Backward, with x_hat = (x - mean) * rstd and sums over a group: dx = rstd (w dy - mean(w dy)
    - x_hat mean(w dy x_hat)), dw = sum dy x_hat, db = sum dy; with a = sum dy and s = sum dy x
    per (sample, channel), sum dy x_hat = rstd (s - mean a), so dx = A dy + Bx x + Bc. The
    weight and bias are (C,), or (B, C): one per sample (group_norm's scale and shift)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        B, C, H, W = x.shape
        t = x.permute(0, 2, 3, 1).reshape(B, H * W, C)                     # a view of x's memory
        ctx.groups = groups
        if H * W >= NATIVE_FORWARD:
            # PyTorch's forward, whose statistics are one contiguous pass from this size on.
            # A per-sample weight and bias are applied after it, in place on its output.
            per_sample = weight.dim() == 2
            y, mean, rstd = torch.native_group_norm(x, None if per_sample else weight, None if per_sample else bias,
                                                    B, C, H * W, groups, eps)
            mean, rstd = mean.view(B, groups, 1), rstd.view(B, groups, 1)
            ctx.save_for_backward(x, weight, mean, rstd)
            if per_sample:                                  # y has x's layout: the same (B, HW, C) view
                y.permute(0, 2, 3, 1).view(B, H * W, C).mul_(weight[:, None]).add_(bias[:, None])
            return y
        mean_c = t.sum(1, keepdim=True) / (H * W)                           # (B, 1, C)
        dev = t - mean_c
        var_c = (dev * dev).sum(1).view(B, groups, -1) / (H * W)            # (B, G, D)
        mean_c = mean_c.view(B, groups, -1)
        mean = mean_c.mean(2, keepdim=True)                                  # (B, G, 1)
        rstd = ((var_c + (mean_c - mean) ** 2).mean(2, keepdim=True) + eps).rsqrt()
        w = weight.view(-1, groups, C // groups)                            # (1 or B, G, D)
        scale = (rstd * w).view(B, 1, C)
        shift = bias.view(-1, 1, C) - (mean * rstd * w).view(B, 1, C)
        ctx.save_for_backward(x, weight, mean, rstd)
        return torch.addcmul(shift, t, scale).view(B, H, W, C).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        B, C, H, W = x.shape
        G, n = ctx.groups, C // ctx.groups * H * W                         # values per group
        t = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
        g = dy.permute(0, 2, 3, 1).reshape(B, H * W, C)                    # a copy only if dy is not channels-last
        a = g.sum(1).view(B, G, -1)                                         # sum dy       (B, G, D)
        dy_xhat = rstd * ((g * t).sum(1).view(B, G, -1) - mean * a)         # sum dy x_hat (B, G, D)
        w = weight.view(-1, G, C // G)
        m1 = (w * a).sum(2, keepdim=True) / n                               # mean(w dy)
        m2 = (w * dy_xhat).sum(2, keepdim=True) / n                         # mean(w dy x_hat)
        A = (rstd * w).view(B, 1, C)
        Bx = (-rstd * rstd * m2).expand(B, G, C // G).reshape(B, 1, C)
        Bc = (rstd * (rstd * mean * m2 - m1)).expand(B, G, C // G).reshape(B, 1, C)
        dx = torch.addcmul(Bc, t, Bx).addcmul_(g, A)
        return (dx.view(B, H, W, C).permute(0, 3, 1, 2), dy_xhat.reshape(B, C).sum_to_size(weight.shape),
                a.reshape(B, C).sum_to_size(weight.shape), None, None)
