"""
A trained model, ready to draw: the one place where a run is found, its weights are read and
written, its model, diffusion process and text encoder are rebuilt from the metadata, and
images are generated from it (also many, into a folder: write_folder). sample.py,
evaluate.py, video.py, train.py's sample grids and the web demo all go through here.

A run folder (train.py's, or a released model converted by release.py) holds
ema.safetensors: the EMA weights, and in the safetensors metadata everything needed to use
them: the model's config, the diffusion's, the condition ("text", "label" or "none"), the
text encoder and its tokenisation, class names, and optionally the sampling settings the
model is meant for (the released models': their demo's).

    pipe = Pipeline("runs/<name>")                 # None: the newest run in runs/
    cond = pipe.condition(prompts=["a red heart"])
    levels = pipe.generate(cond, num_images=1)     # [(1, 3, 16, 16), (1, 3, 32, 32)]: every resolution
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
import utils
from diffusion import DiffusionConfig, MatryoshkaDiffusion
from nested_unet import NestedUNet, NestedUNetConfig

# Appendix C's sampling, for a run whose metadata names no settings of its own: 250 DDPM
# steps, classifier-free guidance 3 (ours), no extra DDIM noise. Each can be overridden.
SAMPLING = dict(sampler="ddpm", num_inference_steps=250, guidance_scale=3.0, eta=0.0)


# ---------------------------------------------------------------------------------------
# The weights format: safetensors, with the config in the metadata
# ---------------------------------------------------------------------------------------

def save_weights(path, state_dict: dict, meta: dict):
    """Weights for sampling as safetensors (tensors and a JSON header, nothing that runs when
    read), with everything needed to rebuild and use the model in the metadata (k-diffusion's
    convert_for_inference does the same). Written atomically."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}
    header = {k: json.dumps(v) for k, v in meta.items()}
    utils.atomic_save(tensors, path, lambda t, p: save_file(t, str(p), metadata=header))


