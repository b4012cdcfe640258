"""The paper's released models, and converting a downloaded checkpoint of the authors' code into
a run folder that sample.py, tools/evaluate.py and train.py --init-from read.

Gu et al. released three text-to-image models (50M Flickr text-image pairs, FLAN-T5 XL): 64x64
(MDM-S64), 256x256 (MDM-S64S256), 1024x1024 (MDM-S64S256S1024). What they compute their own way
is one override each of nested_unet.py's or diffusion.py's hooks, so their weights load strictly:

    1. down-sampling: a stride-2 3x3 conv, not average pooling then a 3x3 conv
    2. text: its own softmax, added to the pixels' (not one softmax over both); padding attended to
    3. the feed-forward layer after attention normalises with GroupNorm(32) over the map
    4. every level has its own time MLP; its sinusoid is sin then cos, of the integer step k - 1
    5. the pooled text's projection into the embedding has no bias
    6. the 256 px level inside the 1024 px model divides its input by its standard deviation
    7. guidance's null text is the encoded empty prompt (they never saw a null mask)
    8. a discrete schedule, diffusers' "squaredcos_cap_v2"; SNR / 4 at 256 px (/ 16, / 256 at 1024 px)
    9. prompts are split into T5 pieces as their code split them (mdm_token_ids)

    curl -O https://docs-assets.developer.apple.com/ml-research/models/mdm/flickr64/vis_model.pth
    python -m tools.release vis_model.pth --out runs/flickr64     # which model it is: from the file
    python sample.py --ckpt runs/flickr64 "a panda playing guitar"
    python train.py --config MDM-flickr256 --res 64,256 --init-from runs/flickr64 ...   # grow it

Reading the file runs no code from it; every tensor maps to exactly one of ours, shape included
(the authors' own loader is not strict and skips what does not fit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import DiffusionConfig, MatryoshkaDiffusion, parse_schedule
from helpers.files import load_torch_file, save_weights
from helpers.options import ArgumentParser
from nested_unet import (AttentionBlock, NestedUNet, NestedUNetConfig, group_norm, mdm_s64, outer_level, sinusoid,
                         time_mlp)

URL = "https://docs-assets.developer.apple.com/ml-research/models/mdm/{name}/vis_model.pth"


# --- The released models' architecture: a variant of the NestedUNet ---
@dataclasses.dataclass
class ReleasedConfig(NestedUNetConfig):
    """A NestedUNetConfig of the released models' kind, with their one per-level key."""
    normalize_input: bool = False         # (6) this level divides its input by its per-sample std

    def to_dict(self) -> dict:
        return {"architecture": "released", **super().to_dict()}


def released(config: NestedUNetConfig, **kw) -> ReleasedConfig:
    """The same sizes in the released models' architecture and schedule (every level)."""
    def level(d: dict) -> dict:
        schedule = d["schedule"].replace("cosine", ReleasedDiffusion.base_schedule)
        return {**d, "inner_config": d["inner_config"] and level(d["inner_config"]), "schedule": schedule}
    return ReleasedConfig(**{**level(dataclasses.asdict(config)), **kw})


class StridedDownsample(nn.Module):
    """(1) A 3x3 conv with stride `factor`."""
    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, stride=factor)

    def forward(self, x, *args):
        return self.conv(x)


