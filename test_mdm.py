"""
Tests for the Matryoshka Diffusion code. Each test compares against something independent
of the code under test: a closed form, a float64 recomputation, a torch built-in, or a
second code path. Run: python -m pytest -q test_mdm.py
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import diffusion as D
import nested_unet as N
import sample as S
import train
import video as V
from diffusion import DiffusionConfig, MatryoshkaDiffusion
from helpers import devices, files
from helpers import fast_cpu as K
from helpers import measures as M
from helpers import models as P
from helpers import run as runs
from nested_unet import NestedUNet, NestedUNetConfig, grow, preset, sum_params
from tools import evaluate as E
from tools import release as R

torch.set_num_threads(2)


def tiny_levels(n_levels, **kw):
    """A tiny config with n_levels nested levels: 4x4 innermost, each level twice the last."""
    cfg = NestedUNetConfig(resolutions=[4, 2], resolution_channels=[8, 8], num_res_blocks=[1, 1],
                           num_attn_layers_per_block=[0, 1], num_heads=2, emb_channels=16,
                           num_lm_attn_layers=1, lm_feature_projected_channels=8, **kw)
    for i in range(1, n_levels):
        r = 4 * 2 ** i
        cfg = NestedUNetConfig(resolutions=[r, r // 2], resolution_channels=[8, 8], num_res_blocks=[1, 1],
                               num_attn_layers_per_block=[0, 0], num_heads=2, schedule=f"cosine-shift{2 ** i}",
                               inner_config=cfg, emb_channels=16, num_lm_attn_layers=1,
                               lm_feature_projected_channels=8, **kw)
    return cfg


def randomize(model, std=0.2, seed=0):
    """Give every parameter (the zero-initialised ones too) random values, so that tests of
    identities are not passed trivially by zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def ref_alpha_sigma(t, shift):
    """The shifted cosine schedule written out in numpy float64, independently of
    diffusion.py: alpha and sigma for times t (array) at a level shifted by `shift`."""
    with np.errstate(divide="ignore"):
        lam = np.clip(-2 * np.log(np.tan(np.pi * np.asarray(t, dtype=np.float64) / 2)), -15, 15) - 2 * np.log(shift)
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


# ---------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------

def test_cosine_schedule_matches_closed_form():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    with np.errstate(divide="ignore"):                    # log(tan(0)) = -inf, clipped to 15
        ref = np.clip(-2 * np.log(np.tan(np.pi * t.numpy() / 2)), -15, 15)
    np.testing.assert_allclose(D.cosine_logsnr(t).numpy(), ref, rtol=0, atol=1e-12)
    # the two ends are clipped, the middle is not: logsnr(1/2) = 0, signal = noise
    assert D.cosine_logsnr(torch.tensor([0.0, 0.5, 1.0])).tolist() == pytest.approx([15, 0, -15], abs=1e-12)


@pytest.mark.parametrize("shift,power", [(2, 2.0), (4, 2.0), (16, 2.0), (4, 1.0)])
def test_shifted_snr_is_base_snr_over_shift_squared(shift, power):
    d = MatryoshkaDiffusion([64, 64 * shift], ["cosine", f"cosine-shift{shift}"], DiffusionConfig(shift_power=power))
    t = torch.rand(2000, dtype=torch.float64)
    t[:3] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    snr_base, snr_shift = d.logsnr(t, 0).exp(), d.logsnr(t, 1).exp()
    torch.testing.assert_close(snr_shift, snr_base / shift ** power, rtol=1e-12, atol=0)
    for r in (0, 1):
        a, s = d.alpha_sigma(t, r)
        torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t), rtol=0, atol=1e-12)
        torch.testing.assert_close(a ** 2 / s ** 2, d.logsnr(t, r).exp(), rtol=1e-10, atol=0)


def test_schedule_names():
    assert D.parse_schedule("cosine") == 1 and D.parse_schedule("cosine-shift16") == 16
    with pytest.raises(ValueError, match="unknown schedule"):
        D.parse_schedule("linear")


def test_v_x_eps_round_trip_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    a, s = D.alpha_sigma(D.cosine_logsnr(torch.rand(4, generator=g, dtype=torch.float64)))
    a, s = D.bcast(a, x), D.bcast(s, x)
    z = a * x + s * eps
    v = D.v_from_x_eps(x, eps, a, s)
    torch.testing.assert_close(D.x_from_v(z, v, a, s), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(D.eps_from_v(z, v, a, s), eps, rtol=0, atol=1e-12)
    # v written out by hand: v = alpha eps - sigma x
    torch.testing.assert_close(v, a * eps - s * x, rtol=0, atol=0)


def test_downsample_is_average_pooling_and_bilinear_option():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    d = MatryoshkaDiffusion([4, 8, 16], ["cosine", "cosine-shift2", "cosine-shift4"])
    xs = d.downsample(x)
    ref = x.reshape(2, 3, 4, 4, 4, 4).mean(dim=(3, 5))     # 4x4 blocks averaged by hand
    torch.testing.assert_close(xs[0], ref)
    assert xs[2] is x
    db = MatryoshkaDiffusion([4, 16], ["cosine", "cosine-shift4"], DiffusionConfig(downsample="bilinear"))
    assert db.downsample(x)[0].shape == (2, 3, 4, 4) and not torch.allclose(db.downsample(x)[0], ref)


# ---------------------------------------------------------------------------------------
# The joint loss, Eq. 3
# ---------------------------------------------------------------------------------------

def eq3_reference(model, diff, x, t, noises, cond, weights):
    """Eq. 3 as the paper writes it: sums of squares, w^r / w^R = N_R / N_r, then divided by
    N_R and the batch (the overall scale of a loss is a convention)."""
    xs = [diff.downsample(x)[r] for r in range(len(diff.resolutions))]
    zs, targets = [], []
    for r, (xr, eps) in enumerate(zip(xs, noises)):
        a, s = (torch.tensor(u)[:, None, None, None] for u in ref_alpha_sigma(t.double().numpy(), diff.shifts[r]))
        zs.append((a * xr + s * eps).float())
        targets.append(a * eps - s * xr)
    preds = model(zs, t, **cond)
    N_R = xs[-1][0].numel()
    total = 0.0
    for r, (p, tgt) in enumerate(zip(preds, targets)):
        N_r = xs[r][0].numel()
        total += weights[r] * (N_R / N_r) * ((p.double() - tgt) ** 2).sum() / (N_R * x.shape[0])
    return total


@pytest.mark.parametrize("loss_cfg,weights", [
    (DiffusionConfig(), [1, 1, 1]),
    (DiffusionConfig(loss_weights=[1.0, 4.0, 16.0]), [1, 4, 16]),
    (DiffusionConfig(loss_levels="top"), [0, 0, 1]),
])
def test_joint_loss_equals_eq3_written_with_sums_of_squares(loss_cfg, weights):
    torch.manual_seed(0)
    model = randomize(NestedUNet(tiny_levels(3, text_channels=6)), std=0.1).eval()
    diff = MatryoshkaDiffusion.for_model(model, loss_cfg)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    t = torch.rand(3)
    noises = [torch.randn(3, 3, r, r) for r in (4, 8, 16)]
    cond = dict(text=torch.randn(3, 5, 6), text_mask=torch.tensor([[1, 1, 1, 0, 0]] * 3).bool())
    loss, per_level = diff.loss(model, x, cond, t=t, noises=noises)
    ref = eq3_reference(model, diff, x, t, noises, cond, weights)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert len(per_level) == 3 and all(p.item() > 0 for p in per_level)


# ---------------------------------------------------------------------------------------
# The NestedUNet
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_levels", [1, 2, 3, 5])
def test_shapes_and_gradient_reaches_every_parameter(n_levels):
    torch.manual_seed(0)
    cfg = tiny_levels(n_levels, num_classes=5)
    model = NestedUNet(cfg)
    assert model.resolutions == [4 * 2 ** i for i in range(n_levels)]
    B = 2
    z = [torch.randn(B, 3, r, r) for r in model.resolutions]
    out = model(z, torch.rand(B), label=torch.tensor([1, 5]))
    assert [o.shape for o in out] == [x.shape for x in z]
    # Zero-initialised layers (residual outputs, adapters, conv_out) hold back the gradient of
    # everything before them at the very first step, by design. Connectivity is what this
    # checks, so every parameter gets a random value first; then one loss step must send a
    # gradient to every parameter (no dead branch, no layer left out of the graph).
    randomize(model, std=0.1)
    diff = MatryoshkaDiffusion.for_model(model)
    x = torch.rand(B, 3, model.resolutions[-1], model.resolutions[-1]) * 2 - 1
    diff.loss(model, x, dict(label=torch.tensor([0, 3])))[0].backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == [], f"no gradient reached: {dead}"


def test_attention_paths_agree_with_float64_softmax(monkeypatch):
    """fast_cpu.attention: the written-out CPU path (small maps) and the
    scaled_dot_product_attention path (larger ones) give the values and the gradients of a
    float64 softmax(q k^T / sqrt(d)) v written here, masks included; with a whole model (its
    CPU layers swapped in), the written-out path gives the outputs and gradients of the
    kernel's (forced everywhere)."""
    attention = K.attention
    g = torch.Generator().manual_seed(0)
    for queries in (16, 160):                        # 16 x 20 pairs: written out; 160 x 164: the kernel
        q, k, v = (torch.randn(3, 2, queries, 8, generator=g, dtype=torch.float64) for _ in range(3))
        k, v = torch.cat([k, k[:, :, :4] + 1], 2), torch.cat([v, v[:, :, :4] - 1], 2)    # 4 keys more
        mask = torch.rand(3, 1, 1, queries + 4, generator=g) > 0.4
        mask[..., 0] = True                                                              # a key for every row
        assert (queries * (queries + 4) <= K.SMALL_ATTENTION) == (queries == 16)
        dout = torch.randn(3, 2, queries, 8, generator=g, dtype=torch.float64)
        for m in (None, mask):
            qkv = [a.clone().requires_grad_() for a in (q, k, v)]
            w = (qkv[0] @ qkv[1].transpose(-1, -2)) / math.sqrt(8)
            ref = (w if m is None else w.masked_fill(~m, -math.inf)).softmax(-1) @ qkv[2]
            ref_grads = torch.autograd.grad(ref, qkv, dout)
            qkv32 = [a.float().requires_grad_() for a in (q, k, v)]
            out = attention(*qkv32, m)
            grads = torch.autograd.grad(out, qkv32, dout.float())
            with torch.no_grad():
                assert torch.allclose(attention(q.float(), k.float(), v.float(), m).double(), ref, atol=1e-5)
            assert torch.allclose(out.double(), ref, atol=1e-5)
            assert all(torch.allclose(a.double(), b, atol=1e-5) for a, b in zip(grads, ref_grads))
    torch.manual_seed(0)
    model = K.use_fast_layers(randomize(NestedUNet(tiny_levels(2, text_channels=6)), std=0.1))
    z, t = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)], torch.rand(2)
    cond = dict(text=torch.randn(2, 4, 6), text_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool())

    def outputs_and_grads():
        model.zero_grad()
        out = model(z, t, **cond)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out).backward()
        return [o.detach() for o in out] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    written = outputs_and_grads()
    monkeypatch.setattr(K, "SMALL_ATTENTION", 0)
    kernel = outputs_and_grads()
    assert len(written) == len(kernel) > 2
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(written, kernel))


def test_the_cpu_layers_compute_what_the_plain_model_computes(monkeypatch):
    """A model as a CPU runs it (devices.prepare: channels-last, fast_cpu's layers swapped in)
    keeps its maps in that layout from input to output, runs its attention's Linear layers as
    1x1 convolutions, and gives the outputs and gradients of the plain model (the default
    layout, nn.Linear, nn.GroupNorm, F.scaled_dot_product_attention), with the same state
    dict; in both architectures (ours, the released models')."""
    CL = torch.channels_last
    for variant in (lambda c: c, R.released):
        torch.manual_seed(0)
        base = randomize(P.build_model(variant(tiny_levels(2, text_channels=6))), std=0.1)
        cl = devices.prepare(randomize(P.build_model(variant(tiny_levels(2, text_channels=6))), std=0.1), "cpu")
        assert cl.state_dict().keys() == base.state_dict().keys()
        assert all(type(m) in (torch.nn.GroupNorm, torch.nn.Linear) for m in base.modules()
                   if isinstance(m, (torch.nn.GroupNorm, torch.nn.Linear)))
        z, t = [torch.randn(3, 3, 4, 4), torch.randn(3, 3, 8, 8)], torch.rand(3)
        cond = dict(text=torch.randn(3, 4, 6))
        if variant is not R.released:
            cond["text_mask"] = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]).bool()
        convs = []
        real = K.PointwiseLinear.forward
        monkeypatch.setattr(K.PointwiseLinear, "forward",
                            lambda self, x: convs.append(x.is_contiguous()) or real(self, x))
        outs = [base(z, t, **cond)]
        assert convs == []                                           # the plain model: nn.Linear
        outs.append(cl(z, t, **cond))
        monkeypatch.setattr(K.PointwiseLinear, "forward", real)
        assert convs and all(convs)                                  # the CPU's: 1x1 convolutions
        assert all(o.is_contiguous(memory_format=CL) and not o.is_contiguous() for o in outs[1])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        weights = [torch.randn(o.shape) for o in outs[0]]
        for model, out in zip((base, cl), outs):
            sum((o * w).sum() for o, w in zip(out, weights)).backward()
        for (name, p), q in zip(base.named_parameters(), cl.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_group_norm_matches_float64_and_runs_only_where_it_should(monkeypatch):
    """fast_cpu.group_norm: on float32 channels-last CPU maps larger than 4x4 it runs
    ChannelsLastGroupNorm, whose output and gradients (input, weight, bias, and the scale and
    shift applied after the norm) are those of a float64 F.group_norm [* (1 + scale) + shift],
    with 1, 3 and 4 channels per group, an offset mean, an upstream gradient in either layout,
    and maps up to 64x64 (where PyTorch's own channels-last kernel errs by 1e-5 or more); small maps,
    the default layout and autocast keep PyTorch's kernel."""
    CL = torch.channels_last
    taken = []
    real = K.ChannelsLastGroupNorm.apply
    monkeypatch.setattr(K.ChannelsLastGroupNorm, "apply", lambda *a: taken.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    for C, G, H, W in [(8, 8, 5, 5), (12, 4, 8, 6), (32, 8, 16, 16), (12, 4, 32, 32), (4, 2, 64, 64)]:
        atol = 1e-5
        for scaled in (False, True):
            x = (torch.randn(3, C, H, W, generator=g, dtype=torch.float64) * 2 + 5).contiguous(memory_format=CL)
            w, b = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
            s, t = torch.randn(2, 3, C, 1, 1, generator=g, dtype=torch.float64)
            dy = torch.randn(3, C, H, W, generator=g, dtype=torch.float64)
            leaves = [a.clone().requires_grad_() for a in ((x, w, b, s, t) if scaled else (x, w, b))]
            ref = torch.nn.functional.group_norm(leaves[0], G, leaves[1], leaves[2], 1e-5)
            ref = ref * (1 + leaves[3]) + leaves[4] if scaled else ref
            ref_grads = torch.autograd.grad(ref, leaves, dy)
            for upstream in (dy, dy.contiguous(memory_format=CL)):
                leaves32 = [a.float().requires_grad_() for a in leaves]         # x stays channels-last
                taken.clear()
                out = K.group_norm(leaves32[0], G, leaves32[1], leaves32[2], 1e-5, *leaves32[3:])
                grads = torch.autograd.grad(out, leaves32, upstream.float())
                assert taken == [1] and out.is_contiguous(memory_format=CL) and grads[0].is_contiguous(memory_format=CL)
                torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
                for a, r in zip(grads, ref_grads):
                    torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=10 * atol)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL)           # 4x4, default layout, autocast
    taken.clear()
    s, t = torch.randn(2, 2, 8, 1, 1)                                   # and at 4x4 the scale and shift
    torch.testing.assert_close(K.group_norm(x, 4, torch.ones(8), torch.zeros(8), 1e-5, s, t),
                               torch.nn.functional.group_norm(x, 4, eps=1e-5) * (1 + s) + t)
    K.group_norm(torch.randn(2, 8, 6, 6), 4, torch.ones(8), torch.zeros(8), 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        K.group_norm(torch.randn(2, 8, 6, 6).contiguous(memory_format=CL), 4, torch.ones(8), torch.zeros(8), 1e-5)
    assert taken == []
    assert isinstance(N.group_norm(64), torch.nn.GroupNorm)          # same module type and state dict


def test_memory_format_is_channels_last_for_images_on_a_cpu_only():
    CL, DEFAULT = torch.channels_last, torch.contiguous_format
    cases = [("auto", "cpu", 1, CL), ("auto", "cuda", 1, DEFAULT), ("auto", "cuda:1", 1, DEFAULT),
             ("auto", "cpu", 16, DEFAULT), ("on", "cuda", 1, CL), ("on", "cpu", 16, DEFAULT),
             ("off", "cpu", 1, DEFAULT), (True, "cuda", 1, CL), (False, "cpu", 1, DEFAULT)]
    for setting, device, frames, want in cases:
        assert devices.memory_format(setting, device, frames) == want, (setting, device, frames)


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc's allocator only")
def test_a_cpu_process_keeps_the_memory_that_freed_tensors_leave():
    """devices.reuse_freed_memory (setup_processes calls it on a CPU): a freed 256 MB tensor's
    pages stay with the process for the next tensors; without it glibc unmaps them at once.
    Measured in fresh processes, as the resident set size before, with and after the tensor."""
    probe = ("import os, sys, torch\nfrom helpers import devices\n"
             "if sys.argv[1] == 'on': assert devices.reuse_freed_memory()\n"
             "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
             "before = rss(); x = torch.ones(64 << 20); during = rss(); del x\n"
             "print(during - before, rss() - before)")
    grown = {}
    for mode in ("on", "off"):
        p = subprocess.run([sys.executable, "-c", probe, mode], cwd=HERE, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        grown[mode] = [float(v) for v in p.stdout.split()]
    assert all(during > 250 for during, _ in grown.values()), grown        # the tensor was resident
    assert grown["on"][1] > 250 and grown["off"][1] < 25, grown             # kept / given back


def test_text_conditioning_reaches_the_output_and_mask_hides_padding():
    torch.manual_seed(0)
    model = randomize(NestedUNet(tiny_levels(2, text_channels=6)), std=0.1).eval()
    z = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)]
    t = torch.rand(2)
    text, mask = torch.randn(2, 4, 6), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    out = model(z, t, text=text, text_mask=mask)
    # changing a padded token changes nothing; changing a real one changes the output
    text2 = text.clone()
    text2[0, 3] += 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, model(z, t, text=text2, text_mask=mask)))
    text2[0, 0] += 10
    assert not torch.allclose(out[1][0], model(z, t, text=text2, text_mask=mask)[1][0], atol=1e-4)
    # the null condition ignores the text entirely and gives finite outputs
    null = model.null_condition(dict(text=text, text_mask=mask), torch.tensor([True, True]))
    o_null = model(z, t, **null)
    o_null2 = model(z, t, **model.null_condition(dict(text=torch.randn(2, 7, 6)), torch.tensor([True, True])))
    assert all(torch.isfinite(o).all() for o in o_null)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(o_null, o_null2))


def test_unconditional_model_needs_no_condition():
    model = NestedUNet(tiny_levels(2))
    out = model([torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)], torch.rand(1))
    assert len(out) == 2
    assert model.null_condition({}, torch.tensor([True])) == {}