def read_metadata(path) -> dict:
    """The metadata of an ema.safetensors file, decoded. Raises ValueError for a damaged file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as e:                         # SafetensorError, JSONDecodeError, OSError
        raise ValueError(f"{path}: not a readable safetensors file of weights (truncated or damaged? "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def load_weights(path, model_class=None, device="cpu"):
    """Rebuild the model stored in an ema.safetensors file from the config in its metadata, and
    load its weights strictly. Returns (model in eval mode, metadata dict). Raises ValueError
    with what does not fit."""
    from safetensors.torch import load_file
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file of weights (truncated or damaged? "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if "model_config" not in meta:
        raise ValueError(f"{path} has no model config in its metadata: it was not written by train.py")
    try:
        config = NestedUNetConfig(**meta["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its model config does not fit this version of the code: {e}") from None
    if model_class is None:
        model_class = NestedUNet
        if meta.get("video"):                      # video.py builds the levels with a time axis
            import video
            model_class = video.build_level
    model = model_class(config)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"the weights in {path} do not match this version of the model code: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})")
    model.load_state_dict(state)
    return model.to(device, memory_format=utils.memory_format("auto", device, config.frames)).eval(), meta


# ---------------------------------------------------------------------------------------
# Finding a run
# ---------------------------------------------------------------------------------------

def find_weights(ckpt=None, runs="runs", video: bool | None = None, name: str = "ema.safetensors",
                 flag: str = "--ckpt") -> Path:
    """A run's file `name` (its EMA weights, or train.py's checkpoint.pt): `ckpt` is a run
    folder or the file; None means the newest run in `runs/` (of video models only, or of
    image models only, if `video` says so). Raises FileNotFoundError with what to do instead."""
    if ckpt is not None:
        path = Path(ckpt)
        path = path / name if path.is_dir() else path
        if not path.exists():
            where = f"no {name} in that folder" if Path(ckpt).is_dir() else "no such file or folder"
            raise FileNotFoundError(f"{flag} {ckpt}: {where} (expected a run folder with {name}, or the file)")
        return path
    # "Newest" is the run whose file was written last: train.py rewrites both at every
    # checkpoint, so a run still training (or just resumed) counts as the newest.
    found = sorted(Path(runs).glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    if video is not None:
        found = [p for p in found if bool(_metadata_or_empty(p.with_name("ema.safetensors")).get("video")) == video]
    if not found:
        what, how = ("video model", "`python train.py --config CPU-S16T8 --data emoji-motion --res 16,8x16`") \
            if video else ("weights", "`python train.py` (about 15 minutes on a laptop CPU)")
        if name != "ema.safetensors":
            raise FileNotFoundError(f"no run with a {name} in {runs}/")
        raise FileNotFoundError(f"no trained {what} found in {runs}/. Train one first: {how}, or point "
                                f"{flag} at a run folder or an ema.safetensors file")
    return found[-1]


def _metadata_or_empty(path) -> dict:
    try:
        return read_metadata(path)
    except ValueError:                             # a damaged file is nobody's newest run
        return {}


# ---------------------------------------------------------------------------------------
# Generating: the one wrapper of diffusion.sample
# ---------------------------------------------------------------------------------------

def generate(model, diffusion, cond, num_images, sampler="ddpm", num_inference_steps=250, guidance_scale=3.0,
             eta=0.0, negative_cond=None, thresholding=None, seed=0, generator=None, progress=False,
             callback=None, device=None):
    """Images at every resolution (lowest first, float32, on the device) for `cond`, which
    holds one condition per image. The same seed on the same device gives the same images (or
    pass a `generator` to draw on). callback(i, t, zs, x_preds) after every step (a progress
    bar with progress=True)."""
    device = device or next(model.parameters()).device
    bar = tqdm(total=num_inference_steps, desc=f"{sampler} x{num_images}", disable=not progress, leave=False)

    def step_done(i, t, zs, x_preds):
        bar.update(1)
        if callback is not None:
            callback(i, t, zs, x_preds)

    # Appendix C: every resolution from its own noise, all denoised together. The generator
    # lives on the device (CPU and CUDA draw different numbers).
    levels = diffusion.sample(model, cond, batch_size=num_images, sampler=sampler,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              negative_cond=negative_cond, thresholding=thresholding, eta=eta,
                              generator=generator or torch.Generator(device).manual_seed(seed), device=device,
                              callback=step_done)
    bar.close()
    # The last step's predicted x of every level, in [-1, 1] when thresholded. Without
    # thresholding values may stray outside: what saves or measures images clamps them.
    return levels


def expand(cond: dict, n: int) -> dict:
    """k conditions -> each repeated n times (k * n rows, condition by condition: c0, c0, ...,
    c1, c1, ...), e.g. text (k, L, D) -> (k * n, L, D)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


