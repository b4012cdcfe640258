"""Faster ways for a CPU to compute the NestedUNet's layers, swapped in by `use_fast_layers(model)` (on a CPU,
helpers.devices.prepare): the same parameters, state dict and values (tests check them, gradients included),
where oneDNN's convolutions beat its matmuls and PyTorch's kernels' fixed costs dominate (docs/results.md):

    attention        on small maps, a plain matmul and softmax instead of the CPU flash kernel
    Linear           at every position of a channels-last map, as a 1x1 convolution
    GELU             of those positions' features, on the map's view (as the earlier code did)
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
    """Swap the CPU's ways in, in place: each layer checks at run time that its input is what it is faster
    for (a CPU, float32, channels-last), and computes as the plain layer does otherwise."""
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
            m.ffn[2].__class__ = MapGELU
    return model


SMALL_ATTENTION = 8192      # query-key pairs up to which a CPU attends with a plain matmul and softmax


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as F.scaled_dot_product_attention computes it (mask: a 0 / -inf bias),
    written out on a CPU where N * M <= SMALL_ATTENTION (8x8 maps, 64 keys more): flash's fixed cost dominates."""
    if q.device.type == "cpu" and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION:
        weights = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
        if mask is not None:
            weights += torch.zeros(mask.shape, dtype=weights.dtype, device=mask.device).masked_fill_(~mask, -math.inf)
        return torch.matmul(weights.softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PointwiseLinear(nn.Linear):
    """nn.Linear on the tokens (B, N, C) of a channels-last map (its memory, in that order) as a 1x1
    convolution with the Linear's weights, which oneDNN runs faster than the matmul. Otherwise nn.Linear."""
    def forward(self, x):
        if x.dim() != 3 or not x.is_contiguous() or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        maps = x.transpose(1, 2).unsqueeze(-2)                               # (B, C, 1, N), channels-last
        return F.conv2d(maps, self.weight[:, :, None, None], self.bias).squeeze(-2).transpose(1, 2)


class MapGELU(nn.GELU):
    """nn.GELU of tokens (B, N, C), computed on the channels-last map (B, C, 1, N) that is their memory. The same
    function; PyTorch's kernel there rounds differently in the last bit (closer to float64: 4.5e-7 against
    9.7e-7 at most), and it is the one the feed-forward used before the redesign: runs stay bit-reproducible."""
    def forward(self, x):
        if x.dim() != 3 or not x.is_contiguous():
            return super().forward(x)
        return super().forward(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)


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
    """F.group_norm(x, groups, weight, bias, eps), times (1 + scale) plus shift if given ((B, C, 1, 1) each),
    by ChannelsLastGroupNorm on float32 channels-last CPU maps over 4x4 (at 4x4 its dozen small operations
    lose to PyTorch's kernel, used there, under autocast and everywhere else). The scale and shift fold into
    per-sample weight and bias: (x_hat w + b) (1 + s) + t = x_hat w' + b' with w' = w (1 + s), b' = b (1 + s)
    + t, so the map is written once, not three times (autograd takes s's and t's gradients through w', b')."""
    if (x.device.type == "cpu" and x.dim() == 4 and x.shape[2] * x.shape[3] > 16 and x.dtype == torch.float32
            and weight is not None and not torch.is_autocast_enabled("cpu")
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
        if scale is not None:
            scale, shift = scale.flatten(1) + 1, shift.flatten(1)                  # (B, C) each
            weight, bias = weight * scale, torch.addcmul(shift, bias, scale)
        return ChannelsLastGroupNorm.apply(x, weight, bias, groups, eps)
    y = F.group_norm(x, groups, weight, bias, eps)
    return y if scale is None else y * (1 + scale) + shift


class ChannelsLastGroupNorm(torch.autograd.Function):
    """Group norm of a channels-last map x (B, C, H, W), memory (B, HW, C): each group of D = C / G channels
    normalised over its D * HW values, y = (x - mean) * rstd * w + b, w and b (C,) or (B, C) (per sample).
    Statistics per channel first (a sum over positions, then the two-pass variance), combined into the
    group's by the law of total variance; then y = x * scale + shift per (sample, channel). (PyTorch's own
    kernel on channels-last maps is slower below 32x32 and errs by 1e-3 at 1024x1024, these sums by 1e-6.)
    Backward, with x_hat = (x - mean) * rstd and sums over a group: dx = rstd (w dy - mean(w dy) - x_hat
    mean(w dy x_hat)), dw = sum dy x_hat, db = sum dy; with a = sum dy and s = sum dy x per (sample,
    channel), sum dy x_hat = rstd (s - mean a), so dx = A dy + Bx x + Bc."""
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        B, C, H, W = x.shape
        t = x.permute(0, 2, 3, 1).reshape(B, H * W, C)                     # a view of x's memory
        ctx.groups = groups
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