def test_freshly_grown_model_returns_the_inner_models_outputs_exactly():
    torch.manual_seed(0)
    inner_cfg = tiny_levels(1, text_channels=6)
    inner = randomize(NestedUNet(inner_cfg)).eval()
    big_cfg = tiny_levels(3, text_channels=6)
    grown = grow(inner, big_cfg).eval()
    # the trained weights are there, not fresh ones
    for (n, p), (n2, p2) in zip(inner.state_dict().items(), grown.innermost.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    z = [torch.randn(2, 3, r, r) for r in (4, 8, 16)]
    t, text = torch.rand(2), torch.randn(2, 3, 6)
    ref = inner(z[:1], t, text=text)[0]
    out = grown(z, t, text=text)
    assert torch.equal(out[0], ref)
    # a two-level model grown to three levels keeps both of its outputs
    two = randomize(NestedUNet(tiny_levels(2, text_channels=6)), seed=1).eval()
    three = grow(two, big_cfg).eval()
    for a, b in zip(two(z[:2], t, text=text), three(z, t, text=text)[:2]):
        assert torch.equal(a, b)


def test_grow_refuses_a_model_that_does_not_fit():
    inner = NestedUNet(tiny_levels(1, text_channels=6))
    with pytest.raises(ValueError, match="cannot grow"):
        grow(inner, tiny_levels(2, text_channels=7))


def test_mixed_resolution_batch_matches_full_batch():
    """Samples that skip the highest level get the same lower-level outputs they would get
    alone (the inner model sees h = 0 for them), and the others are unchanged."""
    torch.manual_seed(0)
    model = randomize(NestedUNet(tiny_levels(2, text_channels=6)), std=0.1).eval()
    z = [torch.randn(3, 3, 4, 4), torch.randn(3, 3, 8, 8)]
    t, text = torch.rand(3), torch.randn(3, 2, 6)
    full = model(z, t, text=text)
    mixed = model([z[0], z[1][:2]], t, text=text)
    torch.testing.assert_close(mixed[1], full[1][:2])
    torch.testing.assert_close(mixed[0][:2], full[0][:2])
    h_zero = model.levels()[0]([z[0][2:]], t[2:], text=text[2:])[0]
    torch.testing.assert_close(mixed[0][2:], h_zero)
    # a batch in which no sample reaches the highest level: the inner model alone, a zero
    # loss there, and finite gradients (a small batch draws this now and then)
    empty = model([z[0], z[1][:0]], t, text=text)
    assert empty[1].shape == (0, 3, 8, 8)
    torch.testing.assert_close(empty[0], model.levels()[0]([z[0]], t, text=text)[0])
    d = MatryoshkaDiffusion.for_model(model)
    loss, per_level = d.loss(model.train(), torch.rand(3, 3, 8, 8) * 2 - 1, {"text": text},
                             high_res_batch=0, high_res_fraction=0.5)
    loss.backward()
    assert per_level[1] == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# Appendix A, key for key: the paper's configs as it prints them (innermost level last).
_S64_SPEC = dict(resolutions=[64, 32, 16], resolution_channels=[256, 512, 768], num_res_blocks=[2, 2, 2],
                 num_attn_layers_per_block=[0, 1, 5], num_heads=8, schedule="cosine")
_WHOLE = dict(emb_channels=1024, num_lm_attn_layers=2, lm_feature_projected_channels=1024)


def _lvl(res, ch, blocks, attn, schedule, inner, **kw):
    return dict(resolutions=res, resolution_channels=ch, num_res_blocks=blocks, num_attn_layers_per_block=attn,
                schedule=schedule, inner_config=inner, **kw)


_T16 = dict(temporal_axis=True, temporal_resolutions=[16, 8, 4, 2, 1], resolution_channels=[256] * 5,
            inner_config=_S64_SPEC, num_res_blocks=[2, 2, 2, 2, 1], num_attn_layers_per_block=[0] * 5,
            num_temporal_attn_layers_per_block=[1, 1, 1, 1, 0], schedule="cosine-shift4")
APPENDIX_A = {
    "MDM-S64": {**_S64_SPEC, **_WHOLE},
    "MDM-S64S256": _lvl([256, 128, 64], [64, 128, 256], [2, 2, 1], [0, 0, 0], "cosine-shift4", _S64_SPEC, **_WHOLE),
    "MDM-S64S128S256": _lvl([256, 128], [64, 128], [2, 1], [0, 0], "cosine-shift4",
                            _lvl([128, 64], [128, 256], [2, 1], [0, 0], "cosine-shift2", _S64_SPEC), **_WHOLE),
    "MDM-S64S256S1024": _lvl([1024, 512, 256], [32, 32, 64], [2, 2, 1], [0, 0, 0], "cosine-shift16",
                             _lvl([256, 128, 64], [64, 128, 256], [2, 2, 1], [0, 0, 0], "cosine-shift4", _S64_SPEC),
                             **_WHOLE),
    "MDM-S64S128S256S512S1024": _lvl(
        [1024, 512], [32, 32], [2, 1], [0, 0], "cosine-shift16", _lvl(
            [512, 256], [32, 64], [2, 1], [0, 0], "cosine-shift8", _lvl(
                [256, 128], [64, 128], [2, 1], [0, 0], "cosine-shift4", _lvl(
                    [128, 64], [128, 256], [2, 1], [0, 0], "cosine-shift2", _S64_SPEC))), **_WHOLE),
    "MDM-S64T16": {**_T16, **_WHOLE},
    "MDM-S64T16S256": _lvl([256, 128, 64], [64, 128, 256], [2, 2, 1], [0, 0, 0], "cosine-shift16", _T16, **_WHOLE),
}


def check_against_spec(cfg, spec, path="config"):
    """Every key that appendix A gives, at every level, equals the preset's; and the nesting
    has the same depth."""
    for key, want in spec.items():
        if key == "inner_config":
            assert cfg.inner_config is not None, f"{path}: appendix A has an inner level here"
            check_against_spec(cfg.inner_config, want, f"{path}.inner_config")
        else:
            assert getattr(cfg, key) == want, f"{path}.{key}: {getattr(cfg, key)} (preset), {want} (appendix A)"
    if "inner_config" not in spec:
        assert cfg.inner_config is None, f"{path}: appendix A has no inner level here"


@pytest.mark.parametrize("name", list(APPENDIX_A))
def test_paper_presets_are_appendix_a_key_for_key(name):
    cfg = V.preset(name) if name in V.VIDEO_PRESETS else preset(name)
    check_against_spec(cfg, APPENDIX_A[name])


def test_paper_presets_parameter_counts_on_meta_device():
    counts = {}
    for name in ("MDM-S64", "MDM-S64S256", "MDM-S64S128S256", "MDM-S64S256S1024", "MDM-S64S128S256S512S1024"):
        with torch.device("meta"):
            counts[name] = sum_params(NestedUNet(preset(name, text_channels=2048)))
    # Section 4.1: "resulting in total 450M parameters for the inner UNet"
    assert abs(counts["MDM-S64"] - 450e6) / 450e6 < 0.10, counts
    # "the high-resolution part of the model can be easily attached ... with a minimal increase"
    for name in ("MDM-S64S256", "MDM-S64S256S1024", "MDM-S64S128S256S512S1024"):
        assert 1.0 < counts[name] / counts["MDM-S64"] < 1.05, counts
    assert preset("MDM-S64S128S256S512S1024").image_resolutions == [64, 128, 256, 512, 1024]


def test_summary_lists_every_level():
    with torch.device("meta"):
        text = N.summary(NestedUNet(preset("MDM-S64S256")), "MDM-S64S256")
    assert "64x64" in text and "256x256" in text and "cosine-shift4" in text


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_clear_errors():
    with pytest.raises(ValueError, match="integer multiple"):
        NestedUNetConfig(resolutions=[64, 48], resolution_channels=[8, 8], num_res_blocks=[1, 1],
                         num_attn_layers_per_block=[0, 0])
    with pytest.raises(ValueError, match="inner_config.resolutions"):
        NestedUNetConfig(resolutions=[256, 128], resolution_channels=[8, 8], num_res_blocks=[1, 1],
                         num_attn_layers_per_block=[0, 0], inner_config=tiny_levels(1))
    model = NestedUNet(tiny_levels(2))
    z = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)]
    with pytest.raises(ValueError, match="pass a list of 2 tensors"):
        model(z[:1], torch.rand(1))
    with pytest.raises(ValueError, match="lowest resolution first"):
        model(z[::-1], torch.rand(1))
    with pytest.raises(ValueError, match="not text-conditional"):
        model(z, torch.rand(1), text=torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="not class-conditional"):
        model(z, torch.rand(1), label=torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("MDM-S32")


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------

class OracleModel(torch.nn.Module):
    """For a data set of one image x, the exact v is known in closed form: the posterior
    mean of x is x itself, so v = (alpha_t z - x) / sigma_t, with each level's own shifted
    schedule (ref_alpha_sigma)."""

    def __init__(self, image, resolutions, shifts):
        super().__init__()
        self.resolutions, self.shifts = resolutions, shifts
        self.targets = [torch.nn.functional.avg_pool2d(image, image.shape[-1] // r) for r in resolutions]
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.calls = 0

    def input_shapes(self, B):
        return [(B, 3, r, r) for r in self.resolutions]

    def null_condition(self, cond, drop):
        return cond

    def posterior_mean(self, z, a, sigma, level):
        return self.targets[level]

    def forward(self, zs, t, **cond):
        self.calls += 1
        vs = []
        for level, (z, s) in enumerate(zip(zs, self.shifts)):
            a, sig = (torch.tensor(u)[:, None, None, None] for u in ref_alpha_sigma(t.double().numpy(), s))
            vs.append((a * z - self.posterior_mean(z, a, sig, level)) / sig)
        return vs


class GaussianOracle(OracleModel):
    """Data x with i.i.d. pixels N(mu, tau^2). Level r holds D^r(x), whose pixels are
    N(mu, tau^2 / k^2) for k x k pooling, and the exact posterior mean given z = alpha x +
    sigma eps is mu + alpha tau_r^2 / (alpha^2 tau_r^2 + sigma^2) (z - alpha mu). Unlike the
    one-image oracle, the prediction now depends on z, so a sampler must move z correctly
    to end with the right distribution."""

    def __init__(self, mu, tau, resolutions, shifts):
        super().__init__(torch.zeros(1, 3, resolutions[-1], resolutions[-1]), resolutions, shifts)
        self.mu, self.taus = mu, [tau * r / resolutions[-1] for r in resolutions]

    def input_shapes(self, B):
        # Every level with as many values per sample (the channels make up for the pixels):
        # the statistics of the lowest level are then as precise as those of the highest.
        # The sampler treats a level's values alike, whatever their layout.
        R = self.resolutions[-1]
        return [(B, 3 * (R // r) ** 2, r, r) for r in self.resolutions]

    def posterior_mean(self, z, a, sigma, level):
        tau = self.taus[level]
        return self.mu + a * tau ** 2 / (a ** 2 * tau ** 2 + sigma ** 2) * (z - a * self.mu)


def gaussian_chain_reference(sampler, steps, mu, tau, shift):
    """For Gaussian data every sampler step is linear in z plus Gaussian noise, so the mean and
    variance of the final samples follow a scalar recursion (float64, written out here
    independently of diffusion.py: DDIM z_s = alpha_s x + sigma_s eps; DDPM the posterior
    q(z_s | z_t, x) of Ho et al. 2020)."""
    m, V = 0.0, 1.0                               # z_1 ~ N(0, 1)
    ts = np.linspace(1, 0, steps + 1)
    for i in range(steps):
        (at, st), (a_, s_) = ref_alpha_sigma(ts[i], shift), ref_alpha_sigma(ts[i + 1], shift)
        k = at * tau ** 2 / (at ** 2 * tau ** 2 + st ** 2)   # x_pred = k z + mu (1 - k at)
        c0 = mu * (1 - k * at)
        if i == steps - 1:
            return k * m + c0, k ** 2 * V
        if sampler == "ddim":
            A, b, noise = a_ * k + s_ / st * (1 - at * k), a_ * c0 - s_ / st * at * c0, 0.0
        else:
            c = 1 - (at / st) ** 2 / (a_ / s_) ** 2           # 1 - SNR_t / SNR_s
            A, b, noise = a_ * ((1 - c) / at + c * k), a_ * c * c0, c * s_ ** 2
        m, V = A * m + b, A ** 2 * V + noise


def gaussian_levels_off(out, sampler, steps, oracle, shifts, tol=0.01):
    """The levels whose final samples do not have the mean and standard deviation of the exact
    chain (gaussian_chain_reference) within `tol` (relative std; mean within tol * tau):
    [] for a correct sampler."""
    off = []
    for level, (o, tau_r, s) in enumerate(zip(out, oracle.taus, shifts)):
        m, V = gaussian_chain_reference(sampler, steps, oracle.mu, tau_r, s)
        if abs(o.mean().item() - m) > tol * tau_r or abs(o.std().item() / math.sqrt(V) - 1) > tol:
            off.append(level)
    return off


class NoiseInsteadOfUpdate(MatryoshkaDiffusion):
    """A broken sampler: every update replaced by fresh noise (the prediction is kept)."""
    def step(self, z, v, t, s, level, *args, **kw):
        x_pred, z_next = super().step(z, v, t, s, level, *args, **kw)
        return x_pred, z_next if kw.get("last") else torch.randn_like(z)


class WrongVariance(MatryoshkaDiffusion):
    """A broken DDPM: the posterior noise has variance sigma_s^2 (the marginal), not c sigma_s^2."""
    def step(self, z, v, t, s, level, sampler, *args, **kw):
        x_pred, z_next = super().step(z, v, t, s, level, sampler, *args, **kw)
        if kw.get("last") or sampler != "ddpm":
            return x_pred, z_next
        lt, ls = (self.logsnr(u.reshape(1), level) for u in (t, s))
        c, s_s = -torch.expm1(lt - ls), D.alpha_sigma(ls)[1]
        # z_next = mean + sqrt(c) s_s n  ->  mean + s_s n (the same n)
        mean = D.alpha_sigma(ls)[0] * ((1 - c) * z / D.alpha_sigma(lt)[0] + c * x_pred)
        return x_pred, mean + (z_next - mean) / c.sqrt()


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddpm", 20), ("ddim", 50), ("ddim", 7)])
def test_samplers_reproduce_the_exact_gaussian_chain_at_every_level(sampler, steps):
    """For Gaussian data and the exact posterior-mean model, every sampler's final samples
    must have the mean and std of the exact chain (a float64 scalar recursion) within 1%, at
    every level with its own shifted schedule. Deliberate mutants (updates replaced by noise,
    one schedule for every level, and for DDPM a wrong posterior variance) must fail the same
    check: it has teeth."""
    resolutions, shifts, schedules = [4, 8, 16], [1, 2, 4], ["cosine", "cosine-shift2", "cosine-shift4"]
    oracle = GaussianOracle(0.2, 0.5, resolutions, shifts)

    def run(diffusion_class, schedules=schedules):
        d = diffusion_class(resolutions, schedules)
        # 128 samples of 768 values at every level: each level's std is known to 0.23% (1% = 4 SE)
        return d.sample(oracle, batch_size=128, sampler=sampler, num_inference_steps=steps,
                        generator=torch.Generator().manual_seed(0), thresholding="none",
                        dtype=torch.float64)

    out = run(MatryoshkaDiffusion)
    assert gaussian_levels_off(out, sampler, steps, oracle, shifts) == []
    if steps >= 50:                               # and the chain itself is close to the data
        for o, tau_r in zip(out, oracle.taus):
            assert o.std().item() == pytest.approx(tau_r, rel=0.12)
    mutants = {"noise": run(NoiseInsteadOfUpdate), "one schedule": run(MatryoshkaDiffusion, ["cosine"] * 3)}
    if sampler == "ddpm":
        mutants["variance"] = run(WrongVariance)
    for name, bad in mutants.items():
        assert gaussian_levels_off(bad, sampler, steps, oracle, shifts) != [], name
    assert gaussian_levels_off(mutants["one schedule"], sampler, steps, oracle, shifts)[0] == 1   # level 0 is unshifted


def test_dynamic_thresholding_acts_inside_the_sampling_loop():
    """Imagen thresholds the predicted x at every step, and the update uses the thresholded x.
    Reference: the DDIM chain written out in float64 numpy with np.percentile, from the same
    initial noise. A sampler that thresholds only the returned image fails it."""
    resolutions, shifts = [4, 8], [1, 2]
    oracle = GaussianOracle(0.9, 0.8, resolutions, shifts)        # predictions well beyond [-1, 1]
    d = MatryoshkaDiffusion(resolutions, ["cosine", "cosine-shift2"])
    steps, B = 12, 6

    def sample(diffusion):
        return diffusion.sample(oracle, batch_size=B, sampler="ddim", num_inference_steps=steps,
                                generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    g = torch.Generator().manual_seed(0)                          # the sampler's first draws
    zs = [torch.randn(s, generator=g, dtype=torch.float64).numpy() for s in oracle.input_shapes(B)]
    ts = np.linspace(1, 0, steps + 1)
    for level, (z, shift) in enumerate(zip(zs, shifts)):
        for i in range(steps):
            (at, st), (a_, s_) = ref_alpha_sigma(ts[i], shift), ref_alpha_sigma(ts[i + 1], shift)
            tau = oracle.taus[level]
            x = oracle.mu + at * tau ** 2 / (at ** 2 * tau ** 2 + st ** 2) * (z - at * oracle.mu)
            q = np.maximum(np.percentile(np.abs(x.reshape(B, -1)), 99.5, axis=1), 1.0)[:, None, None, None]
            x = np.clip(x, -q, q) / q
            z = x if i == steps - 1 else a_ * x + s_ * (z - at * x) / st
        zs[level] = z
    out = sample(d)
    for o, ref in zip(out, zs):
        np.testing.assert_allclose(o.numpy(), ref, rtol=0, atol=1e-6)   # quantiles are taken in float32
    assert out[1].abs().max() <= 1 and np.abs(zs[1]).max() <= 1

    class ThresholdOnlyTheResult(MatryoshkaDiffusion):
        def step(self, z, v, t, s, level, sampler, thresholding, *args, **kw):
            x_pred, z_next = super().step(z, v, t, s, level, sampler, "none", *args, **kw)
            return x_pred, D.dynamic_threshold(z_next) if kw.get("last") else z_next
    bad = sample(ThresholdOnlyTheResult(resolutions, ["cosine", "cosine-shift2"]))
    assert max(np.abs(o.numpy() - ref).max() for o, ref in zip(bad, zs)) > 1e-3


def test_guidance_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    model = randomize(NestedUNet(tiny_levels(2, num_classes=4)), std=0.1).eval()
    d = MatryoshkaDiffusion.for_model(model)
    zs = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)]
    cond = dict(label=torch.tensor([1, 2]))
    t = torch.tensor(0.3, dtype=torch.float64)
    with torch.no_grad():                         # as sampling runs (the same attention path)
        v_cond = model(zs, torch.full((2,), 0.3), **cond)
        v_null = model(zs, torch.full((2,), 0.3), label=torch.tensor([4, 4]))
    for w in (1.0, 0.0, 3.0):
        got = d.predict_v(model, zs, t, cond, guidance_scale=w)
        for g_, c, n in zip(got, v_cond, v_null):
            torch.testing.assert_close(g_, (n + w * (c - n)).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(d.predict_v(model, zs, t, cond, 1.0)[1], v_cond[1])


def test_dynamic_thresholding_matches_float64_recomputation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([0.2, 1.5, 3.0, 10.0])[:, None, None, None]
    got = D.dynamic_threshold(x, 0.995)
    for i in range(4):
        xi = x[i].double().numpy()
        s = max(np.percentile(np.abs(xi), 99.5), 1.0)    # Imagen: s >= 1
        np.testing.assert_allclose(got[i].numpy(), np.clip(xi, -s, s) / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], x[0])              # |x| < 1: untouched


def test_sampling_runs_on_tiny_model_with_text_and_guidance():
    torch.manual_seed(0)
    model = NestedUNet(tiny_levels(2, text_channels=6)).eval()
    d = MatryoshkaDiffusion.for_model(model)
    cond = dict(text=torch.randn(2, 3, 6), text_mask=torch.ones(2, 3, dtype=torch.bool))
    neg = dict(text=torch.randn(2, 5, 6), text_mask=torch.ones(2, 5, dtype=torch.bool))
    out = d.sample(model, cond, batch_size=2, num_inference_steps=3, guidance_scale=3.0, negative_cond=neg)
    assert [o.shape for o in out] == [(2, 3, 4, 4), (2, 3, 8, 8)]
    assert all(o.abs().max() <= 1 for o in out)
    with pytest.raises(ValueError, match="at least 1"):
        d.sample(model, cond, batch_size=1, num_inference_steps=0)


# ---------------------------------------------------------------------------------------
# Training (train.py, run as a user runs it: in fresh processes)
# ---------------------------------------------------------------------------------------


HERE = Path(__file__).resolve().parent


PAPER_RECIPE = ["--lr", "1e-4", "--high-res-fraction", "0.5"]


def run_train(tmp, *args, nproc=1, check=True, timeout=300, samples=False):
    """python train.py (or torchrun with nproc processes) with a tiny two-level config on
    Fashion-MNIST at 4x4 -> 8x8; returns the completed process."""
    cfg = tmp / "tiny.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(tiny_levels(2).to_dict()))
    # Appendix B's learning rate and mixed-resolution training (half the batch at the top level).
    base = ["--config", str(cfg), "--data", "fashion-mnist", "--data-limit", "256", "--out", str(tmp),
            *([] if samples else ["--no-samples"]), "--log-every", "1", "--workers", "0", *PAPER_RECIPE]
    if "--resume" in args and args[args.index("--resume") + 1:][:1] != ("auto",):
        base = []                                  # resuming a run folder: its own options (a user types just that)
    launcher = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(launcher + base + list(args), cwd=HERE, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def load_ckpt(run):
    return torch.load(Path(run) / "checkpoint.pt", map_location="cpu", weights_only=True)


def test_per_sample_randomness_is_a_function_of_the_sample_and_normal():
    import train
    # lowbias32 written with Python's unbounded integers: the int64 version must agree
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    xs = [0, 1, 2, 12345, 2 ** 31, 2 ** 32 - 1, 987654321]
    assert train.hash32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    shapes = [(3, 4, 4), (3, 8, 8)]
    t, noises, u_drop, u_high = train.per_sample_randomness(torch.tensor([5, 9, 2, 7]), 3, 0, shapes, "cpu")
    # a sample draws the same numbers whatever else is in its batch (and wherever it is)
    t2, noises2, d2, h2 = train.per_sample_randomness(torch.tensor([7, 5]), 3, 0, shapes, "cpu")
    assert torch.equal(t2, t[[3, 0]]) and torch.equal(d2, u_drop[[3, 0]]) and torch.equal(h2, u_high[[3, 0]])
    assert all(torch.equal(a, b[[3, 0]]) for a, b in zip(noises2, noises))
    # ... and different numbers at another step, with another seed, for another level
    assert not torch.equal(train.per_sample_randomness(torch.tensor([5]), 4, 0, shapes, "cpu")[1][0], noises[0][:1])
    assert not torch.equal(train.per_sample_randomness(torch.tensor([5]), 3, 1, shapes, "cpu")[1][0], noises[0][:1])
    # many samples: standard normal (Kolmogorov-Smirnov against the normal CDF), uncorrelated
    # between neighbouring samples, uniform t
    t, noises, _, _ = train.per_sample_randomness(torch.arange(2000), 11, 0, [(3, 16, 16)], "cpu")
    z = noises[0].flatten(1).double()
    x, _ = z.flatten().sort()
    ks = (torch.special.ndtr(x) - torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)).abs().max()
    assert ks < 0.003, ks                                  # 1.5M draws: 1.36/sqrt(n) = 0.0011 at 5%
    assert abs(float(torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1])) < 0.005
    assert abs(float(t.double().mean()) - 0.5) < 0.02 and abs(float(t.double().var()) - 1 / 12) < 0.005


@pytest.mark.parametrize("kind", ["label", "text"])
def test_training_batch_drops_conditions_and_puts_the_high_resolution_samples_first(kind):
    """train.prepare_batch: the conditioning dropout that guidance needs (the official code
    never dropped), and the mixed-resolution order, against the per-sample numbers drawn
    directly: the same samples, reordered alike in images, times, noises and conditions."""
    import argparse
    import train
    B, g = 400, torch.Generator().manual_seed(0)
    model = NestedUNet(tiny_levels(2, **({"num_classes": 10} if kind == "label" else {"text_channels": 6})))
    batch = {"image": torch.rand(B, 3, 8, 8, generator=g) * 2 - 1, "index": torch.arange(1000, 1000 + B)}
    feats, encoder = torch.randn(B, 3, 6, generator=g), None
    if kind == "label":
        batch["label"] = torch.randint(10, (B,), generator=g)
    else:
        batch["caption"] = [f"c{i}" for i in range(B)]

        class Encoder:                             # a fixed feature per caption, nothing padded
            def condition(self, captions, device):
                return {"text": feats[[int(c[1:]) for c in captions]]}
        encoder = Encoder()
    args = argparse.Namespace(cond_drop=0.3, high_res_fraction=0.5, seed=7, streaming=False, channels_last=False,
                              hflip=False)
    x, t, noises, cond, n_high = train.prepare_batch(batch, model, encoder, kind, 5, args, "cpu")

    shapes = [s[1:] for s in model.input_shapes(1)]
    t_ref, noise_ref, u_drop, u_high = train.per_sample_randomness(batch["index"], 5, 7, shapes, "cpu")
    high = u_high < 0.5
    order = torch.cat([torch.nonzero(high).flatten(), torch.nonzero(~high).flatten()])
    assert n_high == int(high.sum()) and 0.4 < n_high / B < 0.6
    assert torch.equal(x, batch["image"][order]) and torch.equal(t, t_ref[order])
    assert torch.equal(noises[0], noise_ref[0][order])
    assert torch.equal(noises[1], noise_ref[1][order][:n_high])   # only they reach 8x8
    dropped = (u_drop < 0.3)[order]
    assert 0.22 < dropped.float().mean() < 0.38
    if kind == "label":                            # the null class is num_classes
        assert torch.equal(cond["label"], torch.where(dropped, 10, batch["label"][order]))
    else:                                          # no text token is visible to a dropped sample
        assert torch.equal(cond["text"], feats[order])
        assert torch.equal(cond["text_mask"], ~dropped[:, None].expand(-1, 3))


def test_a_cpu_stage_is_channels_last_and_its_adam_is_appendix_b():
    """train.build_stage on a CPU: model and EMA channels-last by default (--channels-last auto),
    in the default layout with "off"; its optimizer (fused Adam) takes appendix B's steps, as a
    float64 Adam written here computes them."""
    import train
    CL = torch.channels_last
    cfg = tiny_levels(2)
    for setting, want in (("auto", True), ("off", False)):
        o = train.TrainOptions(res="4,8", steps=[2, 2], batch=[4, 4], channels_last=setting)
        st = train.build_stage(o, 1, cfg, DiffusionConfig(), torch.device("cpu"), 1,
                               previous=train.build_stage(o, 0, cfg, DiffusionConfig(), torch.device("cpu"), 1))
        for model in (st.model, st.ema):
            assert all(m.weight.is_contiguous(memory_format=CL) == want for m in model.modules()
                       if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    w = torch.nn.Linear(3, 4)
    opt = D.make_optimizer(w, 1e-2)
    p0 = [q.detach().double().clone() for q in w.parameters()]
    m = [torch.zeros_like(q) for q in p0]
    v = [torch.zeros_like(q) for q in p0]
    g = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        grads = [torch.randn(q.shape, generator=g) for q in p0]
        for q, gr in zip(w.parameters(), grads):
            q.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * gr.double()
            v[i] = 0.99 * v[i] + 0.01 * gr.double() ** 2
            p0[i] = p0[i] - 1e-2 * (m[i] / (1 - 0.9 ** step)) / ((v[i] / (1 - 0.99 ** step)).sqrt() + 1e-8)
        for q, ref in zip(w.parameters(), p0):
            torch.testing.assert_close(q.detach().double(), ref, rtol=0, atol=1e-6)


def test_a_training_step_through_a_compiled_module_equals_the_plain_one():
    """diffusion.training_step with train_model = torch.compile(model) (train.py --compile,
    bench.py's compile knob; the "eager" backend traces without generating code, in seconds):
    the same losses and the same weights as through the plain module."""
    cfg = tiny_levels(2, text_channels=6)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    cond = {"text": torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(1))}
    t, noises = torch.rand(4), [torch.randn(4, 3, 4, 4), torch.randn(4, 3, 8, 8)]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = randomize(NestedUNet(cfg), std=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        opt = D.make_optimizer(model, 1e-3)
        run = torch.compile(model, backend="eager") if compiled else None
        sums, bad = D.training_step(MatryoshkaDiffusion.for_model(model), model, opt, [(x, cond, t, noises, None)], run)
        results.append((sums, [p.detach().clone() for p in model.parameters()]))
    assert not bad and torch.allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(results[0][1], results[1][1]))
    assert not all(torch.equal(a, b) for a, b in zip(results[1][1], before))          # it stepped


def test_stage_boundary_grows_the_trained_model(tmp_path):
    """Stage 1 alone (run A) and a two-stage run stopped right at its stage boundary (run B)
    train the same 4x4 model. B's checkpoint then holds the grown model: its 4x4 weights are
    A's trained ones (not fresh), and its 4x4 outputs equal A's model's outputs."""
    run_train(tmp_path, "--res", "4", "--steps", "5", "--batch", "16", "--name", "A")
    run_train(tmp_path, "--res", "4,8", "--steps", "5,5", "--batch", "16,8", "--name", "B", "--stop-after", "5")
    a, b = load_ckpt(tmp_path / "A"), load_ckpt(tmp_path / "B")
    assert (a["stage"], b["stage"], b["step"]) == (0, 1, 5)
    cfg = NestedUNetConfig(**b["meta"]["model_config"])
    small, grown = NestedUNet(cfg.truncated(4)), NestedUNet(cfg)
    small.load_state_dict(a["model"])
    grown.load_state_dict(b["model"])
    fresh = NestedUNet(cfg.truncated(4))
    for key, w in small.state_dict().items():
        assert torch.equal(grown.innermost.state_dict()[key], w), key
    moved = [k for k, w in small.state_dict().items() if not torch.equal(w, fresh.state_dict()[k])]
    assert len(moved) > len(small.state_dict()) // 2          # trained, not a fresh init
    g = torch.Generator().manual_seed(0)
    c = cfg.in_channels                                   # 1: Fashion-MNIST is grey
    z = [torch.randn(3, c, 4, 4, generator=g), torch.randn(3, c, 8, 8, generator=g)]
    t, label = torch.rand(3, generator=g), torch.tensor([0, 3, 10])
    with torch.no_grad():
        assert torch.equal(grown(z, t, label=label)[0], small(z[:1], t, label=label)[0])
    # the EMA was grown too, with the same trained inner weights
    ema = NestedUNet(cfg)
    ema.load_state_dict(b["ema"])
    for key, w in a["ema"].items():
        assert torch.equal(ema.innermost.state_dict()[key], w), key


def test_killed_and_resumed_run_ends_with_identical_weights(tmp_path):
    args = ["--res", "4,8", "--steps", "20,20", "--batch", "16,8", "--ckpt-every", "3"]
    run_train(tmp_path, *args, "--name", "straight")
    cfg = tmp_path / "tiny.json"
    cmd = [sys.executable, "train.py", "--config", str(cfg), "--data", "fashion-mnist", "--data-limit", "256",
           "--out", str(tmp_path), "--no-samples", "--log-every", "1", "--name", "killed", *PAPER_RECIPE] + args
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:                  # SIGKILL once about half the steps are done
        rows = log.read_text().splitlines() if log.exists() else []
        if rows and json.loads(rows[-1])["step"] >= 20:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    killed_at = json.loads(log.read_text().splitlines()[-1])["step"]
    assert proc.returncode == -signal.SIGKILL and killed_at < 40, "the run was not killed mid-way"
    assert load_ckpt(tmp_path / "killed")["step"] < 40
    run_train(tmp_path, "--resume", str(tmp_path / "killed"))
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "killed")
    assert a["step"] == b["step"] == 40
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    steps = [json.loads(r)["step"] for r in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))             # the log has no gap and no repeat


def test_streamed_text_data_trains_and_resumes_exactly(tmp_path):
    """--streaming (the CC12M path) on a local image folder read as a stream: the captions are
    encoded on the fly without a cache, and a run stopped after 4 steps and resumed ends
    where an uninterrupted run does, across the stream's epoch boundary (3 batches an epoch)."""
    folder = tmp_path / "pics"
    folder.mkdir()
    rows = []
    for i in range(24):
        Image.new("RGB", (20, 12), (10 * i, 100, 200 - 5 * i)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"colour number {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--res", "8", "--steps", "7", "--batch", "8", "--data", str(folder), "--streaming",
            "--image-column", "image", "--caption-column", "text"]
    run_train(tmp_path, *args, "--name", "straight")
    run_train(tmp_path, *args, "--name", "stopped", "--stop-after", "4")
    assert load_ckpt(tmp_path / "stopped")["step"] == 4
    run_train(tmp_path, "--resume", str(tmp_path / "stopped"))
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "stopped")
    assert a["step"] == b["step"] == 7 and a["meta"]["cond"] == "text"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Same global batch, same seed: one optimizer step with torchrun --nproc_per_node=2 (gloo)
    gives the weights of one process, and of one process accumulating two micro-batches."""
    args = ["--res", "8", "--steps", "1", "--batch", "16"]
    run_train(tmp_path, *args, "--name", "one")
    run_train(tmp_path, *args, "--name", "two", nproc=2)
    run_train(tmp_path, *args, "--name", "accum", "--accum", "2")
    one, two, acc = (load_ckpt(tmp_path / n)["model"] for n in ("one", "two", "accum"))
    init = NestedUNet(NestedUNetConfig(**load_ckpt(tmp_path / "one")["meta"]["model_config"]))
    moved = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-6, msg=key)
        torch.testing.assert_close(acc[key], one[key], rtol=0, atol=2e-6, msg=key)
        moved += not torch.equal(one[key], init.state_dict()[key])
    assert moved > 10                              # the step did change the weights


def test_evaluation_during_training_is_logged_and_changes_no_training_step(tmp_path):
    common = ("--res", "8", "--steps", "4", "--batch", "8")
    run_train(tmp_path, *common, "--name", "plain")
    run_train(tmp_path, *common, "--name", "eval", "--eval-every", "2", "--eval-samples", "10",
              "--eval-real", "32", "--eval-steps", "3")
    rows = [json.loads(r) for r in (tmp_path / "eval" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_fd_effnet" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_fd_effnet"] > 0 and 0 <= r["eval_class_acc"] <= 1 for r in evals)
    # Evaluating draws no training randomness: both runs took the very same steps.
    plain = [json.loads(r) for r in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert [r["mse_sum"] for r in plain if "mse_sum" in r] == [r["mse_sum"] for r in rows if "mse_sum" in r] != []
    for key, value in load_ckpt(tmp_path / "plain")["model"].items():
        assert torch.equal(value, load_ckpt(tmp_path / "eval")["model"][key]), key
    # The last evaluation is of the exported EMA model, unguided, with the logged settings:
    # recomputed from the saved file it gives the same FD-EffNet and accuracy.
    run = E.load_run(str(tmp_path / "eval"))
    model, meta, diffusion = run.model, run.meta, run.diffusion
    images, labels = M.generate_set(model, diffusion, "label", 10, class_names=meta["class_names"],
                                    guidance=1.0, steps=3, seed=1234)
    features = M.EffNetFeatures()
    fd = M.fd_effnet(images, M.real_stats("fashion-mnist", 8, 32, features), features)
    assert fd == pytest.approx(evals[-1]["eval_fd_effnet"], rel=1e-4)
    classifier = M.train_classifier("fashion-mnist", 8)[0]
    assert M.accuracy(classifier, images, labels) == pytest.approx(evals[-1]["eval_class_acc"])
    # Another thresholding than the run's (evaluate.py fd --thresholding): the set is what
    # pipeline.generate draws with it from the same generator, and not the run's own.
    assert diffusion.config.thresholding == "clip"  # Fashion-MNIST's black: chosen from the data
    unclipped, _ = M.generate_set(model, diffusion, "label", 10, class_names=meta["class_names"], guidance=1.0,
                                  steps=3, seed=1234, thresholding="none")
    direct = diffusion.sample(model, {"label": torch.arange(10) % 10}, batch_size=10, sampler="ddim",
                              num_inference_steps=3, guidance_scale=1.0, thresholding="none",
                              generator=torch.Generator().manual_seed(1234))[-1]
    assert torch.equal(unclipped, direct) and not torch.equal(unclipped, images)


@pytest.mark.parametrize("args,message", [
    (["--res", "4,6", "--steps", "1,1", "--batch", "8,8"], "integer multiple"),
    (["--res", "4,8,16", "--steps", "1,1,1", "--batch", "8,8,8"], "has only 2 levels"),
    (["--res", "4,8", "--steps", "1", "--batch", "8,8"], "one entry per stage"),
    (["--res", "8", "--steps", "1", "--batch", "9", "--accum", "2"], "divisible by the number of processes"),
    (["--res", "8", "--steps", "1", "--batch", "8", "--data", "/no/such/folder"], "no such folder"),
    (["--res", "8", "--steps", "1", "--batch", "8", "--streaming", "--eval-every", "1"], "evaluate the saved model"),
])
def test_clear_errors_before_training(tmp_path, args, message):
    p = run_train(tmp_path, *args, check=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_folder_without_images_and_undecodable_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    p = run_train(tmp_path, "--res", "8", "--steps", "1", "--batch", "8", "--data", str(empty), check=False)
    assert p.returncode != 0 and "holds no images" in p.stderr
    # A folder with captions (metadata.jsonl) and one broken image: training runs, the broken
    # image is skipped and counted.
    folder = tmp_path / "pics"
    folder.mkdir()
    rows = []
    for i in range(15):
        Image.new("RGB", (20, 12), (16 * i, 100, 200)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"colour number {i}"})
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    rows.append({"file_name": "broken.png", "text": "broken"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run_train(tmp_path, "--res", "8", "--steps", "4", "--batch", "8", "--data", str(folder), "--name", "pics")
    log = [json.loads(r) for r in (tmp_path / "pics" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped"] >= 1
    assert load_ckpt(tmp_path / "pics")["meta"]["cond"] == "text"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    p = run_train(tmp_path, "--res", "8", "--steps", "30", "--batch", "8", "--lr", "1e30", "--clip", "1e30",
                  "--ckpt-every", "1", "--name", "nan", check=False)
    assert p.returncode == 1 and "NaN or infinite" in p.stderr, p.stderr[-2000:]
    ck = load_ckpt(tmp_path / "nan")
    assert ck["step"] < 30
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_loss_weights_reach_the_loss_of_every_stage(tmp_path):
    """--loss-weights gives one weight per level of the whole model; each stage trains with
    those of its own levels (a two-stage run used to fail at start-up), and the logged loss,
    the mean of what was back-propagated, is the weighted sum of the per-level losses."""
    run_train(tmp_path, "--res", "4,8", "--steps", "2,2", "--batch", "8,8", "--loss-weights", "1,4", "--name", "w")
    rows = [json.loads(r) for r in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    for r in rows:
        expected = r["loss_4"] + (4 * r["loss_8"] if r["stage"] == 2 else 0)
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert "loss_8" not in rows[0] and rows[-1]["loss"] > rows[-1]["mse_sum"]


def test_a_checkpoint_saved_before_the_last_stage_samples(tmp_path):
    """ema.safetensors describes the weights it holds: a file saved in stage 1 of a two-stage
    run (here by --stop-after), or by a run whose --res stops below the config's top level,
    is a one-level model that sample.py samples."""
    run_train(tmp_path, "--res", "4,8", "--steps", "3,3", "--batch", "8,8", "--stop-after", "2", "--name", "mid")
    run_train(tmp_path, "--res", "4", "--steps", "2", "--batch", "8", "--name", "low")
    for name in ("mid", "low"):
        model, meta = P.load_weights(tmp_path / name / "ema.safetensors")
        assert model.resolutions == [4] and meta["model_config"]["resolutions"] == [4, 2]
        p = run_sample("--ckpt", str(tmp_path / name), "--label", "bag", "--num-images", "2",
                       "--num-inference-steps", "2", "--out", str(tmp_path / f"{name}-img"))
        assert p.returncode == 0, p.stderr[-2000:]
        assert Image.open(tmp_path / f"{name}-img-matryoshka.png").size[0] > 0
    # The run goes on from its stage-1 checkpoint and grows as planned.
    run_train(tmp_path, "--resume", str(tmp_path / "mid"))
    assert P.load_weights(tmp_path / "mid" / "ema.safetensors")[0].resolutions == [4, 8]


def test_a_run_stopped_before_its_first_log_row_says_how_to_resume(tmp_path):
    """--stop-after before the first --log-every row: no log.jsonl yet, and still a clean
    stop (exit 0, a checkpoint, the command that resumes it), not a traceback."""
    p = run_train(tmp_path, "--res", "8", "--steps", "4", "--batch", "8", "--name", "early", "--stop-after", "2",
                  "--log-every", "10")
    assert not (tmp_path / "early" / "log.jsonl").exists()
    assert f"stopped at step 2; saved. Resume with: python train.py --resume {tmp_path / 'early'}" in p.stdout
    assert torch.load(tmp_path / "early" / "checkpoint.pt", weights_only=True)["step"] == 2
    run_train(tmp_path, "--resume", str(tmp_path / "early"))
    assert torch.load(tmp_path / "early" / "checkpoint.pt", weights_only=True)["step"] == 4


def test_checkpoints_load_without_running_code_and_a_pickle_that_would_is_refused(tmp_path):
    """checkpoint.pt holds tensors, numbers, strings, lists and dicts only (the RNG states
    too), so it loads with weights_only=True; a file whose pickle would call a function is
    refused in one line, and the function never runs."""
    run_train(tmp_path, "--res", "8", "--steps", "2", "--batch", "8", "--name", "safe")
    ck = torch.load(tmp_path / "safe" / "checkpoint.pt", weights_only=True)   # would raise otherwise
    assert ck["step"] == 2 and isinstance(ck["rng"][0]["numpy"][1], torch.Tensor)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):                      # unpickling this would create the marker file
            return (Path.touch, (marker,))
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({**ck, "extra": Payload()}, evil / "checkpoint.pt")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "checkpoint.pt").write_bytes((tmp_path / "safe" / "checkpoint.pt").read_bytes()[:5000])
    for run, message in ((evil, "refused"), (damaged, "truncated or damaged")):
        p = run_train(tmp_path, "--resume", str(run), check=False)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert len(p.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def one_line_error(main, argv, capsys):
    """Run a script's main(argv) in this process; it must stop with a non-zero exit and one
    line (argparse's own errors included). Returns the line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    msg = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None), msg
    assert len(msg.strip().splitlines()) == 1, msg
    return msg.strip()


@pytest.mark.parametrize("argv,expected", [
    (["--batch", "0,0"], "--batch 0,0: expected"), (["--lr", "-1"], "--lr -1.0: expected a positive"),
    (["--lr", "nan"], "--lr nan: expected"), (["--accum", "0"], "--accum 0: expected"),
    (["--ema", "1.5"], "--ema 1.5: expected an EMA decay in [0, 1)"), (["--cond-drop", "2"], "--cond-drop 2.0"),
    (["--steps", ","], "--steps: ',': expected comma-separated integers"), (["--warmup", "-1"], "--warmup -1"),
    (["--clip", "0"], "--clip 0.0"), (["--high-res-fraction", "nan"], "--high-res-fraction nan"),
    (["--loss-weights", "1,nan"], "--loss-weights 1.0,nan"), (["--loss-weights", "0,0"], "at least one weight"),
    (["--loss-weights", "1"], "one weight per level"), (["--device", "foo"], "--device foo: expected"),
    (["--name", "a/b"], "--name 'a/b'"), (["--eval-samples", "1"], "--eval-samples 1"),
    (["--sample-guidance", "inf"], "--sample-guidance inf"), (["--res", ""], "--res : expected sizes"),
    (["--seed", "-3"], "--seed -3"), (["--shift-power", "nan"], "--shift-power nan"),
    (["--data-limit", "-1"], "--data-limit -1"), (["--log-every", "0"], "--log-every 0"),
    (["--resume", "{tmp}"], "no checkpoint.pt"), (["--config", "{tmp}/nope.json"], "cannot read it"),
    (["--device", "mps"], "no Apple GPU"), (["--keep-checkpoints", "-1"], "--keep-checkpoints -1"),
])
def test_train_flags_out_of_range_end_in_one_line_before_any_work(argv, expected, tmp_path, capsys):
    import train
    argv = [a.format(tmp=tmp_path) for a in argv]
    msg = one_line_error(train.main, ["--out", str(tmp_path / "runs"), *argv], capsys)
    assert expected in msg and msg.startswith("train.py: ")
    assert not (tmp_path / "runs").exists()        # no run folder: nothing was done


@pytest.mark.parametrize("script,argv,expected", [
    ("sample", ["a", "--num-images", "0"], "--num-images 0"),
    ("sample", ["--guidance-scale", "nan"], "--guidance-scale nan"),
    ("sample", ["--seed", "-1"], "--seed -1"), ("sample", ["--batch-size", "0"], "--batch-size 0"),
    ("sample", ["--num-inference-steps", "-5"], "--num-inference-steps -5"),
    ("sample", ["--prompts-file", "{tmp}/none.txt"], "cannot read it"),
    ("sample", ["a", "--out-dir", "{tmp}/gen"], "--out-dir"),
    ("sample", ["--prompts-file", "{tmp}/binary.txt"], "not a text file"),
    ("sample", ["--prompts-file", "{tmp}/empty.txt"], "holds no prompt"),
    ("sample", ["--device", "cuda:3"], "--device cuda:3"),
    ("sample", ["--sampler", "euler"], "argument --sampler: invalid choice"),
    ("sample", ["--label", "3", "--init-image", "x.png", "--strength", "2"],
     "--strength 2.0: expected a strength in [0, 1]"),
    ("sample", ["--label", "3", "--mask", "m.png"], "inpainting needs the image too"),
    ("sample", ["--label", "3", "--upscale", "a.png", "--init-image", "b.png"], "one of them"),
    ("sample", ["--guidance-scale", "3,nan"], "--guidance-scale 3.0,nan"),
    ("tools.evaluate", ["video", "--num", "1"], "--num 1"),
    ("tools.evaluate", ["video", "--guidance-scale", "nan"], "nan"),
    ("tools.evaluate", ["video", "--bogus"], "unrecognized arguments: --bogus"),
    ("tools.evaluate", ["play"], "invalid choice"),
    ("tools.evaluate", ["compare", "--data", "cifar"], "--data cifar"),
    ("tools.evaluate", ["compare", "--res", "32,16"], "--res 32,16"),
    ("tools.evaluate", ["compare", "--seeds", ""], "--seeds"), ("tools.evaluate", ["fd", "--num", "1"], "--num 1"),
    ("tools.evaluate", ["fd", "--thresholding", "x"], "--thresholding"),
    ("tools.evaluate", ["sweep", "--ckpt", "x", "--scales", "1,nan"], "--scales 1.0,nan"),
    ("tools.evaluate", ["fd", "--device", "tpu"], "--device tpu"),
    ("tools.evaluate", ["compare", "--steps", "1"], "--steps 1"),
    ("tools.bench", ["--batch", "0"], "--batch 0"), ("tools.bench", ["--knobs", "turbo"], "unknown turbo"),
    ("tools.bench", ["--config", "nope"], "--config nope"),
    ("tools.bench", ["--peak-flops", "-1"], "--peak-flops -1.0"),
    ("tools.bench", ["--batch", "3"], "even batch"), ("tools.bench", ["--repeats", "0"], "--repeats 0"),
    ("tools.bench", ["--config", "{tmp}/none.json"], "cannot read it"),
    ("tools.demo", ["--port", "70000"], "--port 70000"), ("tools.demo", ["--device", "tpu"], "--device tpu"),
])
def test_every_script_refuses_bad_flags_in_one_line(script, argv, expected, tmp_path, capsys, monkeypatch):
    import importlib
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)))
    (tmp_path / "empty.txt").write_text("\n  \n")
    monkeypatch.chdir(tmp_path)                    # no runs/ here: a check that came too late would fail differently
    main = importlib.import_module(script).main
    msg = one_line_error(main, [a.format(tmp=tmp_path) for a in argv], capsys)
    assert expected in msg and msg.startswith(script.replace(".", "/") + ".py"), msg


