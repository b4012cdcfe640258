"""
Faster ways to compute three of the NestedUNet's layers, the same values (the tests check it,
gradients included), chosen per device: attention, a Linear layer applied at every position of
a map, and the group norm. nested_unet.py (and video.py's temporal attention) calls them;
none of this is Matryoshka Diffusion.

On a GPU each is PyTorch's own (scaled_dot_product_attention with its flash and
memory-efficient kernels, nn.Linear, F.group_norm): that is what to keep there. The other
paths are for a CPU, where oneDNN's convolutions are faster than its matmuls and PyTorch's
flash and group-norm kernels carry fixed costs that dominate at small sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------

SMALL_ATTENTION = 8192      # query-key pairs up to which a CPU attends with a plain matmul and softmax


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) queries and (B, heads, M, d) keys and
    values; `mask` (broadcast to (B, heads, N, M), True = may attend) hides keys.

    This is F.scaled_dot_product_attention, whose flash and memory-efficient kernels are the
    fastest on a GPU and, at 16x16 positions and more, on a CPU too. One case is written out:
    a CPU at small maps (N * M <= SMALL_ATTENTION: up to 8x8 positions and 64 keys more), where
    the CPU flash kernel's fixed cost dominates and a plain matmul and softmax (the mask added
    as a 0 / -inf bias), with autograd's backward through them, are faster. Forward and backward,
    batch 32, 8 heads, on the 2-core CI machine (torch 2.13.0): 0.67 against 1.73 ms at 4x4
    positions and 32 keys, 4.5 against 7.1 ms at 8x8 and 80 keys; at 16x16 and 272 keys the
    kernel wins, 69 against 129 ms. Sampling alone (batch 64, no gradients): 0.8 against 2.1 ms
    at 4x4, 5.9 against 8.1 ms at 8x8 (masked). Both give the same values to float rounding
    (the tests check it, gradients included)."""
    if q.device.type == "cpu" and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION:
        weights = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
        if mask is not None:
            weights += torch.zeros(mask.shape, dtype=weights.dtype, device=mask.device).masked_fill_(~mask, -math.inf)
        return torch.matmul(weights.softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------
# A Linear layer at every position of a map
# ---------------------------------------------------------------------------------------

def as_tokens(m: torch.Tensor) -> torch.Tensor:
    """A map (B, C, H, W) as its positions' tokens (B, HW, C): a view (of a channels-last map, a
    contiguous one)."""
    return m.flatten(2).transpose(1, 2)


def as_map(tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Tokens (B, HW, C) as the map (B, C, H, W) they came from: a view."""
    return tokens.transpose(1, 2).unflatten(2, (H, W))


def pointwise(layer: nn.Linear, m: torch.Tensor, conv: bool) -> torch.Tensor:
    """A Linear layer applied at every position of a map (B, C, H, W): as a 1x1 convolution
    with the Linear's weights (conv=True: for channels-last models, on a CPU, where oneDNN runs
    it faster than the matmul: an attention block's forward and backward take 16-27% less at
    the CPU demo's sizes, on the 2-core CI machine), or as the Linear on the map's tokens
    (the default layout, GPUs)."""
    if conv:
        return F.conv2d(m, layer.weight[:, :, None, None], layer.bias)
    return as_map(layer(as_tokens(m)), *m.shape[-2:])


# ---------------------------------------------------------------------------------------
# A group norm for channels-last maps on a CPU
# ---------------------------------------------------------------------------------------

class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (the same parameters and state dict), run by group_norm below: on a CPU's
    channels-last maps it is computed faster than by PyTorch's kernel. forward(x, scale, shift)
    also applies a per-sample scale and shift after the norm (a ResBlock's time embedding)."""

    def forward(self, x, scale=None, shift=None):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift)


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float, scale=None, shift=None) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps), times (1 + scale) plus shift if they are
    given ((B, C, 1, 1) each), computed another way for float32 channels-last CPU maps larger
    than 4x4 (the CPU's layout: utils.memory_format).

    PyTorch's CPU kernel is slow on channels-last maps of fewer than 1024 positions (it
    parallelises over groups there), and its backward on them is slow at every size;
    ChannelsLastGroupNorm, made of sums over positions and fused multiply-adds on the map's
    (B, HW, C) view, took 41-44 ms per training step of the official-comparison shape where
    the kernel took 78-93 ms (forward and backward of its 54 norms at their 16 shapes, two
    runs; forward alone 14 against 21-32 ms; 2-core CI machine, 2026-12-02), and is as exact
    (1e-7 against float64).
    At 4x4 its fixed cost of a dozen small operations loses to the kernel, which stays there,
    under autocast and everywhere else.

    The scale and shift fold into the norm's own weight and bias, which become per sample:
    (x_hat w + b) (1 + s) + t = x_hat w' + b' with w' = w (1 + s), b' = b (1 + s) + t, so the
    map is written once instead of three times (norm, product, sum), and read once less in the
    backward pass (autograd takes the gradients of s and t through w' and b', which are small).
    This fold and ChannelsLastGroupNorm's native forward at 32x32 together, against neither,
    A/B in one process (21 rounds, 2-core CI machine, 2026-12-03): the official-comparison
    shape's training step 0.98x the time and its sampling forward 0.98x (release architecture 0.99x
    and 0.96x; the demo's model, 25 and 15 rounds, 1.00x and 0.97x)."""
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
    """Group norm of a channels-last map x (B, C, H, W), whose memory is (B, HW, C): each
    group of D = C / G channels is normalised over its D * HW values, y = (x - mean) * rstd *
    w + b. Statistics per channel first (a sum over positions, then the squared deviations
    from the channel's mean: the two-pass variance), combined into the group's by the law of
    total variance; then y = x * scale + shift with per-(sample, channel) scale and shift.

    From 1024 positions on (32x32 maps), the forward is PyTorch's kernel's (torch.native_group_norm,
    which returns the same mean and rstd for the backward below): there its statistics are
    one contiguous pass over the map, 2-3x faster than these sums (microbenchmark, maps of 32
    to 96 channels at batch 32 and 64; below 1024 positions it parallelises over groups and
    is 5-7x slower than these). Its variance is one-pass (mean of squares minus squared mean):
    errors of a few 1e-5 for a map whose mean is 2.5 standard deviations from zero, where the
    two-pass variance gives 1e-6.

    Backward, with x_hat = (x - mean) * rstd and sums over a group's values: dx = rstd * (w dy
    - mean(w dy) - x_hat * mean(w dy x_hat)), dw = sum over samples and positions of dy x_hat,
    db = of dy; with a = sum dy and s = sum dy x per (sample, channel), sum dy x_hat = rstd
    (s - mean a), so dx = A dy + Bx x + Bc, again per-(sample, channel) coefficients. The
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