class ReleasedAttentionBlock(AttentionBlock):
    def ffn_norm(self, channels):
        return group_norm(channels)                       # (3)

    def attend_text(self, q, k, v, k_txt, v_txt, mask):
        return self.attend(q, k, v) + self.attend(q, k_txt, v_txt)  # (2) two softmaxes, all tokens seen

    def feed_forward(self, x):
        # (3) GroupNorm over the map, then the MLP at each position
        return self.ffn[1:](self.ffn[0](x).flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(2, x.shape[2:])


class ReleasedNestedUNet(NestedUNet):
    null_text = "empty_prompt"            # (7)

    def __init__(self, config: ReleasedConfig):
        super().__init__(config)
        E = config.emb_channels
        self.time_mlp = time_mlp(E)                                   # (4) its own time MLP
        if self.inner is None:
            del self.cond_embed.time_mlp
            if config.text_channels:                                  # (5)
                self.cond_embed.text_pool = nn.Linear(config.lm_feature_projected_channels, E, bias=False)

    def make_attention(self, ch):
        return ReleasedAttentionBlock(ch, self.config.num_heads, self.cond_ch)

    def make_downsample(self, ch, i):
        return StridedDownsample(ch, self.config.resolutions[i] // self.config.resolutions[i + 1])

    def time_embedding(self, t, cond):
        return t, cond                    # (4) each level embeds the time itself: level_embedding

    def level_embedding(self, emb, batch):
        (t, cond), mlp = emb, self.time_mlp
        e = mlp(timestep_embedding(t[:batch], mlp[0].in_features, mlp[0].weight.dtype))
        return F.silu(e if cond is None else e + cond[:batch])

    def fold(self, z, cond):
        if self.config.normalize_input:   # (6) over C, H, W, unbiased, as the release computes it
            z = z / z.std(dim=(1, 2, 3), keepdim=True)
        return z, cond


def timestep_embedding(t: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """(4) The sinusoid of their integer step k - 1 (t = k / 1000), sin first, then cos."""
    step = (1000 * t.double()).round() - 1                          # exact
    return sinusoid(step, dim, dtype).roll(dim // 2, -1)


# --- (8) The discrete schedule ---
def squaredcos_cap_v2(num_steps: int = 1000) -> torch.Tensor:
    """diffusers' alpha_bar_k = prod_{j <= k} (1 - beta_j) at t = k / 1000 (Nichol & Dhariwal 2021's cosine,
    offset 0.008, betas capped at 0.999), in float64, stored in float32 as the releases' schedule was."""
    f = [math.cos((k / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2 for k in range(num_steps + 1)]
    betas = torch.tensor([0.0] + [min(1 - f[k + 1] / f[k], 0.999) for k in range(num_steps)], dtype=torch.float64)
    return torch.exp(torch.cumsum(torch.log1p(-betas), 0)).float()


ALPHA_BAR = squaredcos_cap_v2()


def discrete_logsnr(t: torch.Tensor, shift: float, power: float = 2.0) -> torch.Tensor:
    """The log-SNR of step k = round(1000 t), shifted per level as diffusion.py shifts the cosine: +inf
    at t = 0. The SNR is divided in float32, as the releases' tables were: their noise levels to the bit."""
    abar = ALPHA_BAR.to(t.device)[(1000 * t.double()).round().long().clamp(0, 1000)]
    if shift != 1:
        abar = 1 / (1 + 1 / (abar / (1 - abar) / shift ** power))
    abar = abar.double()
    return torch.log(abar) - torch.log1p(-abar)


class ReleasedDiffusion(MatryoshkaDiffusion):
    base_schedule = "squaredcos_cap_v2"

    def logsnr(self, t, level):
        return discrete_logsnr(t, self.shifts[level], self.config.shift_power)

    def training_times(self, u):
        return (u * 1000).ceil().clamp(1, 1000) / 1000          # a step k uniform in 1..1000

    def time_grid(self, num_inference_steps, sampler="ddpm"):
        """Their grid: steps round(i * 1001 / (N + 1)), i = N..0 (50 steps: 981, 962, ..., 20, 0)."""
        if sampler == "dpm++2m":
            return self.logsnr_grid(num_inference_steps)
        N = num_inference_steps
        steps = np.round(np.arange(N + 1) * (1001 / (N + 1)))[::-1].copy()     # numpy's round: half to even
        return torch.from_numpy(steps) / 1000

    def logsnr_grid(self, N):
        """The steps nearest to a grid even in log-SNR (repeats removed), then 0."""
        k = torch.arange(1, 1001, dtype=torch.float64)
        lam = self.logsnr(k / 1000, 0)                                 # decreasing in k
        targets = torch.linspace(float(lam[-1]), float(lam[0]), N + 1, dtype=torch.float64)
        steps = k[torch.searchsorted(-lam, -targets).clamp(max=999)].unique().flip(0)
        return torch.cat([steps / 1000, torch.zeros(1, dtype=torch.float64)])


# The releases: the authors' cc12m_64x64.yaml, cc12m_256x256.yaml, cc12m_1024x1024.yaml (their 256 px
# model shifts by "power" 1, in our power-2 names "shift2"), and their web demo's settings: guidance 7.5,
# 50 DDIM steps at 64 px, 100 at 256, 250 with eta 1 at 1024, DeepFloyd's thresholding.
KEYS = dict(emb_channels=1024, num_lm_attn_layers=0, lm_feature_projected_channels=2048, text_channels=2048)


def release64(**kw) -> ReleasedConfig:
    return released(mdm_s64(schedule="squaredcos_cap_v2"), **kw)


PRESETS = {
    "MDM-flickr64": lambda **kw: release64(**{**KEYS, **kw}),
    "MDM-flickr256": lambda **kw: outer_level(release64(), [256, 128, 64], [64, 128, 256], [2, 2, 1],
                                              "squaredcos_cap_v2-shift2", **{**KEYS, **kw}),
    "MDM-flickr1024": lambda **kw: outer_level(
        outer_level(release64(), [256, 128, 64], [64, 128, 256], [2, 2, 1], "squaredcos_cap_v2-shift4",
                    normalize_input=True),
        [1024, 512, 256], [32, 32, 64], [2, 2, 1], "squaredcos_cap_v2-shift16", **{**KEYS, **kw}),
}
RELEASES = {name: dict(preset=f"MDM-{name}",
                       sampling=dict(sampler="ddim", num_inference_steps=n, eta=eta, guidance_scale=7.5))
            for name, n, eta in (("flickr64", 50, 0.0), ("flickr256", 100, 0.0), ("flickr1024", 250, 1.0))}


def preset(name: str, **overrides) -> ReleasedConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the released models are: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


# --- Reading the checkpoint ---
class Stored:
    """An object the file names (their config classes, enums, numpy scalars): its data, nothing called."""
    fqn = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state):
        self.state = state


def pickle_globals(data: bytes) -> set[str]:
    """Every global ("module.name") a pickle names, read off its opcodes: nothing is unpickled."""
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.add(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return names


# What weights_only reads itself; everything else the file names (os.system too) becomes a Stored.
NATIVE = ("torch.", "collections.OrderedDict")


def plain(obj):
    """Stored objects -> dicts (with their class under "__class__"), recursively."""
    if isinstance(obj, Stored):
        state = obj.state if isinstance(obj.state, dict) else {}
        return {"__class__": obj.fqn, **({"__args__": [plain(a) for a in obj.args]} if obj.args else {}),
                **{k: plain(v) for k, v in state.items()}}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def read_checkpoint(path) -> tuple[dict, dict | None]:
    """-> (the state dict, the stored arguments as plain data or None); ValueError (not naming the file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            names = pickle_globals(zf.read(pkl))
    except (zipfile.BadZipFile, StopIteration, OSError) as e:
        raise ValueError(f"not a checkpoint of the released models (a torch zip file with a data.pkl): "
                         f"{type(e).__name__} {e}") from None
    stand_ins = [(type(n, (Stored,), {"fqn": n}), n) for n in sorted(names) if not n.startswith(NATIVE)]
    with torch.serialization.safe_globals(stand_ins):
        ckpt = load_torch_file(path, "checkpoint of the released models")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"holds no 'state_dict' (its keys: {keys}); expected the vis_model.pth of a released model")
    args = plain(ckpt.get("args"))
    return dict(ckpt["state_dict"]), args if isinstance(args, dict) else None


# --- Their tensors' names ---
RESBLOCK = {"emb_proj": "time_layer", "skip": "conv3"}        # our res block's names that theirs differ from


def official_names(model: NestedUNet) -> dict[str, str]:
    """Our state-dict key -> theirs, for every tensor. Their levels nest as `inner_unet.`, their paths are
    blocks per resolution (`down_blocks.i.resnets.j`, `.attn.k`, `.resample`), up_blocks.0 the lowest."""
    out = {}
    def block(ours, theirs, module):           # a res block or an attention block, by its own names
        for name in module.state_dict():
            head, _, tail = name.partition(".")
            out[f"{ours}.{name}"] = f"{theirs}.{RESBLOCK.get(head, head)}.{tail}"

    def stages(ours, theirs, modules, cfg, blocks_of, up):
        k, n = 0, len(cfg.resolution_channels)
        for b, i in enumerate(reversed(range(n)) if up else range(n)):
            attn = cfg.num_attn_layers_per_block[i]
            for j in range(blocks_of(i)):
                block(f"{ours}.{k}.0", f"{theirs}.{b}.resnets.{j}", modules[k][0])
                for m in range(attn):
                    block(f"{ours}.{k}.{1 + m}", f"{theirs}.{b}.attn.{j * attn + m}", modules[k][1 + m])
                k += 1
            if (i > 0) if up else (i < n - 1):  # the resampling conv between resolutions
                for p in ("weight", "bias"):
                    out[f"{ours}.{k}.0.conv.{p}"] = f"{theirs}.{b}.resample.{p}"
                k += 1

    def level(lvl, ours, theirs):
        cfg = lvl.config
        same = [(n, n) for n in ("conv_in", "norm_out", "conv_out", "in_adapter", "out_adapter")]   # alike
        for a, b in same + [("time_mlp.0", "temb_layer1"), ("time_mlp.2", "temb_layer2")]:
            for p in ("weight", "bias"):
                out[f"{ours}{a}.{p}"] = f"{theirs}{b}.{p}"
        stages(f"{ours}down", f"{theirs}down_blocks", lvl.down, cfg, lambda i: cfg.num_res_blocks[i], up=False)
        stages(f"{ours}up", f"{theirs}up_blocks", lvl.up, cfg, lambda i: cfg.num_res_blocks[i] + 1, up=True)
        if lvl.inner is not None:
            level(lvl.inner, f"{ours}inner.", f"{theirs}inner_unet.")
        else:                                   # the innermost UNet: its mid blocks, and the text
            for j, name in enumerate(("0.resnets.0", "0.attn.0", "1.resnets.0")):
                block(f"{ours}mid.0.{j}", f"{theirs}mid_blocks.{name}", lvl.mid[0][j])
            out[f"{ours}cond_embed.text_proj.weight"] = f"{theirs}lm_proj.weight"
            out[f"{ours}cond_embed.text_proj.bias"] = f"{theirs}lm_proj.bias"
            out[f"{ours}cond_embed.text_pool.weight"] = f"{theirs}cond_emb.weight"

    level(model, "", "")
    return {ours: out[ours] for ours in model.state_dict()}   # raises KeyError for a tensor not named


def convert(state: dict, config: ReleasedConfig, micro_scales: list[float] | None = None) -> dict:
    """Their state dict -> ours for `config`, strictly (ValueError lists what does not fit). Their micro-
    conditioning ("scale:64", an MLP per level), constant when sampling, is folded into the time bias."""
    model = ReleasedNestedUNet(config)
    levels, theirs, folded = model.levels(), dict(state), {}
    prefixes = ["inner_unet." * (len(levels) - 1 - i) for i in range(len(levels))]   # lowest level first
    scales = micro_scales or [lvl.config.resolutions[0] for lvl in levels]
    for lvl, prefix, scale in zip(levels, prefixes, scales):
        mlp = [theirs.pop(f"{prefix}cond_layers.scale.{i}.{p}", None) for i in (0, 1) for p in ("weight", "bias")]
        if any(m is None for m in mlp):
            raise ValueError(f"no micro-conditioning MLP '{prefix}cond_layers.scale' in the file: "
                             f"not a released model of this kind")
        w0, b0, w1, b1 = (m.double() for m in mlp)
        # Their value: the default scale itself (64.0, 256.0, 1024.0), in their sinusoid (sin, cos).
        feats = sinusoid(torch.tensor([float(scale)]), w0.shape[1], torch.float64).roll(w0.shape[1] // 2, -1)
        folded[prefix] = (F.silu(feats @ w0.T + b0) @ w1.T + b1)[0]
    ours, wrong, own = {}, [], model.state_dict()
    for key, their_key in official_names(model).items():
        if their_key not in theirs:
            wrong.append(f"{their_key} is missing")
            continue
        value, shape = theirs.pop(their_key), tuple(own[key].shape)
        if tuple(value.shape) not in (shape, shape + (1, 1)):
            wrong.append(f"{their_key} has shape {tuple(value.shape)}, ours {shape}")
            continue
        value = value.reshape(shape)
        prefix = next(p for p in sorted(prefixes, key=len, reverse=True) if their_key.startswith(p))
        if their_key == f"{prefix}temb_layer2.bias":
            value = (value.double() + folded[prefix]).to(value.dtype)
        ours[key] = value.float()
    wrong += [f"{k} has no place in this model" for k in theirs]
    if wrong:
        raise ValueError(f"the checkpoint does not fit the {len(levels)}-level model: {len(wrong)} problem(s), "
                         f"e.g. {'; '.join(wrong[:4])}")
    return ours


def detect(state: dict) -> str:
    """The release a state dict belongs to, from its nesting depth."""
    depth = max((k.count("inner_unet.") for k in state), default=0)
    name = {0: "flickr64", 1: "flickr256", 2: "flickr1024"}.get(depth)
    if name is None or "conv_in.weight" not in state:
        raise ValueError("the state dict is not that of a released model (no conv_in.weight, or nested "
                         f"{depth} levels deep)")
    return name


def check_arguments(args: dict | None, config):
    """The file's stored arguments against the model it is converted into: ValueError at a mismatch."""
    if args is None:
        return                                  # a file without arguments: the tensors decide
    levels, unet = config.levels()[::-1], args.get("unet_config") or {}    # highest first, as theirs
    for i, lvl in enumerate(levels):
        if unet.get("resolution_channels") != lvl.resolution_channels:
            raise ValueError(f"its stored arguments give level {i} (highest first) resolution_channels="
                             f"{unet.get('resolution_channels')}; the model it is converted into has "
                             f"{lvl.resolution_channels}")
        unet = unet.get("inner_config") or {}
    sampler = (args.get("diffusion_config") or {}).get("sampler_config") or {}
    # Their enums are stored as (class, value): ScheduleType.DEEPFLOYD = 3, PredictionType.V_PREDICTION = 5.
    for key, want, what in (("schedule_type", 3, "DEEPFLOYD (squaredcos_cap_v2)"),
                            ("prediction_type", 5, "V_PREDICTION")):
        got = sampler.get(key)
        got = got.get("__args__", [None])[0] if isinstance(got, dict) else got
        if got is not None and got != want:
            raise ValueError(f"its stored arguments give {key}={got}; the releases were trained with {what} ({want})")
    # Their SNR at r times the innermost resolution is divided by r^p, ours by s^2: s must be r^(p / 2).
    power = sampler.get("schedule_shifted_power")
    if power is not None and sampler.get("schedule_shifted", True):
        base = levels[-1].resolutions[0]
        for lvl in levels[:-1]:
            want = (lvl.resolutions[0] / base) ** (power / 2)
            if abs(parse_schedule(lvl.schedule, ReleasedDiffusion.base_schedule) - want) > 1e-6:
                raise ValueError(f"its stored arguments shift the {lvl.resolutions[0]} px level's SNR by "
                                 f"{(lvl.resolutions[0] / base) ** power:g} (schedule_shifted_power={power}); "
                                 f"the model it is converted into has {lvl.schedule}")
    text_model = args.get("text_model")
    if text_model is not None and "flan-t5-xl" not in str(text_model):
        raise ValueError(f"its stored arguments give the text model {text_model}; the releases used google/flan-t5-xl")


def micro_scales(args: dict | None, levels: int) -> list[float] | None:
    """Each level's "scale:N" micro-conditioning in the stored arguments, lowest first (None: resolutions)."""
    if args is None:
        return None
    out, unet = [], args.get("unet_config") or {}
    while unet:
        spec = dict(p.split(":") for p in str(unet.get("micro_conditioning", "")).split(",") if ":" in p)
        out.append(float(spec["scale"]) if "scale" in spec else None)
        unet = unet.get("inner_config") or {}
    return out[::-1] if len(out) == levels and None not in out else None


# --- (9) Their tokenisation of prompts (data.TextEncoder(split=mdm_splitter)) ---
def unigram_pieces(tokenizer) -> dict[str, tuple[int, float]]:
    """A T5 tokenizer's SentencePiece vocabulary: piece ("\u2581" as a space) -> (id, -log p)."""
    if hasattr(tokenizer, "sp_model"):             # the slow tokenizer: the sentencepiece model itself
        sp = tokenizer.sp_model
        vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    else:                                           # the fast one: its Unigram model, as JSON
        model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        if model.get("type") != "Unigram":
            raise ValueError(f"tokenization 'ml-mdm' needs a T5 (SentencePiece unigram) tokenizer, "
                             f"not {model.get('type')}")
        vocab = [tuple(v) for v in model["vocab"]]
    pieces = {p.replace("\u2581", " "): (i, -score) for i, (p, score) in enumerate(vocab)}
    for token, i in tokenizer.get_added_vocab().items():   # <extra_id_N>: in their vocabulary file too
        pieces.setdefault(token.replace("\u2581", " "), (i, 0.0))
    return pieces


def mdm_token_ids(text: str, pieces: dict, max_length: int = 128, max_chars: int = 512) -> list[int]:
    """A caption's token ids as their code computed them: a leading space, the unigram model's likeliest split
    (dynamic programming), uncovered characters dropped, the end id 1, all cut to `max_length` (a long caption
    loses its end id). Hugging Face's T5 tokenizer differs on the empty prompt (guidance's: [1], here [3, 1]),
    extra spaces, characters outside the vocabulary, and text that NFKC would normalise."""
    s = " " + text[:max_chars]
    longest = max(len(p) for p in pieces)
    best, back = [0.0] + [math.inf] * len(s), [None] * (len(s) + 1)     # best[j]: cost of s[:j]
    for i in range(len(s)):
        if best[i] == math.inf:
            continue
        matched = False
        for j in range(i + 1, min(len(s), i + longest) + 1):
            hit = pieces.get(s[i:j])
            if hit is not None:
                matched = True
                if best[i] + hit[1] < best[j]:
                    best[j], back[j] = best[i] + hit[1], (i, hit[0])
        if not matched and best[i] < best[i + 1]:  # a character no piece starts with: dropped
            best[i + 1], back[i + 1] = best[i], (i, None)
    ids, j = [], len(s)
    while j > 0:
        j, token = back[j]
        if token is not None:
            ids.append(token)
    return (ids[::-1] + [1])[:max_length]


def mdm_splitter(tokenizer, max_length: int = 128):
    """A T5 tokenizer's caption -> token ids, as the released models' code split them."""
    pieces = unigram_pieces(tokenizer)
    return lambda caption: mdm_token_ids(caption, pieces, max_length)


def run_metadata(name: str, config: ReleasedConfig, text_encoder: str = "google/flan-t5-xl") -> dict:
    """What sample.py reads: the configs, the text encoder and its tokenisation, the demo's sampling."""
    return {"model_config": config.to_dict(), "diffusion_config": vars(DiffusionConfig(thresholding="deepfloyd")),
            "cond": "text", "text_encoder": text_encoder, "text_tokenization": "ml-mdm", "class_names": None,
            "data": None, "video": False, "release": name, "sampling": RELEASES[name]["sampling"], "step": 0}


def convert_file(path, out, name: str | None = None, config=None, text_encoder: str = "google/flan-t5-xl") -> Path:
    """A downloaded vis_model.pth -> run folder `out` (ema.safetensors); `config`: another of its kind."""
    state, args = read_checkpoint(path)
    found = detect(state)
    if name is not None and name != found:
        raise ValueError(f"--release {name}: the file holds the {found} model")
    config = config or preset(RELEASES[found]["preset"])
    check_arguments(args, config)
    weights = convert(state, config, micro_scales(args, len(config.levels())))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "ema.safetensors", weights, run_metadata(found, config, text_encoder))
    return out


def main(argv=None):
    p = ArgumentParser(prog="tools/release.py", description=__doc__.strip().split("\n\n")[0],
                       epilog="download: " + URL.format(name="flickr64 | flickr256 | flickr1024"))
    p.add_argument("checkpoint", help="a downloaded vis_model.pth")
    p.add_argument("--out", required=True, help="the run folder to write (sample.py --ckpt reads it)")
    p.add_argument("--release", choices=list(RELEASES), default=None,
                   help="which model the file must be (default: read off the file)")
    a = p.parse_args(argv)
    try:
        out = convert_file(a.checkpoint, a.out, a.release)
    except ValueError as e:
        raise SystemExit(f"tools/release.py: {a.checkpoint}: {e}")
    print(f"wrote {out}/ema.safetensors; sample with: python sample.py --ckpt {out} \"a panda playing guitar\"")


if __name__ == "__main__":
    main()
