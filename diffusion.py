"""
The multi-resolution diffusion process of Matryoshka Diffusion Models (section 3.1, Eq. 2-3, appendix C):
one process in an extended space holding an image at several resolutions. Resolution r sees the
down-sampled copy D^r(x) with its own noise and schedule, at a time t shared by all (Eq. 2):

    q(z_t^r | x) = N(z_t^r; alpha_t^r D^r(x), (sigma_t^r)^2 I)

The NestedUNet predicts v (Salimans & Ho, 2022) at every resolution; all are trained (Eq. 3) and
denoised (appendix C) jointly. In reading order: 1. the schedules and their resolution shift,
2. v-prediction, 3. guidance and thresholding, 4. the process of one NestedUNet (each level's
schedule, D^r, Eq. 2, Eq. 3, the samplers), 5. a training step.

    python diffusion.py [MDM-S64S256 --out s.png]     # schedules.png of MDM-S64S128S256S512S1024 by default
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nested_unet import preset

# --- 1. Schedules ----------------------------------------------------------------------------
# Time is continuous, t ~ U(0, 1). The cosine schedule (Nichol & Dhariwal 2021) in log-SNR:
#     logsnr(t) = -2 log tan(pi t / 2),        alpha^2 = sigmoid(logsnr),  sigma^2 = sigmoid(-logsnr)
# so alpha^2 + sigma^2 = 1, and at t = 1/2 signal and noise are equal; clipped to [-15, 15]. The
# resolution shift (section 3.1, as Hoogeboom et al. 2023): averaging an s x s block of independent
# noise divides its variance by s^2, so at the same t a 64x64 copy is 16 times "cleaner" than the
# 256x256 image. A level at s times the base resolution gets its SNR / s^2 (after the clipping):
# logsnr_s(t) = logsnr(t) - 2 log s ("cosine-shift4": s = 4); the 2 is `shift_power` (official 256 px: 1).


def cosine_logsnr(t: torch.Tensor, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> torch.Tensor:
    # float64 inside: tan(pi t / 2) near t = 1 is large, and logsnr feeds exp() later.
    return (-2 * torch.log(torch.tan(math.pi * t.double() / 2))).clamp(logsnr_min, logsnr_max)


def shifted_logsnr(t, shift: float, power: float = 2.0, logsnr_min=-15.0, logsnr_max=15.0):
    return cosine_logsnr(t, logsnr_min, logsnr_max) - power * math.log(shift)


def parse_schedule(name: str, base: str = "cosine") -> float:
    """The shift of a level's schedule: 'cosine' -> 1, 'cosine-shift4' -> 4 (the paper's names)."""
    kind, _, shift = name.partition("-shift")
    if kind == base:
        with contextlib.suppress(ValueError):
            return float(shift) if shift else 1.0
    raise ValueError(f"unknown schedule {name!r}: expected '{base}' or '{base}-shiftS' with a number S, "
                     f"e.g. '{base}-shift4'")


def alpha_sigma(logsnr: torch.Tensor):
    """alpha_t = sqrt(sigmoid(logsnr)), sigma_t = sqrt(sigmoid(-logsnr))."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


# --- 2. v-prediction (section 2): with z = alpha x + sigma eps the network predicts ----------
# v = alpha eps - sigma x; (z, v) is a rotation of (x, eps), and it rotates back

def v_from_x_eps(x, eps, alpha, sigma):
    return alpha * eps - sigma * x


def x_from_v(z, v, alpha, sigma):
    return alpha * z - sigma * v


def eps_from_v(z, v, alpha, sigma):
    return sigma * z + alpha * v


def bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) -> (B, 1, 1, ...) to broadcast against images (B, ...)."""
    return a.reshape(a.shape[0], *[1] * (like.dim() - 1)).to(like.dtype)


# --- 3. Guidance and thresholding (appendix C) -----------------------------------------------

def dynamic_threshold(x: torch.Tensor, percentile: float = 0.995, max_scale: float = math.inf) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al., 2022): s = the `percentile` of |x| per sample,
    >= 1; x is clipped to [-s, s] and divided by s (strong guidance is not flattened to +-1)."""
    s = bcast(torch.quantile(x.flatten(1).abs().float(), percentile, dim=1).clamp(min=1.0, max=max_scale), x)
    return x.clamp(-s, s) / s


# Of the predicted x, at every step: Imagen's; the released models' demo's (DeepFloyd IF's: the
# 95th percentile, s in [1, 1.5]); plain clipping to [-1, 1]; none.
THRESHOLDING = {"imagen": (0.995, math.inf), "deepfloyd": (0.95, 1.5), "clip": None, "none": None}


def threshold(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "clip":
        return x.clamp(-1, 1)
    if mode == "none":
        return x
    return dynamic_threshold(x, *THRESHOLDING[mode])


def guided_v(v_cond, v_null, guidance_scale: float):
    """Classifier-free guidance (Ho & Salimans, 2022): w = 1 the conditional model, 0 the null one."""
    return v_null + guidance_scale * (v_cond - v_null)


def cat_conditions(a: dict, b: dict) -> dict:
    """Two conditions in one batch; text padded to a common length, with a mask."""
    if set(a) - {"text_mask"} != set(b) - {"text_mask"}:
        raise ValueError(f"cannot batch conditions of different kinds: {sorted(a)} and {sorted(b)}")
    a, b = dict(a), dict(b)
    if "text" in a:
        L = max(a["text"].shape[1], b["text"].shape[1])
        for c in (a, b):
            mask = c.get("text_mask")
            if mask is None:
                mask = torch.ones(c["text"].shape[:2], dtype=torch.bool, device=c["text"].device)
            pad = L - c["text"].shape[1]
            c["text"], c["text_mask"] = F.pad(c["text"], (0, 0, 0, pad)), F.pad(mask, (0, pad))
    return {k: torch.cat([a[k], b[k]]) for k in a}


# --- 4. The process: schedules per level, D^r and Eq. 2, the loss of Eq. 3, the samplers -----

SAMPLERS = ("ddpm", "ddim", "dpm++2m")

@dataclass
class DiffusionConfig:
    shift_power: float = 2.0          # logsnr_s = logsnr - shift_power * log s (section 3.1's shift)
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    downsample: str = "avg"           # D^r: "avg" pooling (exact for integer ratios) or "bilinear"
    loss_weights: list | None = None  # extra weight per resolution, lowest first (official 1024: 1, 4, 16)
    loss_levels: str = "all"          # "all": Eq. 3; "top": only the highest resolution (simple DM)
    thresholding: str = "imagen"      # of the predicted x while sampling: "imagen", "deepfloyd", "clip", "none"

    def __post_init__(self):
        if self.downsample not in ("avg", "bilinear"):
            raise ValueError(f"downsample={self.downsample!r}: expected 'avg' or 'bilinear'")
        if self.loss_levels not in ("all", "top"):
            raise ValueError(f"loss_levels={self.loss_levels!r}: expected 'all' or 'top'")
        if self.thresholding not in THRESHOLDING:
            raise ValueError(f"thresholding={self.thresholding!r}: expected one of {', '.join(THRESHOLDING)}")


class MatryoshkaDiffusion:
    """The diffusion process of one NestedUNet: its levels' resolutions and schedules.

        diffusion = MatryoshkaDiffusion.for_model(model)
        loss, per_level = diffusion.loss(model, images, cond)
        images_per_level = diffusion.sample(model, cond, batch_size=16)

    Lists hold one entry per resolution, lowest first, like the model's inputs and outputs; `cond`
    is {"text", "text_mask"}, {"label"} or {}. The released models' schedule: tools/release.py."""

    base_schedule = "cosine"

    def __init__(self, resolutions, schedules, config: DiffusionConfig | None = None, downsample_fn=None):
        self.resolutions = list(resolutions)
        self.shifts = [parse_schedule(s, self.base_schedule) for s in schedules]
        self.config = config or DiffusionConfig()
        if self.config.loss_weights is not None and len(self.config.loss_weights) != len(self.resolutions):
            raise ValueError(f"loss_weights={self.config.loss_weights} needs one weight per resolution "
                             f"{self.resolutions}")
        self.downsample_fn = downsample_fn or self.spatial_downsample    # D^r(x, level); video.py: its own

    @classmethod
    def for_model(cls, model, config: DiffusionConfig | None = None, **kw):
        return cls(model.resolutions, [c.schedule for c in model.config.levels()], config, **kw)

    # -- each level's schedule --
    def logsnr(self, t: torch.Tensor, level: int) -> torch.Tensor:
        c = self.config
        return shifted_logsnr(t, self.shifts[level], c.shift_power, c.logsnr_min, c.logsnr_max)

    def training_times(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform u in (0, 1) -> the training times: u itself, in continuous time."""
        return u

    def time_grid(self, num_inference_steps: int, sampler: str = "ddpm") -> torch.Tensor:
        """The sampler's times, 1 (noise) to 0 (data), even in t; DPM-Solver++'s even in log-SNR (its update
        is exact for an x constant over a log-SNR step; even in t, its last steps overshoot by half)."""
        if sampler == "dpm++2m":
            return self.logsnr_grid(num_inference_steps)
        return torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)

    def logsnr_grid(self, N: int) -> torch.Tensor:
        """N + 1 times, 1 to 0, whose log-SNR (any level's: shifts only offset it) is even in [min, max]."""
        c = self.config                            # the cosine: t = (2 / pi) atan(exp(-logsnr / 2))
        lam = torch.linspace(c.logsnr_min, c.logsnr_max, N + 1, dtype=torch.float64)
        t = 2 / math.pi * torch.atan(torch.exp(-lam / 2))
        t[0], t[-1] = 1.0, 0.0                      # the ends, where the clipped schedule is flat
        return t

    def alpha_sigma(self, t: torch.Tensor, level: int):
        return alpha_sigma(self.logsnr(t, level))

    # -- D^r and the noising of Eq. 2 --
    def spatial_downsample(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """D^r of (B, C, H, W): average pooling by H / r (why the shift is s^2) or antialiased bilinear."""
        r = self.resolutions[level]
        if x.shape[-1] == r:
            return x
        if self.config.downsample == "avg":
            return F.avg_pool2d(x, x.shape[-1] // r)
        return F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)

    def downsample(self, x: torch.Tensor) -> list:
        """[D^1(x), ..., D^R(x) = x], lowest resolution first."""
        return [self.downsample_fn(x, r) for r in range(len(self.resolutions))]

    def add_noise(self, xs: list, t: torch.Tensor, noises: list) -> list:
        """Eq. 2: z_t^r = alpha_t^r D^r(x) + sigma_t^r eps^r, each resolution with its own noise and
        schedule, all at the same t. A level may hold fewer samples than t (mixed resolution): the first."""
        zs = []
        for r, (x, eps) in enumerate(zip(xs, noises)):
            a, s = self.alpha_sigma(t[: x.shape[0]], r)
            zs.append(bcast(a, x) * x + bcast(s, x) * eps)
        return zs

    # -- the joint loss of Eq. 3 --
    def loss(self, model, x: torch.Tensor, cond: dict | None = None, t=None, noises=None,
             high_res_batch: int | None = None, high_res_fraction: float | None = None):
        """Eq. 3: L = E_t E_z sum_r w_t^r || x_theta^r(z_t, t) - D^r(x) ||^2, in v-space. With w^r / w^R =
        N_R / N_r (N_r: the pixels of resolution r), divided by N_R, it is sum_r MSE_r: each resolution's
        *mean* squared error, equally weighted (times the optional `loss_weights`). loss_levels="top": only
        the highest resolution counts (the paper's "simple DM"); the others get weight 0, so every
        parameter stays in the graph (DDP needs that). `high_res_batch`: only the first that many samples
        go through the highest resolution; drawn with probability `high_res_fraction`, its squared errors
        are divided by the expected count (fraction * B): the loss does not depend on the draw, and its
        mean over DDP ranks is that of the whole batch. Returns (loss, [MSE per resolution, lowest first])."""
        cond, B = cond or {}, x.shape[0]
        xs = self.downsample(x)
        if high_res_batch is not None and len(xs) > 1:
            xs[-1] = xs[-1][:high_res_batch]
        t = self.training_times(torch.rand(B, device=x.device) if t is None else t)
        noises = [torch.randn_like(a) for a in xs] if noises is None else noises
        v_pred = model(self.add_noise(xs, t, noises), t, **cond)
        per_level = []
        for r, (xr, eps, v) in enumerate(zip(xs, noises, v_pred)):
            a, s = self.alpha_sigma(t[: xr.shape[0]], r)
            target = v_from_x_eps(xr, eps, bcast(a, xr), bcast(s, xr))
            mse = F.mse_loss(v.float(), target.float(), reduction="sum") / math.prod(xr.shape[1:])
            count = B * high_res_fraction if (high_res_fraction and r == len(xs) - 1 and len(xs) > 1) \
                else xr.shape[0]
            per_level.append(mse / count)
        weights = list(self.config.loss_weights or [1.0] * len(xs))
        if self.config.loss_levels == "top":
            weights = [0.0] * (len(xs) - 1) + [weights[-1]]
        return sum(w * l for w, l in zip(weights, per_level)), per_level

    # -- sampling (appendix C) --
    @torch.no_grad()
    def predict_v(self, model, zs, t, cond, guidance_scale=1.0, negative_cond=None):
        """The network's v at every level, guided (classifier-free) in one evaluation: the condition and
        the null (or negative) one in one batch. guidance_scale: one, or one per level (lowest first)."""
        B = zs[0].shape[0]
        tt = torch.full((B,), float(t), device=zs[0].device)
        scales = list(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else [guidance_scale] * len(zs)
        if all(w == 1.0 for w in scales) or not cond:
            return [v.to(zs[0].dtype) for v in model(zs, tt, **cond)]   # no guidance: one half only
        null = negative_cond if negative_cond is not None else \
            model.null_condition(cond, torch.ones(B, dtype=torch.bool, device=zs[0].device))
        vs = model([torch.cat([z, z]) for z in zs], torch.cat([tt, tt]), **cat_conditions(cond, null))
        return [guided_v(*v.to(zs[0].dtype).chunk(2), w) for v, w in zip(vs, scales)]

    @torch.no_grad()
    def sample(self, model, cond: dict | None = None, batch_size: int = 1, sampler: str = "ddpm",
               num_inference_steps: int = 250, guidance_scale: float | list = 1.0, negative_cond=None,
               thresholding: str | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
               device=None, dtype=torch.float32, callback=None, progress: bool = False,
               known: list | None = None, init: torch.Tensor | None = None, strength: float = 1.0,
               resample: int = 0) -> list:
        """Appendix C: every resolution starts from its own Gaussian noise; the NestedUNet runs on all
        in parallel, and each takes one denoising step with its own schedule, repeatedly. Returns the
        final images, one tensor per resolution, lowest first, in [-1, 1] when thresholded.

        sampler: "ddpm" ancestral (Ho et al., 2020); "ddim" (Song et al., 2021), deterministic with eta = 0,
        as noisy as DDPM with eta = 1; "dpm++2m" second-order multistep DPM-Solver++ (Lu et al., 2022) in
        each level's log-SNR. guidance_scale: one, or one per level (lowest first: strong for the layout,
        weaker for the texture). thresholding: of x_pred (None: the config's). callback(i, t, zs, x_preds).
        What only a nested model can do, through its levels:
          known     per level None or (x, keep): x's pixels (B, C, r, r) where keep (B, 1, r, r) is 1 (None:
                    all) are known; each step puts them back, noised to its time by their level's schedule
                    (Eq. 2's marginal), and draws the rest around them (RePaint, Lugmayr et al. 2022): a
                    lower level known is super-resolution, a mask at every level inpainting. Kept exactly.
          resample  RePaint's resampling: each step redone `resample` times, from its time again
                    with fresh noise (harmonises the known and drawn).
          init      image-to-image (SDEdit, Meng et al. 2022): each level starts from D^r(init (B, C, R, R))
                    noised to time `strength` (1: pure noise, the seed's plain sample; 0: init itself)."""
        cond, thresholding = cond or {}, thresholding or self.config.thresholding
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: need at least 1 step")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if thresholding not in THRESHOLDING:
            raise ValueError(f"thresholding={thresholding!r}: expected one of {', '.join(THRESHOLDING)}")
        if isinstance(guidance_scale, (list, tuple)) and len(guidance_scale) != len(self.resolutions):
            raise ValueError(f"{len(guidance_scale)} guidance scales for {len(self.resolutions)} levels: give one, "
                             f"or one per level, lowest first")
        if not 0 <= strength <= 1 or (resample and sampler == "dpm++2m"):
            raise ValueError(f"strength={strength} must be in [0, 1]; resampling is for ddpm and ddim")
        device, shapes = device or next(model.parameters()).device, model.input_shapes(batch_size)
        # The sampler's state stays in float32 (dtype) even when the network runs in bf16.
        zs = [torch.randn(s, generator=generator, device=device, dtype=dtype) for s in shapes]
        ts = self.time_grid(num_inference_steps, sampler)
        if init is not None and strength < 1:      # SDEdit: start at t = strength from init, noised
            ts = ts[round((1 - strength) * (len(ts) - 1)):]
            xs = self.downsample(init.to(device, dtype))
            zs = [self.noised(x, ts[0], r, eps) for r, (x, eps) in enumerate(zip(xs, zs))]
            if len(ts) == 1:                       # strength 0: nothing to denoise
                return xs
        memory = [{} for _ in zs]                  # per level: what a multistep solver keeps
        for i in tqdm(range(len(ts) - 1), desc=f"{sampler} x{batch_size}", disable=not progress, leave=False):
            t, s, last = ts[i], ts[i + 1], i == len(ts) - 2
            for again in range(0 if last or not known else resample, -1, -1):
                zs = self.put_back(zs, known, t, generator)
                vs = self.predict_v(model, zs, t, cond, guidance_scale, negative_cond)
                x_preds, zs = zip(*(self.step(z, v, t, s, r, sampler, thresholding, generator, last=last, eta=eta,
                                              memory=memory[r]) for r, (z, v) in enumerate(zip(zs, vs))))
                if again:                          # RePaint: back from s to t, q(z_t | z_s), and again
                    zs = [self.noised(z, t, r, torch.randn(z.shape, generator=generator, device=device, dtype=dtype),
                                      since=s) for r, z in enumerate(zs)]
            zs = list(zs)
            if callback is not None:
                callback(i, float(t), zs, list(x_preds))
        return self.put_back(zs, known, None, generator)

    def noised(self, x, t, level, eps, since=None):
        """Eq. 2's z_t = alpha_t x + sigma_t eps at a level, with its schedule; since=s: from z_s at an
        earlier time s, q(z_t | z_s) = N(a z_s, sigma_t^2 - a^2 sigma_s^2) with a = alpha_t / alpha_s."""
        a, sig = (u.to(x.dtype) for u in self.alpha_sigma(t.reshape(1), level))
        if since is not None:
            a_s, s_s = (u.to(x.dtype) for u in self.alpha_sigma(since.reshape(1), level))
            a, sig = a / a_s, (sig ** 2 - (a / a_s) ** 2 * s_s ** 2).clamp(min=0).sqrt()
        return a * x + sig * eps

    def put_back(self, zs, known, t, generator):
        """Every level's known pixels (sample's `known`), noised to time t with fresh noise (None: as is)."""
        out = []
        for r, (z, k) in enumerate(zip(zs, known or [None] * len(zs))):
            if k is not None:
                x, keep = k
                if t is not None:
                    x = self.noised(x.to(z.dtype), t, r, torch.randn(z.shape, generator=generator, device=z.device,
                                                                    dtype=z.dtype))
                z = x.to(z.dtype) if keep is None else torch.where(keep > 0.5, x.to(z.dtype), z)
            out.append(z)
        return out

    def step(self, z, v, t, s, level, sampler, thresholding="imagen", generator=None, last=False, eta=0.0,
             memory=None):
        """One update of one resolution from t to s < t, with its own schedule: (predicted x, z_s), the
        last step (x, x). `memory`: this level's dict that a multistep solver carries between steps."""
        lt, ls = (self.logsnr(u.reshape(1), level) for u in (t, s))
        a_t, s_t, a_s, s_s = (u.to(z.dtype) for u in (*alpha_sigma(lt), *alpha_sigma(ls)))
        x_pred = threshold(x_from_v(z, v.to(z.dtype), a_t, s_t), thresholding)
        if last:
            return x_pred, x_pred
        if sampler == "dpm++2m":
            # DPM-Solver++(2M) in lambda = logsnr / 2 (Lu et al. 2022, Algorithm 2), h = lambda_s - lambda_t:
            # z_s = (sigma_s / sigma_t) z_t - alpha_s (e^-h - 1) D, D the x-prediction extrapolated from
            # the last two, D = (1 + 1/(2r)) x_t - 1/(2r) x_prev, r = h_prev / h (first step: D = x_t, DDIM).
            h = ((ls - lt) / 2).to(z.dtype)
            D = x_pred
            if "x" in memory:
                r = memory["h"] / h
                D = (1 + 1 / (2 * r)) * x_pred - 1 / (2 * r) * memory["x"]
            memory.update(x=x_pred, h=h)
            return x_pred, (s_s / s_t) * z - a_s * torch.expm1(-h) * D
        # With c = 1 - SNR_t / SNR_s = -expm1(logsnr_t - logsnr_s) (stable for close t and s),
        # the posterior q(z_s | z_t, x) of Eq. 1 has variance c sigma_s^2.
        c = (-torch.expm1(lt - ls)).to(z.dtype)
        if sampler == "ddim":
            # DDIM: keep the predicted noise (from the thresholded x), move the signal to the
            # level of s; eta > 0 gives back eta^2 of the posterior's variance as fresh noise.
            eps = (z - a_t * x_pred) / s_t
            if eta == 0:
                return x_pred, a_s * x_pred + s_s * eps
            var = eta ** 2 * c * s_s ** 2
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            return x_pred, a_s * x_pred + (s_s ** 2 - var).clamp(min=0).sqrt() * eps + var.sqrt() * noise
        # DDPM: sample the posterior q(z_s | z_t, x = x_pred):
        #     mean = alpha_s ((1 - c) z_t / alpha_t + c x_pred),   variance = c sigma_s^2
        mean = a_s * ((1 - c) * z / a_t + c * x_pred)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return x_pred, mean + (c * s_s ** 2).sqrt() * noise


# --- 5. A training step (appendix B) ---------------------------------------------------------
# Appendix B: Adam with beta1 = 0.9, beta2 = 0.99, eps = 1e-8, no weight decay; gradients clipped
# at norm 2. train.py and bench.py take their steps here.

ADAM_BETAS, ADAM_EPS, CLIP_NORM = (0.9, 0.99), 1e-8, 2.0


def make_optimizer(model, lr: float) -> torch.optim.Adam:
    # fused: one kernel for all parameters (CPU: 18 ms, not 66, for 20M in 500 tensors; same arithmetic).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
    return torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0,
                            fused=fused or None)


def training_step(diffusion, model, opt, micro_batches, train_model=None, clip: float = CLIP_NORM,
                  high_res_fraction=None, autocast=None, no_sync=None, scaler=None):
    """One optimizer step over a batch's micro-batches (gradient accumulation), each (x, cond, t, noises,
    n_high) for diffusion.loss: its loss / their number (their mean is one big batch's loss) is
    back-propagated, then the gradients are clipped and Adam steps. `train_model` runs the forward (the
    model in DDP or torch.compile; default `model`); `no_sync()` is DDP's: all micro-batches but the last
    add to .grad locally. `scaler`: a GradScaler for fp16 (whose range flushes small gradients to zero):
    the loss is scaled up before backward, the gradients down before clipping; a step whose gradients
    overflow is skipped, and the scale adapts. Returns (loss per level and total, summed over
    micro-batches; whether any loss was not finite), on the device: nothing here waits for the GPU."""
    train_model = model if train_model is None else train_model   # (a compiled module has no truth value)
    n, sums, bad = len(micro_batches), 0, None
    for i, (x, cond, t, noises, n_high) in enumerate(micro_batches):
        ctx = no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext()
        with ctx, (autocast or contextlib.nullcontext()):
            loss, per_level = diffusion.loss(train_model, x, cond, t=t, noises=noises, high_res_batch=n_high,
                                             high_res_fraction=high_res_fraction)
            (loss / n if scaler is None else scaler.scale(loss / n)).backward()
        sums = sums + torch.stack([*per_level, loss]).detach() / n
        nonfinite = ~torch.isfinite(loss.detach())
        bad = nonfinite if bad is None else bad | nonfinite
    if scaler is not None:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return sums, bad


# --- A picture of the schedules (python diffusion.py) ----------------------------------------

def plot_schedules(config, path: str, diffusion_config=None):
    """Left: each level's log-SNR against t. Right: once average-pooled to the base resolution (SNR x s^2):
    unshifted (dotted), high resolutions are far cleaner than the base; shifted (solid), on its curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels = config.levels()
    d = MatryoshkaDiffusion([c.resolutions[0] for c in levels], [c.schedule for c in levels], diffusion_config)
    t = torch.linspace(0, 1, 501)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r, c in enumerate(levels):
        lam, pooled = d.logsnr(t, r), 2 * math.log(d.shifts[r])
        label = f"{c.resolutions[0]}x{c.resolutions[0]} ({c.schedule})"
        axes[0].plot(t, lam, color=f"C{r}", label=label)
        axes[1].plot(t, lam + pooled, color=f"C{r}", label=label + ", shifted", lw=2.5 - 0.4 * r)
        if d.shifts[r] != 1:
            axes[1].plot(t, cosine_logsnr(t, d.config.logsnr_min, d.config.logsnr_max) + pooled, color=f"C{r}",
                         linestyle=":", label=label.split(" (")[0] + ", not shifted")
    axes[0].set(xlabel="t", ylabel="log SNR", title="each resolution's own schedule")
    axes[1].set(xlabel="t", ylabel="log SNR after pooling to the base resolution",
                title="what the noise amounts to at the base resolution")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Resolution-shifted cosine schedules: logsnr_s(t) = logsnr(t) - {d.config.shift_power:g} log s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Draw the log-SNR schedules of a preset's levels.")
    p.add_argument("preset", nargs="?", default="MDM-S64S128S256S512S1024")
    p.add_argument("--out", default="schedules.png")
    p.add_argument("--shift-power", type=float, default=2.0)
    a = p.parse_args()
    plot_schedules(preset(a.preset), a.out, DiffusionConfig(shift_power=a.shift_power))
    print(f"wrote {a.out}")