@pytest.mark.parametrize("argv", [["train.py"], ["sample.py"], ["video.py"], ["-m", "tools.evaluate"],
                                  ["-m", "tools.evaluate", "fd"], ["-m", "tools.evaluate", "video"],
                                  ["-m", "tools.bench"], ["-m", "tools.release"], ["-m", "tools.demo"]])
def test_every_scripts_help_works_with_nothing_trained(argv, tmp_path):
    command = [str(HERE / argv[0]), *argv[1:]] if argv[0].endswith(".py") else argv
    p = subprocess.run([sys.executable, *command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(HERE)})
    assert p.returncode == 0 and "usage:" in p.stdout and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_files_that_are_not_what_they_claim_end_in_one_line(tmp_path):
    """A malformed JSON config, a text encoder that is neither local nor on the hub (offline
    here), a truncated ema.safetensors, and a text file named like one: one line, no traceback."""
    (tmp_path / "broken.json").write_text('{"resolutions": [8,')
    (tmp_path / "wrong.json").write_text('{"resolutions": [8, 4], "colour": "blue"}')
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"red {i}"})
                                                     for i in range(8)))
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_levels(2).to_dict()))
    base = ["--res", "8", "--steps", "1", "--batch", "8", "--config", str(tmp_path / "tiny.json")]
    for args, message in ((["--config", str(tmp_path / "broken.json")], "not valid JSON"),
                          (["--config", str(tmp_path / "wrong.json")], "not a NestedUNet config"),
                          (["--data", str(folder), "--text-encoder", "some/model"], "--text-encoder some/model"),
                          (["--data", str(folder), "--cond", "label"], "has no class labels")):
        cmd = [sys.executable, "train.py", *base, "--out", str(tmp_path), "--no-samples", *args]
        p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().splitlines()[-1].startswith("train.py: ")
    run_train(tmp_path, *base, "--name", "ok")
    good = (tmp_path / "ok" / "ema.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.safetensors").write_text("these are my notes")
    for name in ("truncated", "notes"):
        p = run_sample("--label", "bag", "--ckpt", str(tmp_path / f"{name}.safetensors"))
        assert p.returncode != 0 and "not a readable safetensors file" in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# Sampling (sample.py)