class Pipeline:
    """A trained run with what it needs to turn prompts or labels into images: the model, its
    diffusion process (the schedules it was trained with), its frozen text encoder, its class
    names and its sampling settings. Errors (no run, a damaged file, an unknown label) are
    ValueError or FileNotFoundError with a message for a person."""

    def __init__(self, ckpt=None, device="cpu", runs="runs", video: bool | None = None, text_encoder=None):
        self.path = find_weights(ckpt, runs, video)
        self.model, self.meta = load_weights(self.path, device=device)
        self.device, self.kind = torch.device(device), self.meta["cond"]     # "text", "label" or "none"
        self.is_video = bool(self.meta.get("video"))
        self.diffusion = self.diffusion_for(self.model, DiffusionConfig(**self.meta["diffusion_config"]))
        self.class_names = self.meta.get("class_names")
        # The settings the model is meant to be sampled with (the released models': their demo's).
        self.sampling = {**SAMPLING, **self.meta.get("sampling", {})}
        self.encoder = None
        if self.kind == "text":
            # The frozen encoder of training, by name (or a local copy of it): the network knows
            # its features and no other's, tokenised as in training.
            name = text_encoder or self.meta["text_encoder"]
            try:
                self.encoder = data.TextEncoder(name, device=device,
                                                tokenization=self.meta.get("text_tokenization", "hf"))
            except ValueError as e:
                raise ValueError(f"{self.path} was trained with a text encoder that cannot be loaded "
                                 f"here: {e}") from None

    def diffusion_for(self, model, config):
        if self.is_video:
            import video
            return video.diffusion_for(model, config)
        return MatryoshkaDiffusion.for_model(model, config)

    def condition(self, prompts: list[str] | None = None, labels: list | None = None) -> dict:
        """Prompts or labels (indices or class names) -> the model's condition dict, one row each."""
        if self.kind == "text":
            if labels is not None or prompts is None:
                raise ValueError("this model is text-conditional: give a prompt, e.g. python sample.py \"a panda\"")
            # {"text": (k, L, D) token features, "text_mask": (k, L) when a prompt is padded}
            return self.encoder.condition(prompts, self.device)
        if self.kind == "label":
            if prompts is not None or labels is None:
                raise ValueError(f"this model is class-conditional: use --label with a class index or name: "
                                 f"{self.class_list()}")
            return {"label": torch.tensor([self.label_index(v) for v in labels], device=self.device)}
        if prompts is not None or labels is not None:
            raise ValueError("this model is unconditional: give neither a prompt nor a label")
        return {}                                  # unconditional: no condition, and no guidance either

    def class_list(self) -> str:
        return ", ".join(f"{i} {n}" for i, n in enumerate(self.class_names or []))

    def class_name(self, value) -> str:
        """A class given by its name (in any case) or its index -> its name, as the data names it."""
        return self.class_names[self.label_index(value)]

    def label_index(self, value) -> int:
        """A class given by its name (in any case) or its index -> the index."""
        value = str(value).strip()
        lowered = [n.lower() for n in self.class_names]
        if value.lower() in lowered:
            return lowered.index(value.lower())
        if not value.lstrip("-").isdigit():
            raise ValueError(f"--label {value!r} is not a class of this model: {self.class_list()}")
        i = int(value)
        if not 0 <= i < len(self.class_names):
            raise ValueError(f"--label {i} is out of range: this model has {len(self.class_names)} classes: "
                             f"{self.class_list()}")
        return i

    def negative_condition(self, n: int, negative_prompt: str | None = None) -> dict | None:
        """What guidance contrasts with, n rows: the negative prompt's condition; for a model
        whose null text is the empty prompt (the released models), the encoded empty prompt;
        otherwise None (the model's own null condition, diffusion.predict_v)."""
        if negative_prompt is not None:
            if self.kind != "text":
                raise ValueError("a negative prompt needs a text-conditional model")
            return expand(self.condition(prompts=[negative_prompt]), n)
        if self.kind == "text" and self.model.config.null_text == "empty_prompt":
            return expand(self.condition(prompts=[""]), n)
        return None

    def generate(self, cond: dict, num_images: int, seed: int = 0, negative_prompt: str | None = None,
                 progress=False, callback=None, **overrides) -> list:
        """Images at every resolution for `cond` (num_images rows), with the run's sampling
        settings unless overridden (sampler, num_inference_steps, guidance_scale, eta,
        thresholding). Autocast as in training (utils.autocast: bf16 on GPUs that have it, fp16 on
        those that do not, fp32 on CPUs); the sampler's state stays float32."""
        settings = {**self.sampling, **{k: v for k, v in overrides.items() if v is not None}}
        with utils.autocast(self.device):
            return generate(self.model, self.diffusion, cond, num_images, seed=seed, progress=progress,
                            callback=callback, negative_cond=self.negative_condition(num_images, negative_prompt),
                            device=self.device, **settings)


