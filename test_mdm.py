"""
Tests for the Matryoshka Diffusion code. Each test compares against something independent
of the code under test: a closed form, a float64 recomputation, a torch built-in, or a
second code path. Run: python -m pytest -q test_mdm.py
"""

import math

import numpy as np
import pytest
import torch

import diffusion as D
import nested_unet as N
from diffusion import DiffusionConfig, MatryoshkaDiffusion
from nested_unet import NestedUNet, NestedUNetConfig, grow, preset

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
    assert N.parse_schedule("cosine") == 1 and N.parse_schedule("cosine-shift16") == 16
    with pytest.raises(ValueError, match="unknown schedule"):
        N.parse_schedule("linear")


def test_v_x_eps_round_trip_float64():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
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
        lam = (np.clip(-2 * np.log(np.tan(np.pi * t.double().numpy() / 2)), -15, 15)
               - 2 * np.log(diff.shifts[r]))
        a = torch.tensor(np.sqrt(1 / (1 + np.exp(-lam))))[:, None, None, None]
        s = torch.tensor(np.sqrt(1 / (1 + np.exp(lam))))[:, None, None, None]
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


def test_paper_presets_parameter_counts_on_meta_device():
    counts = {}
    for name in ("MDM-S64", "MDM-S64S256", "MDM-S64S128S256", "MDM-S64S256S1024", "MDM-S64S128S256S512S1024"):
        with torch.device("meta"):
            counts[name] = N.count_params(NestedUNet(preset(name, text_channels=2048)))
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
    mean of x is x itself, so v = (alpha_t z - x) / sigma_t. The schedule here is written out
    independently of diffusion.py (numpy, float64), with each level's own shift."""

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

    def forward(self, zs, t, **cond):
        self.calls += 1
        vs = []
        for z, x, s in zip(zs, self.targets, self.shifts):
            lam = np.clip(-2 * np.log(np.tan(np.pi * t.double().numpy() / 2)), -15, 15) - 2 * np.log(s)
            a = torch.tensor(np.sqrt(1 / (1 + np.exp(-lam))))[:, None, None, None]
            sig = torch.tensor(np.sqrt(1 / (1 + np.exp(lam))))[:, None, None, None]
            vs.append((a * z - x) / sig)
        return vs


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 50), ("ddim", 7)])
def test_samplers_recover_the_single_image_with_an_oracle(sampler, steps):
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    resolutions, schedules, shifts = [4, 8, 16], ["cosine", "cosine-shift2", "cosine-shift4"], [1, 2, 4]
    oracle = OracleModel(image, resolutions, shifts)
    d = MatryoshkaDiffusion(resolutions, schedules)
    out = d.sample(oracle, batch_size=2, sampler=sampler, num_inference_steps=steps, generator=g,
                   dynamic_thresholding=False, dtype=torch.float64)
    assert oracle.calls == steps                  # one network evaluation per step
    for o, x in zip(out, oracle.targets):
        torch.testing.assert_close(o, x, rtol=0, atol=1e-6)   # D^r(x) at every level
    # The check has teeth: a sampler that used one schedule for every level fails it.
    wrong = MatryoshkaDiffusion(resolutions, ["cosine"] * 3)
    out = wrong.sample(oracle, batch_size=2, sampler=sampler, num_inference_steps=steps,
                       generator=g, dynamic_thresholding=False, dtype=torch.float64)
    assert (out[2] - oracle.targets[2]).abs().max() > 1e-3


class GaussianOracle(OracleModel):
    """Data x with i.i.d. pixels N(mu, tau^2). Level r holds D^r(x), whose pixels are
    N(mu, tau^2 / k^2) for k x k pooling, and the exact posterior mean given z = alpha x +
    sigma eps is mu + alpha tau_r^2 / (alpha^2 tau_r^2 + sigma^2) (z - alpha mu). Unlike the
    one-image oracle, the prediction now depends on z, so a sampler must move z correctly
    to end with the right distribution."""

    def __init__(self, mu, tau, resolutions, shifts):
        super().__init__(torch.zeros(1, 3, resolutions[-1], resolutions[-1]), resolutions, shifts)
        self.mu, self.taus = mu, [tau * r / resolutions[-1] for r in resolutions]

    def forward(self, zs, t, **cond):
        self.calls += 1
        vs = []
        for z, tau, s in zip(zs, self.taus, self.shifts):
            lam = np.clip(-2 * np.log(np.tan(np.pi * t.double().numpy() / 2)), -15, 15) - 2 * np.log(s)
            a = torch.tensor(np.sqrt(1 / (1 + np.exp(-lam))))[:, None, None, None]
            sig = torch.tensor(np.sqrt(1 / (1 + np.exp(lam))))[:, None, None, None]
            x_mean = self.mu + a * tau ** 2 / (a ** 2 * tau ** 2 + sig ** 2) * (z - a * self.mu)
            vs.append((a * z - x_mean) / sig)
        return vs


def gaussian_chain_reference(sampler, steps, mu, tau, shift):
    """For Gaussian data every sampler step is linear in z plus Gaussian noise, so the mean and
    variance of the final samples follow a scalar recursion (float64, written out here
    independently of diffusion.py: DDIM z_s = alpha_s x + sigma_s eps; DDPM the posterior
    q(z_s | z_t, x) of Ho et al. 2020)."""
    def a_s(t):
        with np.errstate(divide="ignore"):
            lam = np.clip(-2 * np.log(np.tan(np.pi * t / 2)), -15, 15) - 2 * np.log(shift)
        return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
    m, V = 0.0, 1.0                               # z_1 ~ N(0, 1)
    ts = np.linspace(1, 0, steps + 1)
    for i in range(steps):
        (at, st), (a_, s_) = a_s(ts[i]), a_s(ts[i + 1])
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


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddpm", 20), ("ddim", 50), ("ddim", 7)])
def test_samplers_reproduce_a_gaussian_at_every_level(sampler, steps):
    g = torch.Generator().manual_seed(0)
    resolutions, shifts = [4, 8, 16], [1, 2, 4]
    mu, tau = 0.2, 0.5
    oracle = GaussianOracle(mu, tau, resolutions, shifts)
    d = MatryoshkaDiffusion(resolutions, ["cosine", "cosine-shift2", "cosine-shift4"])
    out = d.sample(oracle, batch_size=512, sampler=sampler, num_inference_steps=steps, generator=g,
                   dynamic_thresholding=False, dtype=torch.float64)
    for o, tau_r, s in zip(out, oracle.taus, shifts):      # 24k to 393k pixel values per level
        m, V = gaussian_chain_reference(sampler, steps, mu, tau_r, s)
        assert o.mean().item() == pytest.approx(m, abs=0.01)
        assert o.std().item() == pytest.approx(math.sqrt(V), rel=0.03)
        if steps >= 50:                           # and the chain itself is close to the data
            assert math.sqrt(V) == pytest.approx(tau_r, rel=0.12)


def test_guidance_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    model = randomize(NestedUNet(tiny_levels(2, num_classes=4)), std=0.1).eval()
    d = MatryoshkaDiffusion.for_model(model)
    zs = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)]
    cond = dict(label=torch.tensor([1, 2]))
    t = torch.tensor(0.3, dtype=torch.float64)
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