# ---------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """Two tiny runs of a few steps: class-conditional (Fashion-MNIST) and text-conditional
    (a folder of captioned images, MiniLM features)."""
    tmp = tmp_path_factory.mktemp("runs")
    run_train(tmp, "--res", "4,8", "--steps", "2,2", "--batch", "8,8", "--name", "fashion")
    folder = tmp / "pics"
    folder.mkdir()
    rows = []
    for i, (name, colour) in enumerate([("a red square", (220, 20, 20)), ("a green square", (20, 200, 20)),
                                        ("a blue square", (20, 20, 220)), ("a yellow square", (230, 220, 20))] * 2):
        Image.new("RGB", (16, 16), colour).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": name})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run_train(tmp, "--res", "8", "--steps", "2", "--batch", "8", "--data", str(folder), "--name", "text")
    return tmp


def run_sample(*args, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "sample.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sample_script_end_to_end_and_same_seed_same_images(trained_runs, tmp_path):
    run = trained_runs / "text"
    outs = []
    for seed in (3, 3, 4):
        prefix = tmp_path / f"s{len(outs)}"
        p = run_sample("a red square", "--ckpt", str(run), "--num-images", "2", "--num-inference-steps", "4",
                       "--seed", str(seed), "--out", str(prefix), "--show-steps")
        assert p.returncode == 0, p.stderr[-2000:]
        for suffix in ("", "-matryoshka", "-steps"):
            assert (tmp_path / f"s{len(outs)}{suffix}.png").exists()
        outs.append(np.asarray(Image.open(f"{prefix}.png")))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_sample_many_images_into_a_folder(trained_runs, tmp_path):
    prompts = tmp_path / "labels.txt"
    prompts.write_text("0\nsandal\nbag\n")
    p = run_sample("--ckpt", str(trained_runs / "fashion"), "--prompts-file", str(prompts), "--num-images", "5",
                   "--batch-size", "2", "--out-dir", str(tmp_path / "gen"), "--num-inference-steps", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.name for f in (tmp_path / "gen").glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    first = (tmp_path / "gen" / "000004.png").read_bytes()
    # A second run into the same folder writes the same images and captions (no rows appended).
    p = run_sample("--ckpt", str(trained_runs / "fashion"), "--prompts-file", str(prompts), "--num-images", "5",
                   "--batch-size", "2", "--out-dir", str(tmp_path / "gen"), "--num-inference-steps", "2")
    assert p.returncode == 0 and (tmp_path / "gen" / "000004.png").read_bytes() == first
    rows = [json.loads(r) for r in (tmp_path / "gen" / "captions-0.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["0", "sandal", "bag", "0", "sandal"]


@pytest.mark.parametrize("args,message", [
    (["a sandal", "--ckpt", "{fashion}"], "class-conditional: use --label"),
    (["--label", "11", "--ckpt", "{fashion}"], "out of range"),
    (["--label", "spaceship", "--ckpt", "{fashion}"], "not a class of this model"),
    (["--label", "3", "--ckpt", "{text}"], "text-conditional: give a prompt"),
    (["a cat", "--ckpt", "{text}", "--num-inference-steps", "0"], "at least 1 step"),
    (["a cat", "--ckpt", "{bad}"], "do not match this version"),
    (["a cat", "--ckpt", "{missing}"], "no such file"),
    (["--prompts-file", "{labels}", "--ckpt", "{fashion}", "--num-inference-steps", "1", "--out-dir", "{gen}"],
     "labels.txt: --label 'spaceship' is not a class"),
    (["--label", "bag", "--ckpt", "{fashion}", "--upscale", "{img8}"], "this model's lower levels are 4x4"),
    (["--label", "bag", "--ckpt", "{fashion}", "--init-image", "{img8}", "--mask", "{img4}"], "expected the same size"),
    (["--label", "bag", "--ckpt", "{fashion}", "--init-image", "{labels}"], "cannot read it as an image"),
    (["--label", "bag", "--ckpt", "{fashion}", "--guidance-scale", "1,2,3"], "3 scales for a model of 2 levels"),
])
def test_sample_errors(trained_runs, tmp_path, args, message):
    from safetensors.torch import load_file, save_file
    good = trained_runs / "text" / "ema.safetensors"
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    state = load_file(str(good))
    state.pop(next(iter(state)))                  # one tensor missing
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    (tmp_path / "labels.txt").write_text("sandal\nspaceship\n")    # a line that is no class
    for n in (4, 8):
        Image.new("L", (n, n), 100).save(tmp_path / f"img{n}.png")
    paths = dict(fashion=trained_runs / "fashion", text=trained_runs / "text",
                 bad=tmp_path / "bad.safetensors", missing=tmp_path / "nothing", labels=tmp_path / "labels.txt",
                 gen=tmp_path / "gen", img4=tmp_path / "img4.png", img8=tmp_path / "img8.png")
    p = run_sample(*[a.format(**paths) for a in args])
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_sample_without_trained_weights_says_how_to_train(tmp_path):
    p = run_sample("a panda", cwd=tmp_path)       # no runs/ folder here
    assert p.returncode != 0 and "python train.py" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 25)])
def test_generate_reproduces_the_exact_gaussian_chain(sampler, steps):
    """sample.draw, the function sample.py samples with, on the Gaussian oracle: one
    network evaluation per step, and the exact chain's statistics at every level."""
    import types
    shifts = [1, 2, 4]
    oracle = GaussianOracle(0.2, 0.5, [4, 8, 16], shifts)
    d = MatryoshkaDiffusion([4, 8, 16], ["cosine", "cosine-shift2", "cosine-shift4"])
    run = types.SimpleNamespace(model=oracle, diffusion=d, device=torch.device("cpu"),
                                negative_condition=lambda n, p: None)
    out = S.draw(run, {}, 128, 0, dict(sampler=sampler, num_inference_steps=steps, thresholding="none"))
    assert oracle.calls == steps
    assert gaussian_levels_off([o.double() for o in out], sampler, steps, oracle, shifts) == []


def test_guidance_is_one_network_evaluation_per_step():
    model = NestedUNet(tiny_levels(2, text_channels=6)).eval()
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0][0].shape[0]))
    d = MatryoshkaDiffusion.for_model(model)
    cond = dict(text=torch.randn(3, 4, 6), text_mask=torch.ones(3, 4, dtype=torch.bool))
    d.sample(model, cond, batch_size=3, num_inference_steps=5, guidance_scale=4.0)
    assert calls == [6] * 5                       # condition and null condition in one batch of 2 x 3
    calls.clear()
    d.sample(model, cond, batch_size=3, num_inference_steps=5, guidance_scale=1.0)
    assert calls == [3] * 5                       # no guidance: no null half


# ---------------------------------------------------------------------------------------
# Video (video.py)
# ---------------------------------------------------------------------------------------



def tiny_video(t_attn=(1, 1, 0), outer=True, **kw):
    """Image level 4x4 (first frame) -> 4 frames at 4x4 -> (optionally) 4 frames at 8x8."""
    g = dict(emb_channels=16, num_lm_attn_layers=1, lm_feature_projected_channels=8, **kw)
    image = NestedUNetConfig(resolutions=[4, 2], resolution_channels=[8, 8], num_res_blocks=[1, 1],
                             num_attn_layers_per_block=[0, 1], num_heads=2, **g)
    temporal = V._temporal(image, 4, 8, [1, 1, 1], list(t_attn), "cosine-shift2", 4, num_heads=2, **g)
    if not outer:
        return temporal
    return NestedUNetConfig(resolutions=[8, 4], resolution_channels=[8, 8], num_res_blocks=[1, 1],
                            num_attn_layers_per_block=[0, 0], num_heads=2, schedule="cosine-shift4",
                            inner_config=temporal, **g)


def test_video_levels_shapes_and_first_frame_downsampling():
    cfg = tiny_video(text_channels=6)
    model = V.build_level(cfg)
    assert cfg.level_sizes() == [(1, 4), (4, 4), (4, 8)]
    B = 2
    z = [torch.randn(s) for s in model.input_shapes(B)]
    assert [tuple(x.shape) for x in z] == [(2, 3, 4, 4), (2, 4, 3, 4, 4), (2, 4, 3, 8, 8)]
    out = model(z, torch.rand(B), text=torch.randn(B, 3, 6))
    assert [o.shape for o in out] == [x.shape for x in z]
    x = torch.randn(B, 4, 3, 8, 8, dtype=torch.float64)
    D = V.video_downsample(cfg)
    pooled = x.reshape(B, 4, 3, 4, 2, 4, 2).mean((4, 6))            # 2x2 blocks averaged by hand
    torch.testing.assert_close(D(x, 0), pooled[:, 0])                # image level: the first frame
    torch.testing.assert_close(D(x, 1), pooled)
    assert torch.equal(D(x, 2), x)
    with torch.device("meta"):
        paper = V.build_level(V.preset("MDM-S64T16S256"))
    assert paper.config.level_sizes() == [(1, 64), (16, 64), (16, 256)]
    assert [s[1:] for s in paper.input_shapes(1)] == [(3, 64, 64), (16, 3, 64, 64), (16, 3, 256, 256)]