class SampleGrid:
    """The sample grids of a training run: the EMA model (what sample.py will use), guided,
    with DDIM and a fixed seed, on a fixed condition (8 of the data's captions, or every class
    in turn): the grids of successive steps start from the same noise and differ by training
    alone. A matryoshka figure of every level (video: the frames of every level, and a GIF)."""

    def __init__(self, cond_kind: str, captions, class_names, encoder, device, steps: int, guidance: float,
                 prompts: list[str] | None = None, n=8):
        """prompts: what to draw instead (for a class-conditional model, class names or
        indices); raises ValueError for a class the model does not have."""
        self.captions, self.steps, self.guidance = None, steps, guidance
        if cond_kind == "text":
            pool = captions or ["a smiling face", "a red heart", "a cat", "a rocket"]
            self.captions = prompts or ([pool[i] for i in np.random.default_rng(0).choice(len(pool), n, replace=False)]
                                        if len(pool) >= n else pool)
            self.cond = encoder.condition(self.captions, device)
        elif cond_kind == "label":
            lowered = [c.lower() for c in class_names]
            labels = torch.arange(n) % len(class_names)
            if prompts:
                bad = [p for p in prompts if p.lower() not in lowered and not (p.isdigit() and int(p) < len(lowered))]
                if bad:
                    raise ValueError(f"{bad[0]!r} is not a class of this data set: {', '.join(class_names)}")
                labels = torch.tensor([lowered.index(p.lower()) if p.lower() in lowered else int(p) for p in prompts])
            self.captions, self.cond = [class_names[i] for i in labels], {"label": labels.to(device)}
        else:
            self.cond = {}
        self.n = len(self.captions or [0] * n)

    def save(self, model, diffusion, path: Path, autocast) -> Path:
        """The grid of this step at `path` (.png; for video also .gif). Returns the picture's path."""
        with autocast:
            levels = generate(model, diffusion, self.cond, self.n, sampler="ddim", num_inference_steps=self.steps,
                              guidance_scale=self.guidance, seed=0)
        if model.config.frames > 1:
            import video
            video.save_levels_figure(levels, path.with_suffix(".png"))
            video.save_gif(levels[-1], path.with_suffix(".gif"))
        else:
            utils.save_matryoshka(levels, path.with_suffix(".png"), captions=self.captions)
        return path.with_suffix(".png")


def write_folder(pipe: Pipeline, lines: list[str], out: Path, num_images: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, **kw):
    """Many images into a folder (for evaluation, sample.py --prompts-file), and a captions
    file: the lines (labels, prompts, or anything for an unconditional model) cycled to
    `num_images` images, each used at least once, drawn in batches of `batch_size`. Each of
    `world` processes draws its own whole batches; kw: generate's sampling settings. A line
    that is no condition of this model raises ValueError."""
    items = [lines[i % len(lines)] for i in range(max(num_images, len(lines)))]
    out.mkdir(parents=True, exist_ok=True)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    mine = list(range(rank, len(batches), world))   # whole batches per process: same images for any world size
    # One captions file per process (no two write to one file), begun afresh by each run.
    with open(out / f"captions-{rank}.jsonl", "w") as captions:
        for b in tqdm(mine, disable=rank != 0, desc="batches"):
            texts = batches[b]
            # A line is a label (index or name) or a prompt; an unconditional model ignores
            # it but still draws an image for it.
            cond = pipe.condition(**({"labels": texts} if pipe.kind == "label" else
                                     {"prompts": texts} if pipe.kind == "text" else {}))
            # Batch b's seed comes from the seed and b alone (1_000_003 exceeds any batch
            # count, so no two (seed, b) collide): an image never depends on the number
            # of processes. (On a CPU the threads per process, which torchrun sets to 1, can
            # still move a pixel by one level: sums split differently over threads.)
            imgs = pipe.generate(cond, len(texts), seed=seed * 1_000_003 + b, **kw)[-1]   # the top level
            for j, (img, text) in enumerate(zip(utils.to_uint8(imgs), texts)):   # uint8 (H, W, 3) each
                i = b * batch_size + j         # the image's index in `items`: file names never collide
                Image.fromarray(img).save(out / f"{i:06d}.png")
                captions.write(json.dumps({"file": f"{i:06d}.png", "prompt": text}) + "\n")
    return items