@pytest.mark.parametrize("t_attn,independent", [((0, 0, 0), True), ((1, 1, 0), False)])
def test_frames_mix_only_through_temporal_attention(t_attn, independent):
    torch.manual_seed(0)
    model = randomize(V.build_level(tiny_video(t_attn, outer=False)), std=0.2).eval()
    B = 1
    z = [torch.randn(s) for s in model.input_shapes(B)]
    t = torch.rand(B)
    ref = model(z, t)[1]                                             # (1, 4, 3, 4, 4)
    for k in (0, 1, 3):                                              # change one frame of the video level
        z2 = [z[0], z[1].clone()]
        z2[1][:, k] += 1.0
        out = model(z2, t)[1]
        changed = [(out[:, f] - ref[:, f]).abs().max().item() > 1e-6 for f in range(4)]
        assert changed[k]
        others = changed[:k] + changed[k + 1:]
        assert (not any(others)) if independent else any(others), (k, changed)


def test_image_model_grows_into_a_video_model_with_its_weights():
    torch.manual_seed(0)
    cfg = tiny_video(text_channels=6)
    image = randomize(NestedUNet(cfg.truncated(4)), seed=3).eval()
    vid = grow(image, cfg, V.build_level).eval()
    assert type(vid.levels()[1]) is V.TemporalUNet and type(vid.levels()[0]) is NestedUNet
    for key, w in image.state_dict().items():
        assert torch.equal(vid.innermost.state_dict()[key], w), key
    z = [torch.randn(s) for s in vid.input_shapes(2)]
    t, text = torch.rand(2), torch.randn(2, 3, 6)
    assert torch.equal(vid(z, t, text=text)[0], image(z[:1], t, text=text)[0])


def test_video_batch_without_a_high_resolution_sample():
    """Mixed-resolution training may draw no sample for the top level (probability 0.5^B per
    rank and step): the video levels take their frame counts from the config, so the lower
    levels' outputs are those of the inner model alone, and the loss and its gradients are
    finite (the frame count was rows / samples: a ZeroDivisionError)."""
    torch.manual_seed(0)
    for outer in (False, True):
        model = randomize(V.build_level(tiny_video(outer=outer, text_channels=6)), std=0.1)
        z = [torch.randn(s) for s in model.input_shapes(3)]
        t, text = torch.rand(3), torch.randn(3, 2, 6)
        out = model([*z[:-1], z[-1][:0]], t, text=text)
        assert out[-1].shape == (0, *z[-1].shape[1:])
        inner = model.levels()[-2]
        for a, b in zip(out[:-1], inner(z[:-1], t, text=text)):
            torch.testing.assert_close(a, b)
        d = V.diffusion_for(model)
        x = torch.rand(3, 4, 3, *z[-1].shape[-2:]) * 2 - 1
        loss, per_level = d.loss(model.train(), x, {"text": text}, high_res_batch=0, high_res_fraction=0.5)
        loss.backward()
        assert per_level[-1] == 0 and torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_emoji_motion_clips_and_the_motion_measure():
    ds = data.EmojiMotion(size=16, frames=8, num_emoji=40)
    assert len(ds) == 240 and ds[7]["image"].shape == (8, 3, 16, 16)
    assert ds[7]["caption"].endswith(data.MOTIONS[1]) and torch.equal(ds[7]["image"], ds[7]["image"])
    right = [V.motion_of(ds[i]["image"]) == i % 6 for i in range(len(ds))]
    assert np.mean(right) >= 0.95                                    # the measure reads real clips right
    assert V.motion_of(torch.flip(ds[0]["image"], dims=[0])) == 1   # left, played backwards: right


def test_video_training_runs_through_train_py(tmp_path):
    cfg = tmp_path / "tinyvideo.json"
    cfg.write_text(json.dumps(tiny_video(outer=False).to_dict()))
    p = subprocess.run([sys.executable, "train.py", "--config", str(cfg), "--data", "emoji-motion", "--res", "4,4x4",
                        "--steps", "2,2", "--batch", "8,4", "--data-limit", "48", "--out", str(tmp_path),
                        "--name", "vid", "--sample-every", "1000", "--sample-steps", "2", "--log-every", "1"],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "vid" / "samples" / "step0000004.gif").exists()
    model, meta = P.load_weights(tmp_path / "vid" / "ema.safetensors")
    assert meta["video"] and model.config.level_sizes() == [(1, 4), (4, 4)]


# ---------------------------------------------------------------------------------------
# Evaluation (evaluate.py)
# ---------------------------------------------------------------------------------------



def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    ref = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert M.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(ref, rel=1e-10)
    # full covariances: tr (S1^1/2 S2 S1^1/2)^1/2 = sum sqrt(eigenvalues of S1 S2), via numpy
    A, B = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    S1, S2 = A @ A.T + 0.1 * torch.eye(8, dtype=torch.float64), B @ B.T
    ev = np.linalg.eigvals(S1.numpy() @ S2.numpy())
    ref = float(np.trace(S1.numpy()) + np.trace(S2.numpy()) - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())
    m = torch.zeros(8, dtype=torch.float64)
    assert M.frechet_distance(m, S1, m, S2) == pytest.approx(ref, rel=1e-9)
    assert M.frechet_distance(m, S1, m, S1) == pytest.approx(0, abs=1e-9)
    # sample statistics of two known Gaussians approach the closed form
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    y = torch.randn(20000, 3, generator=g, dtype=torch.float64) + 1.0
    expected = 3 * 1.0 + (1 - 1) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2
    assert M.frechet_distance(*M.gaussian_stats(x), *M.gaussian_stats(y)) == pytest.approx(expected, rel=0.05)


def test_fd_effnet_tells_real_from_noise():
    feats = M.EffNetFeatures(size=96)
    ds = data.load_fashion_mnist(16, "test")
    real = data.to_tensor(ds.images[:200])
    f = feats(real)
    assert f.shape == (200, 1280) and torch.isfinite(f).all()
    torch.testing.assert_close(feats(real[:5]), f[:5], rtol=1e-4, atol=1e-4)    # batch-independent
    half = M.frechet_distance(*M.gaussian_stats(f[:100]), *M.gaussian_stats(f[100:]))
    noise = M.frechet_distance(*M.gaussian_stats(f[:100]), *M.gaussian_stats(feats(torch.rand(100, 3, 16, 16) * 2 - 1)))
    assert noise > 3 * half


def test_t5_text_encoder_from_a_local_folder_matches_the_model_on_each_caption(tmp_path):
    # The FLAN-T5 path of data.TextEncoder, with a tiny random T5 saved locally: batched,
    # padded and cached features must equal the encoder run on each caption alone.
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    enc = data.TextEncoder(str(tmp_path))
    captions = ["a red heart", "a panda playing guitar", "fire"]
    feats, mask = enc(captions)
    assert enc.dim == 32 and feats.shape[-1] == 32 and mask is not None
    ref = T5EncoderModel.from_pretrained(tmp_path).eval()
    for i, c in enumerate(captions):
        tok = enc.tokenizer([c], return_tensors="pt")
        with torch.no_grad():
            alone = ref(input_ids=tok.input_ids).last_hidden_state[0]
        n = alone.shape[0]
        assert mask[i].sum() == n and not mask[i, n:].any()
        assert torch.allclose(feats[i, :n], alone, atol=1e-5)
        assert feats[i, n:].abs().sum() == 0
    again, _ = enc(captions[::-1])                            # from the cache, in another order
    assert torch.equal(again[0, : mask[2].sum()], feats[2, : mask[2].sum()])
    cond = enc.condition(["fire", "fire"], "cpu")
    assert "text_mask" not in cond                            # nothing padded: no mask
    # Without a cache (streamed captions) the features are computed on the device for the
    # whole batch at once: the same condition as the cached, per-caption path.
    direct = data.TextEncoder(str(tmp_path), cache_size=0)
    for caps in (captions, ["fire", "fire"]):
        a, b = enc.condition(caps, "cpu"), direct.condition(caps, "cpu")
        assert a.keys() == b.keys() and not direct.cache
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)


def test_clip_score_with_a_tiny_random_clip(tmp_path):
    from transformers import ByT5Tokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    torch.manual_seed(0)
    tc = CLIPTextConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64, eos_token_id=1, pad_token_id=0,
                        bos_token_id=0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=16)).eval()
    model.save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    score = M.ClipScore(str(tmp_path))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a red heart", "a cat", "a rocket moving up"]
    got = score(images, prompts)
    # second path: the model's own forward gives logit_scale * cos on the diagonal
    x = (((images + 1) / 2) - score.mean) / score.std
    tok = score.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=x)
        cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert got == pytest.approx(float((100 * cos).clamp(min=0).mean()), rel=1e-4, abs=1e-4)
    assert score(images, prompts, batch=2) == pytest.approx(got, rel=1e-5)   # in batches, padded apart


# ---------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,release", [("CPU-S16S32", False), ("CPU-S16S32S64", False), ("CPU-tiny-S16S32", False),
                                          ("MDM-S64S256", False), ("CPU-S16S32", True), ("MDM-S64S256", True),
                                          ("docs/official-shape.json", True)])
def test_plain_unet_of_the_benchmark_has_the_size_and_work_of_the_nested_model(name, release):
    """The paper's Table 2 compares with a plain UNet of the same size: the same resolutions,
    parameters (within 0.5%) and FLOPs of a training step (within 0.5%), counted on the meta
    device; in our architecture and in the released models' (bench.py's release row)."""
    import dataclasses
    from tools import bench
    cfg = dataclasses.replace(P.load_model_config(name), text_channels=384)
    cfg = R.released(cfg) if release else cfg
    flat = bench.flattened(cfg)
    assert flat.inner_config is None
    assert sorted(set(flat.resolutions)) == sorted({r for c in cfg.levels() for r in c.resolutions})
    spec = dict(config=name, batch=2, device="meta", text_channels=384, release=release)
    nested, plain = bench.harness(spec, "nested"), bench.harness(spec, "plain")
    released = R.ReleasedNestedUNet
    assert isinstance(nested["model"], released) == isinstance(plain["model"], released) == release
    assert plain["model"].config.to_dict() == flat.to_dict()
    params = sum_params(nested["model"]) / sum_params(plain["model"])
    flops = nested["count_flops"]() / plain["count_flops"]()
    assert abs(params - 1) < 0.005 and abs(flops - 1) < 0.005, (params, flops)


def test_benchmark_measures_and_pairs_on_a_tiny_model():
    from tools import bench
    spec = dict(config="tiny", batch=2, device="cpu", text_channels=8, warmup=1, repeats=3, sample_steps=2,
                bf16=False, model="nested", knob="base", peak_flops=1e12)
    r = bench.measure(spec)
    assert r["train_step_s"] > 0 and r["sample_step_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["images_per_s"] == pytest.approx(2 / r["train_step_s"])
    assert r["mfu"] == pytest.approx(r["train_flops"] / r["train_step_s"] / 1e12)
    ratios = bench.paired(spec)
    assert set(ratios) == {"train", "sample"} and all(0 < v < 10 for v in ratios.values())


def test_benchmark_harness_builds_the_stage_one_model_for_the_comparisons_budget():
    from tools import bench
    spec = dict(config="CPU-tiny-S16S32", batch=2, device="cpu", num_classes=10)
    full, low = bench.harness(spec, "nested"), bench.harness({**spec, "truncate": 16}, "nested")
    reference = NestedUNet(preset("CPU-tiny-S16S32", num_classes=10).truncated(16))
    assert low["model"].resolutions == [16] and full["model"].resolutions == [16, 32]
    assert sum_params(low["model"]) == sum_params(reference) < sum_params(full["model"])


@pytest.mark.parametrize("cond", [{"text_channels": 8}, {"num_classes": 10}, {}])
def test_benchmark_counts_the_flops_of_a_training_step_from_the_layer_shapes(cond, monkeypatch):
    """The numerator of MFU. Reference: each convolution, linear layer and attention is
    2 FLOPs per multiply-add in the forward pass, from its shapes; the backward pass costs
    twice that (gradients of input and weights), or once where the input needs no gradient
    (the noisy images, the text features, the sinusoidal time features)."""
    from tools import bench
    spec = dict(config="CPU-tiny-S16S32", batch=2, device="cpu", **cond)
    h = bench.harness(spec, "nested")
    ref = []

    def conv(m, inp, out):
        ref.append((2 * out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size), inp[0].requires_grad))

    def linear(m, inp, out):
        ref.append((2 * out.numel() * m.in_features, inp[0].requires_grad))

    for m in h["model"].modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
    # Every attention (the CPU's: fast_cpu.attention, the kernel or, on tiny maps, matmuls),
    # counted; the Linear layers that a CPU runs as 1x1 convolutions are Linear modules.
    def attention(q, k, v, mask=None):             # q K^T and (softmax) V: (B, heads, Nq, Nk)
        ref.append((2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1]), True))
        return K.attention(q, k, v, mask)

    for m in h["model"].modules():
        if isinstance(m, N.Attention):
            assert m.attend is K.attention
            m.attend = attention
    got = h["count_flops"]()
    assert len(ref) > 20                             # every layer was seen
    assert got == sum(3 * f if needs_grad else 2 * f for f, needs_grad in ref)
    # Model FLOPs: gradient checkpointing's recomputation is not counted; nor is anything
    # computed on the meta device (shapes only), where bench.py --count-flops counts.
    assert bench.harness({**spec, "grad_ckpt": True}, "nested")["count_flops"]() == got
    assert bench.harness({**spec, "device": "meta"}, "nested")["count_flops"]() == got


def test_comparison_table_reports_mean_and_spread_of_the_final_evaluations(tmp_path):
    import argparse
    rng = np.random.default_rng(0)
    plan = {"simple DM": None, "MDM (no PT)": None, "MDM (PT)": None}
    args = argparse.Namespace(data="fashion-mnist", seeds=[0, 1], res=[16, 32], config="CPU-tiny-S16S32")
    finals = {}
    for arm in plan:
        for seed in args.seeds:
            run = tmp_path / f"{E.slug(arm)}-seed{seed}"
            run.mkdir()
            rows = [{"step": s, "time": s / 3, "eval_fd_effnet": float(rng.uniform(10, 100)),
                     "eval_class_acc": float(rng.uniform())} for s in (200, 400, 600)]
            rows.insert(1, {"step": 300, "loss_32": 0.1})           # a training row: not an evaluation
            (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            finals.setdefault(arm, []).append(rows[-1])
    E.plot_comparison(tmp_path, plan, args)
    assert (tmp_path / "comparison.png").exists()
    lines = (tmp_path / "table.md").read_text().splitlines()
    for arm, line in zip(plan, lines[2:]):
        fd = [r["eval_fd_effnet"] for r in finals[arm]]
        acc = [r["eval_class_acc"] for r in finals[arm]]
        assert line.startswith(f"| {arm} |")
        assert f"{np.mean(fd):.3g} ({min(fd):.3g} to {max(fd):.3g})" in line
        assert f"{np.mean(acc):.3g} ({min(acc):.3g} to {max(acc):.3g})" in line


# ---------------------------------------------------------------------------------------
# The released models (release.py): their architecture, diffusion, text, and converting
# checkpoints of the authors' code (synthetic ones in their format: the real files are not here)
# ---------------------------------------------------------------------------------------


RELEASE_KEYS = dict(R.KEYS, emb_channels=32, lm_feature_projected_channels=32, text_channels=32)


def release_tiny(levels):
    """A tiny model of the released models' kind: 8x8 innermost UNet (attention at 4x4 and 2x2),
    then 16x16 (its SNR / 4, as the 256 px release) and 64x64 (SNR / 16 and / 256 as the
    1024 px release, which normalises the middle level's input)."""
    inner = R.ReleasedConfig(resolutions=[8, 4, 2], resolution_channels=[32, 32, 64], num_res_blocks=[1, 1, 1],
                             num_attn_layers_per_block=[0, 1, 2], num_heads=4, schedule="squaredcos_cap_v2",
                             **RELEASE_KEYS)
    if levels == 1:
        return inner
    mid = R.ReleasedConfig(resolutions=[32, 16, 8], resolution_channels=[32, 32, 32], num_res_blocks=[1, 1, 1],
                           num_attn_layers_per_block=[0, 0, 0],
                           schedule=f"squaredcos_cap_v2-shift{2 if levels == 2 else 4}",
                           inner_config=inner, normalize_input=levels == 3, **RELEASE_KEYS)
    if levels == 2:
        return mid
    return R.ReleasedConfig(resolutions=[128, 64, 32], resolution_channels=[32, 32, 32], num_res_blocks=[1, 1, 1],
                            num_attn_layers_per_block=[0, 0, 0], schedule="squaredcos_cap_v2-shift16",
                            inner_config=mid, **RELEASE_KEYS)


CONV_1X1 = (".qkv.weight", ".proj_out.weight", ".ffn.1.weight", ".ffn.3.weight")   # theirs: (out, in, 1, 1)


def official_state(config, seed=0):
    """A state dict in the released models' format for `config`: their key names and shapes
    (1x1 convs where we have Linear layers, a micro-conditioning MLP per level), random values."""
    g = torch.Generator().manual_seed(seed)
    model = R.ReleasedNestedUNet(config)
    state = {}
    for ours, theirs in R.official_names(model).items():
        shape = tuple(model.state_dict()[ours].shape) + ((1, 1) if theirs.endswith(CONV_1X1) else ())
        state[theirs] = torch.randn(shape, generator=g) * 0.1
    E = config.emb_channels
    for i in range(len(config.levels())):
        p = "inner_unet." * i
        for name, shape in (("0.weight", (E, E // 4)), ("0.bias", (E,)), ("1.weight", (E, E)), ("1.bias", (E,))):
            state[f"{p}cond_layers.scale.{name}"] = torch.randn(shape, generator=g) * 0.1
    return state


def save_official_checkpoint(path, state, config, channels=None, extra=None):
    """torch.save it as their trainer does: {"state_dict", "batch_num", "loss", numpy loss
    statistics, "args": an argparse.Namespace holding objects of their config classes}. The
    classes are stand-ins with their module names, gone from sys.modules once saved."""
    import argparse
    import dataclasses
    import enum
    import types
    from collections import OrderedDict
    names = ["ml_mdm", "ml_mdm.models", "ml_mdm.models.unet", "ml_mdm.samplers", "ml_mdm.diffusion"]
    mods = {n: types.ModuleType(n) for n in names}

    def stand_in(cls, module):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(mods[module], cls.__name__, cls)
        return cls

    @dataclasses.dataclass
    class UNetConfig:
        resolution_channels: list
        micro_conditioning: str
        inner_config: object = None

    @dataclasses.dataclass
    class SamplerConfig:
        schedule_type: object
        prediction_type: object
        schedule_shifted_power: int

    @dataclasses.dataclass
    class DiffusionConfig:
        sampler_config: object

    ScheduleType = enum.Enum("ScheduleType", {"COSINE": 0, "DEEPFLOYD": 3})
    PredictionType = enum.Enum("PredictionType", {"DDPM": 3, "V_PREDICTION": 5})
    stand_in(UNetConfig, "ml_mdm.models.unet"), stand_in(DiffusionConfig, "ml_mdm.diffusion")
    for cls in (SamplerConfig, ScheduleType, PredictionType):
        stand_in(cls, "ml_mdm.samplers")
    unet = None
    for lvl in config.levels():                     # innermost first; theirs nests the other way
        unet = UNetConfig(resolution_channels=list(lvl.resolution_channels), inner_config=unet,
                          micro_conditioning=f"scale:{[64, 256, 1024][config.levels().index(lvl)]}")
    if channels is not None:
        unet.resolution_channels = channels
    args = argparse.Namespace(unet_config=unet, text_model="google/flan-t5-xl", diffusion_config=DiffusionConfig(
        SamplerConfig(ScheduleType.DEEPFLOYD, PredictionType.V_PREDICTION, 1 if len(config.levels()) == 2 else 2)))
    sys.modules.update(mods)
    try:
        torch.save({"state_dict": OrderedDict(state), "batch_num": 5, "loss": 0.25, "best_avg_loss": np.float64(0.2),
                    "args": args, **(extra or {})}, path)
    finally:
        for n in names:
            sys.modules.pop(n)


def test_release_presets_have_the_official_parameter_counts_on_meta_device():
    """The authors' models have 461,359,107, 476,613,958 and 480,970,057 parameters; ours hold
    all but their micro-conditioning MLPs (one per level, sinusoid(E/4) -> E -> E: E/4*E + E +
    E*E + E = 1,312,768 for E = 1024), which are constant when sampling and fold into a bias."""
    micro = 256 * 1024 + 1024 + 1024 * 1024 + 1024
    for name, official, levels in (("MDM-flickr64", 461_359_107, 1), ("MDM-flickr256", 476_613_958, 2),
                                   ("MDM-flickr1024", 480_970_057, 3)):
        with torch.device("meta"):
            model = R.ReleasedNestedUNet(R.preset(name))
        assert sum_params(model) == official - levels * micro, name
        assert len(model.levels()) == levels and model.resolutions[-1] == [64, 256, 1024][levels - 1]
    assert R.preset("MDM-flickr256").truncated(64).to_dict() == R.preset("MDM-flickr64").to_dict()   # grow-able


def test_release_architecture_keys_against_independent_computations():
    """Each key of the released models' architecture, against a computation written here."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 8, 8, generator=g)
    # strided_downsample: a stride-2 3x3 conv, not average pooling then a 3x3 conv
    down = randomize(R.StridedDownsample(32, 2))
    torch.testing.assert_close(down(x), F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1))
    # separate_cross_attention, mask_cross_attention, attention_ffn="groupnorm": written out in float64
    tokens, mask = torch.randn(2, 5, 16, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    for separate, masked, ffn in ((True, False, "groupnorm"), (False, True, "layernorm")):    # theirs, ours
        att = randomize((R.ReleasedAttentionBlock if separate else N.AttentionBlock)(32, 4, 16), seed=1).double()
        got = att(x.double(), None, tokens.double(), mask)
        h = F.group_norm(x.double(), 32, att.norm.weight, att.norm.bias).flatten(2)          # (B, C, N)
        q, k, v = (F.conv1d(h, w[:, :, None], b) for w, b in zip(att.qkv.weight.chunk(3), att.qkv.bias.chunk(3)))
        kv = F.linear(F.layer_norm(tokens.double(), (16,), att.norm_cond.weight, att.norm_cond.bias),
                      att.kv_cond.weight, att.kv_cond.bias)                                  # (B, L, 2C)
        kt, vt = kv[..., :32].transpose(1, 2), kv[..., 32:].transpose(1, 2)                  # (B, C, L)
        heads = lambda a: a.unflatten(1, (4, 8))                                             # (B, 4, 8, N)
        q, k, v, kt, vt = map(heads, (q, k, v, kt, vt))
        logits, logits_t = (torch.einsum("bhcn,bhcm->bhnm", q, kk) / math.sqrt(8) for kk in (k, kt))
        if masked:
            logits_t = logits_t.masked_fill(~mask[:, None, None, :], -math.inf)
        if separate:
            out = torch.einsum("bhnm,bhcm->bhcn", logits.softmax(-1), v) + \
                torch.einsum("bhnm,bhcm->bhcn", logits_t.softmax(-1), vt)
        else:
            w = torch.cat([logits, logits_t], -1).softmax(-1)
            out = torch.einsum("bhnm,bhcm->bhcn", w, torch.cat([v, vt], -1))
        y = x.double().flatten(2) + F.conv1d(out.flatten(1, 2), att.proj_out.weight[:, :, None], att.proj_out.bias)
        if ffn == "groupnorm":
            y3 = F.group_norm(y, 32, att.ffn[0].weight, att.ffn[0].bias)
            y = y + F.conv1d(F.gelu(F.conv1d(y3, att.ffn[1].weight[:, :, None], att.ffn[1].bias)),
                             att.ffn[3].weight[:, :, None], att.ffn[3].bias)
        elif ffn == "layernorm":
            y = y + att.ffn(y.transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(got, y.view(2, 32, 8, 8), rtol=1e-9, atol=1e-9)
    # timestep_features="sin,cos", timestep_offset=1: sin then cos of the integer step k - 1
    t = torch.tensor([1.0, 0.5, 0.001], dtype=torch.float64)
    freqs = np.exp(-np.log(10000) * np.arange(4) / 4).astype(np.float32).astype(np.float64)
    arg = np.array([999, 499, 0])[:, None] * freqs
    torch.testing.assert_close(R.timestep_embedding(t, 8, torch.float64),
                               torch.from_numpy(np.concatenate([np.sin(arg), np.cos(arg)], 1)), rtol=0, atol=2e-5)
    # level_time_embedding, text_pool_bias, normalize_input: a whole model against a second code path
    torch.manual_seed(0)
    model = randomize(R.ReleasedNestedUNet(release_tiny(3)), std=0.05).eval()
    assert all(hasattr(lvl, "time_mlp") for lvl in model.levels())
    assert not hasattr(model.innermost.cond_embed, "time_mlp")
    assert model.innermost.cond_embed.text_pool.bias is None
    z = [torch.randn(s) for s in model.input_shapes(2)]
    tt, text = torch.tensor([0.3, 0.9]), torch.randn(2, 4, 32)
    out = model(z, tt, text=text)
    mid = model.levels()[1]
    scaled = [z[0], z[1] / z[1].std(dim=(1, 2, 3), keepdim=True), z[2]]     # the middle level's input normalised
    mid.config.normalize_input = False
    with torch.no_grad():
        again = model(scaled, tt, text=text)
    mid.config.normalize_input = True
    for a, b in zip(out, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Each level's own time MLP: with the connections into the inner levels at zero (as grow()
    # starts them), a level's time MLP reaches its own output and those above it, never below.
    with torch.no_grad():
        for lvl in model.levels()[1:]:
            lvl.in_adapter.weight.zero_(), lvl.in_adapter.bias.zero_()
        for level in (2, 1):
            before = model(z, tt, text=text)
            model.levels()[level].time_mlp[2].bias += 1.0
            changed = [not torch.allclose(a, b) for a, b in zip(before, model(z, tt, text=text))]
            assert changed == [i >= level for i in range(3)], (level, changed)


def test_discrete_schedule_time_grid_and_thresholding_modes_against_formulas():
    """squaredcos_cap_v2 in numpy float64 (diffusers' definition), the released models' float32
    shift, their inference grid, and the thresholding modes."""
    f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    k = np.arange(1000)
    betas = np.concatenate([[0.0], np.minimum(1 - f((k + 1) / 1000) / f(k / 1000), 0.999)])
    abar = np.cumprod(1 - betas)
    abar32 = abar.astype(np.float32)
    t = torch.arange(1001, dtype=torch.float64) / 1000
    for shift in (1, 2, 4, 16):
        if shift == 1:
            ref = abar32.astype(np.float64)
        else:                                      # SNR / shift^2, computed in float32 as they did
            with np.errstate(divide="ignore"):     # step 0: alpha_bar = 1, SNR infinite
                snr = abar32 / (1 - abar32)
            ref = (1 / (1 + 1 / (snr / np.float32(shift ** 2)))).astype(np.float64)
        got = torch.sigmoid(R.discrete_logsnr(t, shift)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert abar32[1000] == pytest.approx(2.4287e-9, rel=1e-3) and betas.max() == 0.999   # the cap binds
    d = R.ReleasedDiffusion([8, 16], ["squaredcos_cap_v2", "squaredcos_cap_v2-shift2"])
    # Their grid: round(i * 1001 / (N + 1)), i = N .. 0 (numpy's round, half to even)
    assert (d.time_grid(50) * 1000).round().long()[:4].tolist() == [981, 962, 942, 922]
    assert (d.time_grid(50) * 1000).round().long()[-3:].tolist() == [39, 20, 0]
    assert (d.time_grid(250) * 1000).round().long()[:3].tolist() == [997, 993, 989]
    u = torch.tensor([1e-9, 0.0005, 0.0015, 0.999, 1.0])
    assert (d.training_times(u) * 1000).round().long().tolist() == [1, 1, 2, 999, 1000]
    scales = torch.tensor([0.3, 0.6, 4.0])[:, None, None, None]
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * scales
    for mode, q, hi in (("deepfloyd", 95, 1.5), ("imagen", 99.5, np.inf)):
        got = D.threshold(x, mode).numpy()
        for i in range(3):
            s = np.clip(np.percentile(np.abs(x[i].numpy()), q), 1, hi)
            np.testing.assert_allclose(got[i], np.clip(x[i].numpy(), -s, s) / s, rtol=1e-5, atol=1e-6)
    assert torch.equal(D.threshold(x, "clip"), x.clamp(-1, 1)) and torch.equal(D.threshold(x, "none"), x)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_reproduces_the_exact_gaussian_chain(eta):
    """DDIM with eta: z_s = alpha_s x + sqrt(sigma_s^2 - v) eps + sqrt(v) n, v = eta^2 times the
    posterior variance (eta = 1: DDPM's distribution), on the Gaussian oracle at every level."""
    resolutions, shifts = [4, 8, 16], [1, 2, 4]
    oracle = GaussianOracle(0.2, 0.5, resolutions, shifts)
    d = MatryoshkaDiffusion(resolutions, ["cosine", "cosine-shift2", "cosine-shift4"])
    out = d.sample(oracle, batch_size=128, sampler="ddim", eta=eta, num_inference_steps=20,
                   generator=torch.Generator().manual_seed(0), thresholding="none", dtype=torch.float64)
    for o, tau, s in zip(out, oracle.taus, shifts):
        m, V = 0.0, 1.0
        ts = np.linspace(1, 0, 21)
        for i in range(20):
            (at, st), (a_, s_) = ref_alpha_sigma(ts[i], s), ref_alpha_sigma(ts[i + 1], s)
            k = at * tau ** 2 / (at ** 2 * tau ** 2 + st ** 2)
            c0 = 0.2 * (1 - k * at)
            if i == 19:
                m, V = k * m + c0, k ** 2 * V
                break
            var = eta ** 2 * (1 - (at / st) ** 2 / (a_ / s_) ** 2) * s_ ** 2
            r = np.sqrt(s_ ** 2 - var) / st
            A, b = a_ * k + r * (1 - at * k), a_ * c0 - r * at * c0
            m, V = A * m + b, A ** 2 * V + var
        assert o.mean().item() == pytest.approx(m, abs=0.01 * tau)
        assert o.std().item() == pytest.approx(math.sqrt(V), rel=0.01)
    if eta == 1.0:                                 # and eta = 1 is DDPM's chain
        assert gaussian_levels_off(out, "ddpm", 20, oracle, shifts) == []


def test_mdm_tokenization_of_the_released_models():
    """The released code's tokenisation: a leading space, the least-cost split into pieces,
    unknown characters dropped, the end id 1. Hand-computed on a tiny vocabulary; and the
    released code's own ids on its vocabulary (the T5 one) where that file is at hand."""
    costs = {"<pad>": 0, "</s>": 0, "<unk>": 0, " ": 2.0, "a": 5, "b": 5, "d": 5, " a": 3.0, " b": 4.0,
             " pan": 5.5, "da": 4.5, " panda": 6.0, "n": 5, "p": 5, " p": 4.5}
    pieces = {p: (i, c) for i, (p, c) in enumerate(costs.items())}
    ids = {p: i for p, (i, _) in pieces.items()}
    assert R.mdm_token_ids("a panda", pieces) == [ids[" a"], ids[" panda"], 1]       # 3 + 6 < 3 + 5.5 + 4.5
    assert R.mdm_token_ids("", pieces) == [ids[" "], 1]                              # the lone space: [3, 1] in T5
    assert R.mdm_token_ids("a  b", pieces) == [ids[" a"], ids[" "], ids[" b"], 1]     # a repeated space is a piece
    assert R.mdm_token_ids("aé b", pieces) == [ids[" a"], ids[" b"], 1]               # é: no piece, dropped
    assert R.mdm_token_ids("a b a b", pieces, max_length=3) == [ids[" a"], ids[" b"], ids[" a"]]   # end id cut
    vocab = Path("/work/shared/official/t5.vocab")
    if not vocab.exists():
        pytest.skip("the released code's T5 vocabulary (t5.vocab) is not on this machine")
    t5 = {}
    for i, line in enumerate(vocab.read_text(encoding="utf-8").splitlines()):
        piece, score = line.split("\t")
        t5[piece.replace("\u2581", " ")] = (i, -float(score))
    facts = {"": [3, 1], "a panda playing guitar": [3, 9, 2131, 26, 9, 1556, 5507, 1], "a chair": [3, 9, 3533, 1],
             " leading space": [3, 1374, 628, 1], "trailing space ": [5032, 53, 628, 3, 1],
             "A  Panda,  playing {guitar}! ": [71, 3, 28248, 6, 3, 1556, 3, 7938, 2046, 55, 3, 1],
             "hello</s>world": [21820, 1, 7276, 1], "café naïve ｆｕｌｌ": [11949, 3, 29, 9, 162, 3, 1]}
    for text, want in facts.items():
        assert R.mdm_token_ids(text, t5) == want, text


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A tiny T5 encoder (32 wide, random) with a SentencePiece-style unigram vocabulary, saved
    as a local folder: the FLAN-T5 XL of the released models, in small."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast
    folder = tmp_path_factory.mktemp("t5")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -5.0) for c in letters] + \
        [("\u2581" + c, -4.0) for c in letters] + [("\u2581" + w, -6.0) for w in ("red", "blue", "square", "panda")]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                    extra_ids=0).save_pretrained(folder)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            decoder_start_token_id=0)).save_pretrained(folder)
    return folder


def test_text_encoder_tokenizes_as_the_released_code_from_the_t5_tokenizers_vocabulary(tiny_t5):
    enc = P.text_encoder(str(tiny_t5), tokenization="ml-mdm")
    ids, mask = enc.tokenize(["a red square", "", "red  x"])
    pieces = enc.tokenizer.convert_ids_to_tokens
    assert pieces(ids[0, :4].tolist()) == ["\u2581a", "\u2581red", "\u2581square", "</s>"]
    assert pieces(ids[1, :2].tolist()) == ["\u2581", "</s>"] and mask[1].tolist() == [True, True, False, False]
    assert pieces(ids[2, :4].tolist()) == ["\u2581red", "\u2581", "\u2581x", "</s>"]
    feats, fmask = enc(["a red square", ""])
    assert torch.equal(fmask, mask[:2, :4]) and feats[1, 2:].abs().sum() == 0         # padding: no feature


def release_run(tmp_path, tiny_t5, levels=1, seed=0):
    """A synthetic checkpoint in the released models' format, converted into a run folder."""
    cfg = release_tiny(levels)
    state = official_state(cfg, seed)
    path = tmp_path / f"vis_model_{levels}.pth"
    save_official_checkpoint(path, state, cfg)
    out = R.convert_file(path, tmp_path / f"converted{levels}", config=cfg, text_encoder=str(tiny_t5))
    return out, state, cfg


def test_a_checkpoint_in_the_released_format_converts_strictly_and_samples(tmp_path, tiny_t5):
    out, state, cfg = release_run(tmp_path, tiny_t5, levels=2)
    model, meta = P.load_weights(out / "ema.safetensors")
    assert meta["release"] == "flickr256" and meta["text_tokenization"] == "ml-mdm"
    assert meta["sampling"] == {"sampler": "ddim", "num_inference_steps": 100, "eta": 0.0, "guidance_scale": 7.5}
    # Every tensor is theirs, reshaped; the time MLPs' last bias holds the folded
    # micro-conditioning: bias + W1 silu(W0 s(scale) + b0) + b1, s: sin then cos of the raw scale.
    ours = model.state_dict()
    for key, theirs in R.official_names(model).items():
        if not key.endswith("time_mlp.2.bias"):
            assert torch.equal(ours[key], state[theirs].reshape(ours[key].shape)), key
    for prefix, lvl, scale in (("", model, 256.0), ("inner_unet.", model.inner, 64.0)):
        m = {k: state[f"{prefix}cond_layers.scale.{k}"].double().numpy()
             for k in ("0.weight", "0.bias", "1.weight", "1.bias")}
        freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
        s_ = np.concatenate([np.sin(scale * freqs), np.cos(scale * freqs)])
        h = m["0.weight"] @ s_ + m["0.bias"]
        want = (state[f"{prefix}temb_layer2.bias"].double().numpy()
                + m["1.weight"] @ (h / (1 + np.exp(-h))) + m["1.bias"])
        np.testing.assert_allclose(lvl.time_mlp[2].bias.detach().double().numpy(), want, rtol=1e-4, atol=1e-5)
    # sample.py reads it, with the run's own settings (its DDIM, guidance against the empty prompt)
    p = run_sample("--ckpt", str(out), "a red square", "--num-images", "2", "--num-inference-steps", "3",
                   "--out", str(tmp_path / "img"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert Image.open(tmp_path / "img.png").size[0] > 0
    # What does not fit is said in one line: a missing, an extra, a reshaped tensor; stored
    # arguments of another model; a file that is not a checkpoint.
    broken = {"missing": {k: v for k, v in state.items() if k != "inner_unet.conv_out.weight"},
              "extra": {**state, "inner_unet.surplus.weight": torch.zeros(3)},
              "shape": {**state, "conv_in.weight": torch.zeros(5, 3, 3, 3)},
              "transposed": {**state, "temb_layer1.weight": state["temb_layer1.weight"].T}}   # as many values
    for name, bad in broken.items():
        save_official_checkpoint(tmp_path / f"{name}.pth", bad, cfg)
        with pytest.raises(ValueError, match="does not fit") as e:
            R.convert_file(tmp_path / f"{name}.pth", tmp_path / name, config=cfg)
        if name == "transposed":
            assert "temb_layer1.weight has shape (8, 32), ours (32, 8)" in str(e.value)
    save_official_checkpoint(tmp_path / "other.pth", state, cfg, channels=[64, 64, 64])
    with pytest.raises(ValueError, match="resolution_channels"):
        R.convert_file(tmp_path / "other.pth", tmp_path / "other", config=cfg)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    for args in ([str(tmp_path / "notes.pth"), "--out", str(tmp_path / "x")],
                 [str(tmp_path / "other.pth"), "--out", str(tmp_path / "y")]):
        p = subprocess.run([sys.executable, "-m", "tools.release", *args], cwd=HERE, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert p.stderr.count(args[0]) == 1, p.stderr                      # the file named once


def test_reading_a_released_checkpoint_runs_no_code_from_it(tmp_path):
    """Every object the file names besides tensors becomes an inert stand-in (the stored
    arguments: their config classes, argparse.Namespace, numpy scalars); torch's weights_only
    reader still refuses what no stand-in may be: a module it blocks (os.system), a call of
    what another call returned. Nothing runs, and the file is refused in one message."""
    cfg = release_tiny(1)
    marker = tmp_path / "code-ran"

    class Shell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class Method:
        def __reduce__(self):
            return (Path.touch, (marker,))                  # pickled as getattr(Path, "touch")(marker)
    save_official_checkpoint(tmp_path / "plain.pth", official_state(cfg), cfg)
    state, args = R.read_checkpoint(tmp_path / "plain.pth")
    assert len(state) == len(official_state(cfg)) and args["unet_config"]["resolution_channels"] == [32, 32, 64]
    assert args["diffusion_config"]["sampler_config"]["schedule_type"] == {"__class__": "ml_mdm.samplers.ScheduleType",
                                                                           "__args__": [3]}
    for name, payload in (("shell", Shell()), ("method", Method())):
        save_official_checkpoint(tmp_path / f"{name}.pth", official_state(cfg), cfg, extra={"hook": payload})
        with pytest.raises(ValueError, match="refused") as e:
            R.read_checkpoint(tmp_path / f"{name}.pth")
        assert "not a checkpoint of the released models" in str(e.value) and "weights_only" not in str(e.value)
        if name == "shell":                                 # the refused global named, no advice to unpickle
            assert "posix.system" in str(e.value) or "os.system" in str(e.value), e.value
    assert not marker.exists()


def test_finetune_and_grow_a_converted_model_resume_exactly(tmp_path, tiny_t5):
    """train.py --init-from a converted model: fine-tuning starts from its weights; growing
    (--res 8,32 on a two-level config) starts stage 1 with them and adds the new level; both
    resume bit for bit, with the release's tokenisation, null text (the empty prompt) and
    sampling settings carried into the new run."""
    out, _, cfg1 = release_run(tmp_path, tiny_t5, levels=1)
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, (name, colour) in enumerate([("a red square", (220, 20, 20)), ("a blue square", (20, 20, 220))] * 4):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": n})
                                                     for i, n in enumerate(["a red square", "a blue square"] * 4)))
    cfg2 = tmp_path / "grown.json"
    cfg2.write_text(json.dumps(release_tiny(2).to_dict()))
    common = ["--data", str(folder), "--init-from", str(out), "--cond-drop", "0.5", "--lr", "1e-3"]
    plans = {"finetune": ["--config", "MDM-flickr64", "--res", "8", "--steps", "4", "--batch", "4"],
             "grow": ["--config", str(cfg2), "--res", "8,32", "--steps", "2,3", "--batch", "4,4"]}
    plans["finetune"][1] = str(tmp_path / "one.json")
    (tmp_path / "one.json").write_text(json.dumps(cfg1.to_dict()))
    for name, plan in plans.items():
        run_train(tmp_path, *plan, *common, "--name", f"{name}-straight")
        run_train(tmp_path, *plan, *common, "--name", f"{name}-stopped", "--stop-after", "3")
        run_train(tmp_path, "--resume", str(tmp_path / f"{name}-stopped"))
        a, b = load_ckpt(tmp_path / f"{name}-straight"), load_ckpt(tmp_path / f"{name}-stopped")
        for part in ("model", "ema"):
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), (name, part, key)
        meta = files.read_metadata(tmp_path / f"{name}-straight" / "ema.safetensors")
        assert meta["text_tokenization"] == "ml-mdm" and meta["sampling"]["guidance_scale"] == 7.5
    # The grown run's first stage began as the converted model, exactly.
    run_train(tmp_path, *plans["grow"], *common, "--name", "grow-start", "--lr", "1e-30", "--stop-after", "1")
    start = load_ckpt(tmp_path / "grow-start")["model"]
    converted = P.load_weights(out / "ema.safetensors")[0].state_dict()
    for key, value in converted.items():
        torch.testing.assert_close(start[key], value, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Real training runs: extending, restarting, history, prompts, TensorBoard, precision, data
# ---------------------------------------------------------------------------------------

def test_a_resumed_run_extends_and_refuses_what_cannot_change(tmp_path):
    """--resume with longer stages, or a stage more, continues the run (and logs what changed);
    --resume auto starts a run that has no checkpoint and resumes one that has; reusing a
    --name without --resume is refused; a config or data change on resume is refused."""
    common = ["--res", "4", "--steps", "3", "--batch", "8"]
    run_train(tmp_path, *common, "--name", "r", "--resume", "auto")                      # starts it
    assert load_ckpt(tmp_path / "r")["step"] == 3
    p = run_train(tmp_path, *common, "--name", "r", check=False)                         # no silent overwrite
    assert p.returncode != 0 and "holds a run already" in p.stderr and "--resume" in p.stderr
    run_train(tmp_path, *common, "--name", "r", "--resume", "auto")                      # the same command: resumes
    assert load_ckpt(tmp_path / "r")["step"] == 3                                        # (finished: nothing to do)
    run_train(tmp_path, "--resume", str(tmp_path / "r"), "--steps", "5", "--lr", "2e-4")  # longer
    ck = load_ckpt(tmp_path / "r")
    assert ck["step"] == 5 and ck["args"]["lr"] == 2e-4 and ck["args"]["steps"] == [5]
    run_train(tmp_path, "--resume", str(tmp_path / "r"), "--res", "4,8", "--steps", "5,2", "--batch", "8,8",
              "--lr", "2e-4")
    ck = load_ckpt(tmp_path / "r")                                                       # a stage more: grown
    assert (ck["step"], ck["stage"]) == (7, 1) and len(ck["meta"]["model_config"]["resolutions"]) == 2
    rows = [json.loads(r) for r in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss_4" in r] == [1, 2, 3, 4, 5, 6, 7]           # no gap, no repeat
    changed = [r["resumed_with"] for r in rows if "resumed_with" in r]
    assert changed == [{"lr": [1e-4, 2e-4], "steps": [[3], [5]]},
                       {"batch": [[8], [8, 8]], "res": ["4", "4,8"], "steps": [[5], [5, 2]]}]
    for args, message in ((["--data", "emoji"], "a run keeps its --data fashion-mnist"),
                          (["--steps", "5,1", "--res", "4,8", "--batch", "8,8"], "stage 2 has taken 2 steps"),
                          (["--steps", "2,2", "--res", "4,8", "--batch", "8,8"], "has finished its first 1 stage"),
                          (["--res", "8"], "stages may only be added")):
        p = run_train(tmp_path, "--resume", str(tmp_path / "r"), *args, check=False)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-1500:]


def test_checkpoint_history_prompts_and_tensorboard(tmp_path):
    """checkpoints/ keeps the last --keep-checkpoints and every stage's last (checkpoint.pt is
    the latest, the same file); the grids draw --sample-prompts; TensorBoard gets the losses,
    learning rate, speed and the grids, while log.jsonl stays the record."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_train(tmp_path, "--res", "4,8", "--steps", "4,5", "--batch", "8,8", "--ckpt-every", "1", "--keep-checkpoints",
              "2", "--name", "h", "--sample-prompts", "bag|sandal|3", "--sample-every", "3", "--sample-steps", "2",
              "--tensorboard", samples=True)
    kept = sorted(f.name for f in (tmp_path / "h" / "checkpoints").glob("*.pt"))
    # each stage's last (4, 9), and the last two others
    assert kept == ["step0000004.pt", "step0000007.pt", "step0000008.pt", "step0000009.pt"]
    assert os.path.samefile(tmp_path / "h" / "checkpoint.pt", tmp_path / "h" / "checkpoints" / "step0000009.pt")
    old = torch.load(tmp_path / "h" / "checkpoints" / "step0000004.pt", weights_only=True)
    assert (old["step"], old["stage"]) == (4, 1)                  # resumable from there: --resume <that file>
    ea = EventAccumulator(str(tmp_path / "h" / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()
    assert {"loss/loss_4", "loss/loss_8", "train/lr", "train/images_per_s"} <= set(tags["scalars"])
    rows = [json.loads(r) for r in (tmp_path / "h" / "log.jsonl").read_text().splitlines() if "loss_8" in r]
    assert [e.value for e in ea.Scalars("loss/loss_8")] == pytest.approx([r["loss_8"] for r in rows])
    assert tags["images"] == ["samples"] and len(ea.Images("samples")) >= 2
    assert Image.open(tmp_path / "h" / "samples" / "step0000003.png").size[0] == 56 + 3 * 98   # 3 columns: the prompts
    p = run_train(tmp_path, "--res", "4", "--steps", "1", "--batch", "8", "--name", "bad", "--sample-prompts",
                  "spaceship", check=False, samples=True)
    assert p.returncode != 0 and "not a class of this data set" in p.stderr and "Traceback" not in p.stderr


def test_fp16_trains_with_a_gradient_scaler_and_resumes_exactly(tmp_path):
    """--precision fp16 (for GPUs without bf16) autocasts to float16 and scales the loss; here
    on the CPU's autocast. The scaler's state is part of the checkpoint: a resumed run ends
    with the weights of an uninterrupted one."""
    args = ["--res", "4,8", "--steps", "3,3", "--batch", "8,8", "--precision", "fp16"]
    p = run_train(tmp_path, *args, "--name", "straight")
    assert "precision: fp16" in p.stdout
    run_train(tmp_path, *args, "--name", "stopped", "--stop-after", "4")
    assert load_ckpt(tmp_path / "stopped")["scaler"]["scale"] > 0
    run_train(tmp_path, "--resume", str(tmp_path / "stopped"))
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "stopped")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["scaler"] == b["scaler"]
    assert devices.resolve_precision("auto", "cpu") == "fp32"


def test_grey_data_trains_and_samples_in_one_channel(tmp_path):
    """Fashion-MNIST is grey: the model has one input channel, and its samples are grey (in
    RGB the model would have to learn that three channels are equal: tinted backgrounds)."""
    run_train(tmp_path, "--res", "4,8", "--steps", "2,2", "--batch", "8,8", "--name", "grey")
    model, meta = P.load_weights(tmp_path / "grey" / "ema.safetensors")
    assert model.config.in_channels == 1 and model.input_shapes(2)[-1] == (2, 1, 8, 8)
    assert data.load_fashion_mnist(8)[0]["image"].shape == (1, 8, 8)
    p = run_sample("--ckpt", str(tmp_path / "grey"), "--label", "bag", "--num-images", "2",
                   "--num-inference-steps", "3", "--out", str(tmp_path / "g"))
    assert p.returncode == 0, p.stderr[-2000:]
    a = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all() and a.std() > 0


def test_random_horizontal_flips_are_per_sample_and_exact():
    """--hflip mirrors about half of the images, each decided by its own per-sample draw (the
    same in any batch), and leaves the others and every other random number as they were."""
    import argparse
    import train
    B, g = 200, torch.Generator().manual_seed(0)
    model = NestedUNet(tiny_levels(2, num_classes=10))
    batch = {"image": torch.rand(B, 3, 8, 8, generator=g) * 2 - 1, "index": torch.arange(B),
             "label": torch.randint(10, (B,), generator=g)}
    opts = dict(cond_drop=0.0, high_res_fraction=1.0, seed=3, streaming=False, channels_last=False)
    plain = train.prepare_batch(batch, model, None, "label", 4, argparse.Namespace(**opts, hflip=False), "cpu")
    flipped = train.prepare_batch(batch, model, None, "label", 4, argparse.Namespace(**opts, hflip=True), "cpu")
    mirrored = torch.tensor([torch.equal(f, p.flip(-1)) for f, p in zip(flipped[0], plain[0])])
    same = torch.tensor([torch.equal(f, p) for f, p in zip(flipped[0], plain[0])])
    assert torch.equal(mirrored | same, torch.ones(B, dtype=torch.bool)) and 0.35 < mirrored.float().mean() < 0.65
    assert torch.equal(mirrored, train.flip_draws(torch.arange(B), 4, 3) < 0.5)
    for a, b in zip(plain[1:3], flipped[1:3]):     # times and noises: untouched by the flips
        a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def webdataset_shards(folder, shards=2, per_shard=6):
    """A folder of WebDataset .tar shards: per sample a .png and a .txt caption."""
    import io
    import tarfile
    folder.mkdir()
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tf:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.new("RGB", (12, 12), (40 * i, 100, 120 * shard)).save(buf, format="PNG")
                for name, payload in ((f"{shard:02d}{i:04d}.png", buf.getvalue()),
                                      (f"{shard:02d}{i:04d}.txt", f"colour {i} of shard {shard}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return folder


def test_webdataset_shards_train_and_streams_decode_in_workers_and_resume_exactly(tmp_path):
    """A folder of WebDataset .tar shards is a data set (columns png/jpg and txt found by
    themselves); streamed, each rank reads its own shards and its loader workers decode
    (2 workers, 2 shards), and a stopped run resumes where an uninterrupted one goes."""
    shards = webdataset_shards(tmp_path / "shards")
    ds = data.HFImageDataset(str(shards), 8)
    assert len(ds) == 12 and ds.caption_column == "txt" and ds[0]["image"].shape == (3, 8, 8)
    run_train(tmp_path, "--res", "8", "--steps", "2", "--batch", "4", "--data", str(shards), "--name", "map")
    assert load_ckpt(tmp_path / "map")["meta"]["cond"] == "text"
    args = ["--res", "8", "--steps", "5", "--batch", "4", "--data", str(shards), "--streaming", "--workers", "2"]
    run_train(tmp_path, *args, "--name", "straight")
    run_train(tmp_path, *args, "--name", "stopped", "--stop-after", "3")
    run_train(tmp_path, "--resume", str(tmp_path / "stopped"), "--workers", "2")
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "stopped")
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # the workers' items: unique keys, every one of the 12 images once per epoch
    batches = data.Batches(data.HFStream(str(shards), 8), 2, workers=2)
    keys = [k for _ in range(6) for k in next(batches)["index"].tolist()]
    assert len(set(keys)) == 12 and batches.state() == {"epoch": 0, "pos": 12}


def dpm_chain_reference(steps, tau, shift, lo=-15.0, hi=15.0):
    """DPM-Solver++(2M) on Gaussian data (mean 0), written out as a scalar recursion in float64
    (Lu et al. 2022, Algorithm 2, with lambda = logsnr / 2): the final samples are A z_1 for
    the initial noise z_1, returned as the last step's x-prediction. -> A."""
    lam = np.linspace(lo, hi, steps + 1) - 2 * np.log(shift)
    a, s = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
    A, x_prev, h_prev = 1.0, None, None
    for i in range(steps):
        x = a[i] * tau ** 2 / (a[i] ** 2 * tau ** 2 + s[i] ** 2) * A       # the posterior mean's slope
        if i == steps - 1:
            return x
        h = (lam[i + 1] - lam[i]) / 2
        D = x if x_prev is None else (1 + h / (2 * h_prev)) * x - h / (2 * h_prev) * x_prev
        A, x_prev, h_prev = s[i + 1] / s[i] * A - a[i + 1] * np.expm1(-h) * D, x, h


@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_follows_its_exact_chain_and_keeps_the_data_std_within_2_percent(steps):
    """DPM-Solver++(2M) in each level's own log-SNR, on a grid even in log-SNR: on the Gaussian
    oracle (mean 0) every level's samples are its exact chain's A times the initial noise,
    to float precision; and with 25 steps the chain keeps the data's std within 2% at every
    level (DDIM at 25 steps loses 18%; a grid even in t, 10%)."""
    resolutions, shifts = [4, 8, 16], [1, 2, 4]
    oracle = GaussianOracle(0.0, 0.5, resolutions, shifts)
    d = MatryoshkaDiffusion(resolutions, ["cosine", "cosine-shift2", "cosine-shift4"])
    out = d.sample(oracle, batch_size=16, sampler="dpm++2m", num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(0), thresholding="none", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)                           # the sampler's initial noise
    z1 = [torch.randn(s, generator=g, dtype=torch.float64) for s in oracle.input_shapes(16)]
    assert oracle.calls == steps
    for o, z, tau, s in zip(out, z1, oracle.taus, shifts):
        A = dpm_chain_reference(steps, tau, s)
        torch.testing.assert_close(o, A * z, rtol=1e-6, atol=1e-7)
        if steps == 25:
            assert abs(A / tau - 1) < 0.02, (A / tau - 1)
    assert d.time_grid(25, "dpm++2m")[0] == 1 and d.time_grid(25, "dpm++2m")[-1] == 0
    lam = d.logsnr(d.time_grid(25, "dpm++2m")[1:-1], 0)            # evenly spaced in log-SNR
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((23,), 30 / 25, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# What only a nested model can do: known levels (super-resolution), masks (inpainting),
# image-to-image, a guidance scale per level, a precision whose range is kept
# ---------------------------------------------------------------------------------------

class SpyOracle(GaussianOracle):
    """The Gaussian oracle, which also keeps every z it is given."""
    def forward(self, zs, t, **cond):
        self.seen = getattr(self, "seen", []) + [[z.clone() for z in zs]]
        return super().forward(zs, t, **cond)


class NotPutBack(MatryoshkaDiffusion):
    """A broken sampler: the known pixels are only put in at the end, never during sampling."""
    def put_back(self, zs, known, t, generator):
        return super().put_back(zs, known, t, generator) if t is None else list(zs)


class OtherLevelsSchedule(MatryoshkaDiffusion):
    """A broken sampler: the known pixels are noised with the next level's schedule."""
    def noised(self, x, t, level, eps, since=None):
        return super().noised(x, t, min(level + 1, len(self.resolutions) - 1), eps, since)


class MaskIgnored(MatryoshkaDiffusion):
    """A broken sampler: every pixel of a level with a mask is put back."""
    def put_back(self, zs, known, t, generator):
        return super().put_back(zs, [k and (k[0], None) for k in known], t, generator)


def known_pixels_off(seen, known, d, steps, shifts):
    """Whether the known pixels the model saw at every step follow Eq. 2's marginal at that
    step's time with their own level's schedule: (z - alpha x) / sigma must be standard normal
    there (mean within 0.05, std within 5%, over 64 samples of 768 values). -> True if not."""
    ts = np.linspace(1, 0, steps + 1)
    for i, zs in enumerate(seen):
        for level, (z, k) in enumerate(zip(zs, known)):
            if k is None:
                continue
            x, keep = k
            a, s = ref_alpha_sigma(ts[i], shifts[level])
            res = ((z - a * x) / s)[keep.expand_as(z) > 0.5] if keep is not None else (z - a * x) / s
            if abs(res.mean().item()) > 0.05 or abs(res.std().item() - 1) > 0.05:
                return True
    return False


def test_known_levels_are_put_back_at_their_own_noise_level_and_kept_exactly():
    """Super-resolution (a lower level known) and inpainting (a mask at every level) on the
    Gaussian oracle: at every step the model sees the known pixels noised by their level's own
    schedule to that step's time, the result holds them exactly, and the rest is drawn.
    Mutants: not put back, put back with another level's schedule, the mask ignored: each fails."""
    resolutions, shifts = [4, 8, 16], [1, 2, 4]
    schedules = ["cosine", "cosine-shift2", "cosine-shift4"]
    g = torch.Generator().manual_seed(5)
    shapes = GaussianOracle(0.2, 0.5, resolutions, shifts).input_shapes(64)
    x0 = 0.8 + 0.3 * torch.randn(shapes[0], generator=g, dtype=torch.float64)      # far from the oracle's data
    right = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    right[..., 8:] = 1                                                               # the half to draw
    keeps = [1 - torch.nn.functional.max_pool2d(right, 16 // r) for r in resolutions]
    xs = [0.8 + 0.3 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    plans = {"upscale": [(x0, None), None, None], "inpaint": [(x, k) for x, k in zip(xs, keeps)]}

    def run(cls, known, resample=0):
        oracle = SpyOracle(0.2, 0.5, resolutions, shifts)
        out = cls(resolutions, schedules).sample(oracle, batch_size=64, sampler="ddim", num_inference_steps=20,
                                                 generator=torch.Generator().manual_seed(0), thresholding="none",
                                                 dtype=torch.float64, known=known, resample=resample)
        return out, oracle.seen

    for name, known in plans.items():
        out, seen = run(MatryoshkaDiffusion, known)
        assert len(seen) == 20 and not known_pixels_off(seen, known, None, 20, shifts), name
        for o, k in zip(out, known):
            if k is not None:
                x, keep = k
                kept = torch.ones_like(x, dtype=torch.bool) if keep is None else keep.expand_as(x) > 0.5
                assert torch.equal(o[kept], x[kept]), name                       # exactly the given pixels
                assert keep is None or (o[~kept] - x[~kept]).abs().mean() > 0.1, name    # the rest drawn
        assert known_pixels_off(run(NotPutBack, known)[1], known, None, 20, shifts), name
        assert known_pixels_off(run(OtherLevelsSchedule, known)[1], known, None, 20, shifts), name
    out, _ = run(MaskIgnored, plans["inpaint"])
    assert all(torch.equal(o, x) for o, (x, _) in zip(out, plans["inpaint"]))   # nothing drawn: the mask matters
    out, seen = run(MatryoshkaDiffusion, plans["upscale"], resample=2)          # RePaint: 3 evaluations a step
    assert len(seen) == 19 * 3 + 1 and torch.equal(out[0], x0)
    assert not known_pixels_off(seen[::3], plans["upscale"], None, 20, shifts)


def test_image_to_image_from_strength_0_to_1():
    """SDEdit: strength 0 returns the image itself at every level (its D^r), strength 1 is the
    plain sample of the same seed, bit for bit, and strength 1/2 takes half the steps."""
    resolutions, schedules = [4, 8, 16], ["cosine", "cosine-shift2", "cosine-shift4"]
    d = MatryoshkaDiffusion(resolutions, schedules)
    oracle = OracleModel(torch.rand(1, 3, 16, 16, dtype=torch.float64), resolutions, [1, 2, 4])
    init = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1

    def sample(**kw):
        return d.sample(oracle, batch_size=2, sampler="ddpm", num_inference_steps=10, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0), **kw)
    assert all(torch.equal(a, b) for a, b in zip(sample(init=init, strength=0.0), d.downsample(init)))
    assert all(torch.equal(a, b) for a, b in zip(sample(init=init, strength=1.0), sample()))
    oracle.calls = 0
    half = sample(init=init, strength=0.5)
    assert oracle.calls == 5 and not torch.equal(half[-1], sample()[-1])
    with pytest.raises(ValueError, match="strength"):
        sample(init=init, strength=1.5)


def test_a_guidance_scale_per_level():
    """One scale per level, lowest first: equal scales give the images of the one number bit
    for bit; unequal ones guide each level by its own (v_null + w_r (v_cond - v_null))."""
    torch.manual_seed(0)
    model = randomize(NestedUNet(tiny_levels(2, num_classes=4)), std=0.1).eval()
    d = MatryoshkaDiffusion.for_model(model)
    cond = dict(label=torch.tensor([1, 2]))

    def sample(w):
        return d.sample(model, cond, batch_size=2, sampler="ddim", num_inference_steps=4, guidance_scale=w,
                        generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(sample(3.0), sample([3.0, 3.0])))
    assert not torch.equal(sample([5.0, 1.0])[1], sample(3.0)[1])
    zs, t = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)], torch.tensor(0.4, dtype=torch.float64)
    with torch.no_grad():
        v_cond = model(zs, torch.full((2,), 0.4), **cond)
        v_null = model(zs, torch.full((2,), 0.4), label=torch.tensor([4, 4]))
    for got, c, n, w in zip(d.predict_v(model, zs, t, cond, [5.0, 0.5]), v_cond, v_null, (5.0, 0.5)):
        torch.testing.assert_close(got, n + w * (c - n), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 guidance scales for 2 levels"):
        sample([1.0, 2.0, 3.0])


def test_sample_py_draws_around_given_pixels_and_stops_a_sample_that_overflows(trained_runs, tmp_path):
    """sample.py --upscale, --init-image (with --strength, with --mask) on a trained run; the
    inpainted image keeps its black half exactly. A run whose activations exceed fp16's range
    (its first conv scaled up) turns NaN in fp16: it stops with one line that names the
    precision to use instead, and samples in fp32. A released model is never fp16 by default."""
    from safetensors.torch import load_file, save_file
    run = trained_runs / "fashion"
    img = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(img[::2, ::2]).save(tmp_path / "small.png")
    for name, args in (("up", ["--upscale", "small.png"]), ("i2i", ["--init-image", "img.png", "--strength", "0.5"]),
                       ("inpaint", ["--init-image", "img.png", "--mask", "mask.png", "--resample", "1"])):
        p = run_sample("--ckpt", str(run), "--label", "bag", "--num-images", "2", "--num-inference-steps", "3",
                       "--out", str(tmp_path / name), *[str(tmp_path / a) if a.endswith(".png") else a for a in args])
        assert p.returncode == 0 and (tmp_path / f"{name}-matryoshka.png").exists(), p.stderr[-2000:]
    trained = P.Trained(str(run))
    given = S.given_pixels(trained, image=S.read_image(tmp_path / "img.png", 1),
                           mask=S.read_image(tmp_path / "mask.png", 1))
    out = S.draw(trained, trained.condition(labels=["bag"], repeat=2), 2, 0, trained.settings(num_inference_steps=3),
                 **given)[-1]
    assert torch.equal(out[:, :, :, :4], (torch.from_numpy(img[:, :4]).float() / 127.5 - 1).expand(2, 1, 8, 4))
    state, meta = files.read_weights(run / "ema.safetensors")
    state["conv_in.weight"] = state["conv_in.weight"] * 1e6
    save_file(state, str(tmp_path / "big.safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()})
    for precision, ok in (("fp16", False), ("fp32", True)):
        p = run_sample("--ckpt", str(tmp_path / "big.safetensors"), "--label", "bag", "--num-inference-steps", "3",
                       "--precision", precision, "--out", str(tmp_path / precision))
        assert (p.returncode == 0) == ok, p.stderr[-2000:]
        if not ok:
            assert "NaN or infinite" in p.stderr and "--precision fp32" in p.stderr and "Traceback" not in p.stderr
            last = p.stderr.strip().splitlines()[-1:]
            assert len(last) == 1 and last[0].startswith("sample.py")
    bf16 = torch.cuda.is_bf16_supported
    try:
        torch.cuda.is_bf16_supported = lambda including_emulation=True: False   # a T4, say
        assert devices.resolve_precision("auto", "cuda") == "fp16"
        assert devices.resolve_precision("auto", "cuda", fp16=False) == "fp32"
    finally:
        torch.cuda.is_bf16_supported = bf16


# ---------------------------------------------------------------------------------------
# The web demo (demo.py): its HTTP endpoints under bad input and load, and the page in a
# real browser (Debian's chromium and chromium-driver, which .ci/run installs)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_server(trained_runs):
    """demo.py serving the tiny text run on a free loopback port, in a thread of this process."""
    import threading
    from tools import demo
    ready = []
    thread = threading.Thread(target=demo.serve, kwargs=dict(ckpt=str(trained_runs / "text"), port=0,
                                                             device="cpu", ready=ready.append), daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not ready and time.time() < deadline:
        time.sleep(0.05)
    assert ready, "the demo did not start"
    return f"http://127.0.0.1:{ready[0]}", demo.Handler.demo


def http(url, body=None, raw=None):
    """(status, JSON or bytes) of a GET, or of a POST of `body` as JSON (or `raw` bytes)."""
    import urllib.error
    import urllib.request
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, content, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, content, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, json.loads(content) if "json" in kind else content


def wait_done(server, job, seconds=120):
    deadline = time.time() + seconds
    while not server.jobs[job].done.is_set() and time.time() < deadline:
        time.sleep(0.05)
    return server.jobs[job].done.is_set()


def png_url(side: int) -> str:
    """A grey side x side PNG as the page uploads it: a data: URL."""
    import base64
    import io
    buf = io.BytesIO()
    Image.new("L", (side, side), 90).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_demo_endpoints_refuse_bad_input_and_stay_bounded(demo_server):
    url, server = demo_server
    assert server.pipe.kind == "text"
    status, info = http(url + "/api/info")
    assert status == 200 and info["kind"] == "text" and "dpm++2m" in info["samplers"]
    assert b"Generate" in http(url + "/")[1]
    for body, word in (({"num_images": 0}, "num_images"), ({"num_images": 10 ** 6}, "num_images"),
                       ({"guidance_scale": float("nan")}, "guidance_scale"), ({"seed": -1}, "seed"),
                       ({"num_inference_steps": "ten"}, "num_inference_steps"), ({"sampler": "euler"}, "sampler"),
                       ({"prompt": "x" * 5000}, "prompt"), ([1, 2], "JSON object"), ({"seed": 1.5}, "seed"),
                       ({"mode": "paint"}, "mode"), ({"mode": "upscale"}, "image"),
                       ({"mode": "upscale", "image": "data:image/png;base64,AAAA"}, "image: cannot read it"),
                       ({"mode": "upscale", "image": png_url(8)}, "image: 8x8 pixels; this model's lower levels"),
                       ({"mode": "image-to-image", "image": png_url(8), "strength": 2}, "strength"),
                       ({"mode": "inpaint", "image": png_url(8), "mask": png_url(4)}, "mask: the mask is 4x4")):
        status, reply = http(url + "/api/generate", body)
        assert status == 400 and word in reply["error"], (body, reply)
    assert http(url + "/api/generate", raw=b"{not json")[0] == 400
    from tools import demo
    assert http(url + "/api/generate", raw=b"x" * (demo.LIMITS["body_bytes"] + 1))[0] == 413
    for path in ("/demo.py", "/../../etc/passwd", "/images/nope/grid.png", "/images/x/../../demo.py", "/api/events/x"):
        assert http(url + path)[0] == 404, path
    # An empty prompt is a prompt; a second Generate while one runs is refused; Stop stops it.
    status, reply = http(url + "/api/generate", {"prompt": "", "num_inference_steps": 400, "num_images": 1})
    assert status == 202
    assert http(url + "/api/generate", {"prompt": "a red square"})[0] == 409
    assert http(url + f"/api/stop/{reply['job']}", {})[0] == 200 and wait_done(server, reply["job"])
    assert "grid" not in server.jobs[reply["job"]].images               # stopped: no images
    # A closed tab stops the run: the event stream goes away, the next write fails.
    from http.client import HTTPConnection
    status, reply = http(url + "/api/generate", {"prompt": "a red square", "num_inference_steps": 1000,
                                                  "num_images": 1})
    host, port = url.split("//")[1].split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", f"/api/events/{reply['job']}")
    stream = conn.getresponse()
    assert stream.status == 200 and stream.fp.readline().startswith(b"data:")   # a first frame
    stream.close()
    conn.close()
    assert wait_done(server, reply["job"], 60) and server.jobs[reply["job"]].cancel.is_set()
    # Many generations in a row: the server keeps the last few, never more.
    from tools import demo
    jobs = []
    for i in range(demo.KEEP + 2):
        status, reply = http(url + "/api/generate", {"prompt": "a blue square", "num_inference_steps": 1,
                                                      "num_images": 1, "seed": i})
        assert status == 202
        jobs.append(reply["job"])
        assert wait_done(server, reply["job"])
    assert len(server.jobs) <= demo.KEEP and jobs[0] not in server.jobs
    assert http(url + f"/images/{jobs[-1]}/grid.png")[0] == 200
    assert http(url + f"/images/{jobs[0]}/grid.png")[0] == 404
    assert server is not None and url.startswith("http://127.0.0.1:")


class WebDriver:
    """A few commands of the W3C WebDriver protocol, spoken to chromedriver over HTTP."""

    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1100,1500"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium", "args": args}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        import urllib.request
        request = urllib.request.Request(self.base + path, method=method, data=json.dumps(body or {}).encode()
                                         if method == "POST" else None, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())["value"]

    def do(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def find(self, css):
        found = self.do("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def script(self, js):
        return self.do("POST", "/execute/sync", {"script": js, "args": []})


def test_demo_page_in_headless_chromium_draws_what_sample_py_draws(demo_server, trained_runs, tmp_path):
    """The page, driven in headless Chromium: type a prompt, press Generate, wait for the
    images. The intermediate resolutions appeared while it denoised, and the final grid is
    byte for byte the one sample.py writes for the same settings and seed; then the same
    through an upload: an image to upscale, chosen in the page's file input."""
    import shutil
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        # .ci/run installs them, and says so: there, a missing browser is a failure, not a skip.
        if os.environ.get("MATRYOSHKA_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are not on PATH (apt-get install chromium chromium-driver)")
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    url, server = demo_server
    driver_proc = subprocess.Popen(["chromedriver", "--port=0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
    try:
        line = driver_proc.stdout.readline()             # "... started successfully on port 41234."
        while line and "successfully on port" not in line:
            line = driver_proc.stdout.readline()
        assert line, "chromedriver did not start"
        browser = WebDriver(int(line.split("on port")[1].split()[0].strip(".")))
        try:
            browser.do("POST", "/url", {"url": url + "/"})
            prompt = browser.find("#prompt")
            browser.do("POST", f"/element/{prompt}/value", {"text": "a green square"})
            for css, value in (("#steps", "12"), ("#num", "2"), ("#seed", "5"), ("#guidance", "2")):
                element = browser.find(css)
                browser.do("POST", f"/element/{element}/clear")
                browser.do("POST", f"/element/{element}/value", {"text": value})
            browser.script("document.getElementById('sampler').value = 'ddim'")
            browser.do("POST", f"/element/{browser.find('#generate')}/click")
            deadline = time.time() + 180
            final_class = "return document.getElementById('final').className"
            while time.time() < deadline and "hidden" in browser.script(final_class):
                time.sleep(0.2)
            assert "hidden" not in browser.script("return document.getElementById('final').className")
            assert browser.script("return window.framesSeen") >= 2                  # the resolutions, while denoising
            grid_src = browser.script("return document.getElementById('grid').src")
            command = browser.script("return document.getElementById('command').textContent")
            (tmp_path / "page.png").write_bytes(__import__("base64").b64decode(browser.do("GET", "/screenshot")))
            # An upload: a 4x4 image (the lower level's size) upscaled to 8x8 around it.
            pixels = (np.random.default_rng(1).random((4, 4, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "up.png")
            browser.script("document.getElementById('mode').value = 'upscale'; showMode()")
            browser.do("POST", f"/element/{browser.find('#image')}/value", {"text": str(tmp_path / "up.png")})
            deadline = time.time() + 30
            while time.time() < deadline and not browser.script("return image"):
                time.sleep(0.1)                                               # the file read into a data: URL
            browser.do("POST", f"/element/{browser.find('#generate')}/click")
            deadline = time.time() + 180
            while time.time() < deadline and browser.script("return document.getElementById('grid').src") == grid_src:
                time.sleep(0.2)
            upscaled_src = browser.script("return document.getElementById('grid').src")
            assert "--upscale" in browser.script("return document.getElementById('command').textContent")
        finally:
            browser.do("DELETE", "")
    finally:
        driver_proc.terminate()
    status, grid = http(grid_src)
    assert status == 200
    assert "--num-images 2" in command and "--seed 5" in command and "--sampler ddim" in command
    p = run_sample("--ckpt", str(trained_runs / "text"), "a green square", "--num-images", "2", "--num-inference-steps",
                   "12", "--seed", "5", "--guidance-scale", "2", "--sampler", "ddim", "--out", str(tmp_path / "cli"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert grid == (tmp_path / "cli.png").read_bytes()
    assert Image.open(tmp_path / "page.png").size[0] > 500
    p = run_sample("--ckpt", str(trained_runs / "text"), "a green square", "--num-images", "2",
                   "--num-inference-steps", "12", "--seed", "5", "--guidance-scale", "2", "--sampler", "ddim",
                   "--upscale", str(tmp_path / "up.png"), "--out", str(tmp_path / "cli-up"))
    assert p.returncode == 0, p.stderr[-2000:]
    job = list(server.jobs.values())[-1]                      # the page's upload reached the sampler
    assert job.settings["mode"] == "upscale" and job.given["known"][0][0].shape == (1, 3, 4, 4)
    assert http(upscaled_src)[1] == (tmp_path / "cli-up.png").read_bytes()


# ---------------------------------------------------------------------------------------
# The run's thresholding (train.py --thresholding auto)
# ---------------------------------------------------------------------------------------

def test_thresholding_auto_clips_data_with_black_or_white_backgrounds(trained_runs):
    """Imagen's dynamic thresholding lets at most 0.5% of a sample's pixels reach -1 or 1:
    auto chooses it for data with fewer black or white pixels than that, clipping otherwise;
    an explicit --thresholding and --init-from's run come first."""
    import train
    from data import TensorImageDataset
    rng = np.random.default_rng(0)
    mid = rng.integers(1, 255, (40, 8, 8, 3), dtype=np.uint8)           # no pixel at 0 or 255
    few, many = mid.copy(), mid.copy()
    few.reshape(-1)[:int(0.004 * few.size)] = 0                          # 0.4%: under the 0.5%
    many.reshape(-1)[:int(0.006 * many.size)] = 255                      # 0.6%: over
    auto = train.parse_args([])
    assert auto.thresholding == "auto"
    chosen = [runs.choose_thresholding(auto, TensorImageDataset(x), {}, False) for x in (mid, few, many)]
    assert chosen == ["imagen", "imagen", "clip"]
    assert runs.choose_thresholding(train.parse_args(["--thresholding", "none"]), TensorImageDataset(many),
                                     {}, False) == "none"
    released = {"diffusion_config": {"thresholding": "deepfloyd"}}
    assert runs.choose_thresholding(auto, TensorImageDataset(many), released, False) == "deepfloyd"
    # what the runs recorded for sample.py: Fashion-MNIST (43% black) clipped, coloured squares not
    meta = {name: files.read_metadata(trained_runs / name / "ema.safetensors") for name in ("fashion", "text")}
    assert [meta[n]["diffusion_config"]["thresholding"] for n in ("fashion", "text")] == ["clip", "imagen"]


# ---------------------------------------------------------------------------------------
# The installation: no module of ours hides an installed one, every version pinned, and
# nothing optional loaded where it is not needed
# ---------------------------------------------------------------------------------------

def project_names(root=HERE) -> set:
    """The names `import` finds in the project's root: its .py files and its folders of them."""
    files = {p.stem for p in root.glob("*.py")}
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.py"))}
    return files | folders


def test_no_project_module_shadows_an_installed_package(tmp_path):
    """The root comes first on sys.path: a kernels.py of ours was imported in place of the
    `kernels` package that transformers imports, and every text model failed to load. No name
    of ours may be a top-level module of an installed distribution; a copy of the project
    with a kernels.py again is refused (the `kernels` distribution, which transformers needs,
    is installed here)."""
    import importlib.metadata
    import shutil
    installed = importlib.metadata.packages_distributions()      # import name -> distributions
    clashes = {n: installed[n] for n in project_names() if n in installed}
    assert clashes == {}, f"project modules named like installed packages: {clashes}"
    if "kernels" not in installed:
        pytest.skip("the `kernels` distribution is not installed here: the counter-example needs it")
    copy = tmp_path / "copy"
    shutil.copytree(HERE, copy, ignore=shutil.ignore_patterns(".*", "runs", "__pycache__", "docs"))
    (copy / "kernels.py").write_text("# a module of ours\n")
    assert "kernels" in {n for n in project_names(copy) if n in installed}


def test_requirements_are_pinned_in_the_lock_within_their_bounds():
    """requirements.txt names what the project uses, with bounds; requirements.lock (what
    setup.sh installs) pins every one of them, and each pin lies inside its bound."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    lock = {}
    for line in (HERE / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            lock[canonicalize_name(name)] = version
    wanted = [Requirement(l.split("#")[0]) for l in (HERE / "requirements.txt").read_text().splitlines()
              if l.split("#")[0].strip()]
    assert len(wanted) >= 10 and {"torch", "transformers", "pip"} <= set(lock)
    for req in wanted:
        assert canonicalize_name(req.name) in lock, f"{req.name} is not pinned in requirements.lock"
        assert req.specifier.contains(lock[canonicalize_name(req.name)]), (req, lock[canonicalize_name(req.name)])
        assert str(req.specifier), f"{req.name}: requirements.txt gives no bound"


def test_a_model_without_text_never_loads_the_text_libraries(tmp_path):
    """Training and sampling a class-conditional model import neither transformers nor
    datasets (nor TensorBoard): a newer release of one, or a broken one, cannot stop them."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_levels(2).to_dict()))
    probe = ("import sys, train, sample\n"
             f"train.main(['--config', {str(cfg)!r}, '--data', 'fashion-mnist', '--data-limit', '64', '--res', '4,8',"
             f" '--steps', '1,1', '--batch', '8,8', '--out', {str(tmp_path)!r}, '--name', 'r', '--no-samples'])\n"
             f"sample.main(['--ckpt', {str(tmp_path / 'r')!r}, '--label', 'bag', '--num-images', '1',"
             f" '--num-inference-steps', '1', '--out', {str(tmp_path / 'img')!r}])\n"
             "print('LOADED', [m for m in ('transformers', 'datasets', 'tensorboard') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", probe], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "LOADED []" in p.stdout, p.stdout[-500:]
