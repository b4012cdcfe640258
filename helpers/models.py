"""The project's models, built and loaded in one place: the NestedUNet, its video levels (video.py) and the
released models (tools/release.py), each with its diffusion; configs; a trained run read back (Trained).

    run = Trained("runs/<name>", device)            # None: the newest run in runs/
    cond = run.condition(prompts=["a red heart"])
    levels = run.diffusion.sample(run.model, cond, **run.settings())   # every resolution
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import data
import video
from diffusion import DiffusionConfig, MatryoshkaDiffusion
from helpers.devices import prepare
from helpers.files import find_weights, read_weights
from nested_unet import PRESETS, NestedUNet, NestedUNetConfig, preset
import tools.release as release

# Appendix C's sampling where a run's metadata names none: 250 DDPM steps, guidance 3 (ours), eta 0.
SAMPLING = dict(sampler="ddpm", num_inference_steps=250, guidance_scale=3.0, eta=0.0)


def preset_names() -> list[str]:
    return list(PRESETS) + list(video.VIDEO_PRESETS) + list(release.PRESETS)


def load_model_config(name: str) -> NestedUNetConfig:
    """A preset of nested_unet.py, video.py or tools/release.py, or a JSON file of a config's to_dict()."""
    if name.endswith(".json"):
        try:
            return config_from_dict(json.loads(Path(name).read_text()))
        except OSError as e:
            raise ValueError(f"--config {name}: cannot read it ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--config {name}: not valid JSON ({e})") from None
        except (TypeError, ValueError) as e:           # unknown keys, or values the config refuses
            raise ValueError(f"--config {name}: not a NestedUNet config: {e}") from None
    for presets, make in ((PRESETS, preset), (video.VIDEO_PRESETS, video.preset), (release.PRESETS, release.preset)):
        if name in presets:
            return make(name)
    raise ValueError(f"--config {name}: not a JSON file and not a preset; the presets are {', '.join(preset_names())}")


# Architecture keys of files from before the released models became their own variant (2026-12): ours.
LEGACY = dict(strided_downsample=False, separate_cross_attention=False, mask_cross_attention=True,
              attention_ffn="layernorm", level_time_embedding=False, text_pool_bias=True, timestep_features="cos,sin",
              timestep_offset=0, normalize_input=False, null_text="mask")


def config_from_dict(d: dict) -> NestedUNetConfig:
    """A config from its to_dict(): ours, or the released models' (release.ReleasedConfig)."""
    d = dict(d)                                    # its own copy: "architecture" is popped
    released = d.pop("architecture", None) == "released" or d.get("level_time_embedding") is True
    def strip(level: dict) -> dict:
        level = {k: v for k, v in level.items() if k not in LEGACY or (released and k == "normalize_input")}
        if level.get("inner_config"):
            level["inner_config"] = strip(level["inner_config"])
        return level
    return (release.ReleasedConfig if released else NestedUNetConfig)(**strip(d))


def build_model(config: NestedUNetConfig) -> NestedUNet:
    """The model of a config: the released models' variant, a video model's levels, or ours."""
    if isinstance(config, release.ReleasedConfig):
        return release.ReleasedNestedUNet(config)
    if any(c.temporal_axis for c in config.levels()):
        return video.build_level(config)
    return NestedUNet(config)


def build_diffusion(model: NestedUNet, config: DiffusionConfig | None = None, clips: bool = False):
    """The model's diffusion process: the released models' discrete schedule, or for video (also the image
    stage of a video run: `clips`) the video D^r, first-frame indexing in time."""
    if isinstance(model, release.ReleasedNestedUNet):
        return release.ReleasedDiffusion.for_model(model, config)
    if clips or model.config.frames > 1:
        return video.diffusion_for(model, config)
    return MatryoshkaDiffusion.for_model(model, config)


def text_encoder(name: str, device="cpu", tokenization: str = "hf", **kw) -> data.TextEncoder:
    """A frozen text encoder; tokenization "ml-mdm" splits prompts as the released models' code did."""
    if tokenization not in ("hf", "ml-mdm"):
        raise ValueError(f"tokenization={tokenization!r}: expected 'hf' or 'ml-mdm'")
    split = release.mdm_splitter if tokenization == "ml-mdm" else None
    return data.TextEncoder(name, device=device, split=split, **kw)


def load_weights(path, device="cpu"):
    """An ema.safetensors file -> (its model from its metadata's config, weights loaded strictly, in eval mode,
    prepared for `device`; the metadata). Raises ValueError with what does not fit."""
    state, meta = read_weights(path)
    if "model_config" not in meta:
        raise ValueError(f"{path} has no model config in its metadata: it was not written by train.py")
    try:
        model = build_model(config_from_dict(meta["model_config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its model config does not fit this version of the code: {e}") from None
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"the weights in {path} do not match this version of the model code: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})")
    model.load_state_dict(state)
    return prepare(model, device).eval(), meta


def expand(cond: dict, n: int) -> dict:
    """k conditions -> each repeated n times (c0, c0, ..., c1, c1, ...), e.g. text (k, L, D) -> (k * n, L, D)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


class Trained:
    """A trained run: model, diffusion process, text encoder, class names, sampling settings (errors: ValueError
    or FileNotFoundError, said for a person)."""
    def __init__(self, ckpt=None, device="cpu", runs="runs", video: bool | None = None, text_encoder_path=None):
        self.path = find_weights(ckpt, runs, video)
        self.model, self.meta = load_weights(self.path, device=device)
        self.device, self.kind = torch.device(device), self.meta["cond"]     # "text", "label" or "none"
        self.is_video, self.class_names = bool(self.meta.get("video")), self.meta.get("class_names")
        self.diffusion = build_diffusion(self.model, DiffusionConfig(**self.meta["diffusion_config"]))
        # The released models' activations exceed fp16's range (ml-mdm issue 69: NaN at 1024 px).
        self.fp16_ok = not isinstance(self.model, release.ReleasedNestedUNet)
        self.sampling = {**SAMPLING, **self.meta.get("sampling", {})}      # the released models': their demo's
        self.encoder = None
        if self.kind == "text":
            # Training's frozen encoder (or a local copy), tokenised alike: the network knows no other's features.
            try:
                self.encoder = text_encoder(text_encoder_path or self.meta["text_encoder"], device,
                                            self.meta.get("text_tokenization", "hf"))
            except ValueError as e:
                raise ValueError(f"{self.path} was trained with a text encoder that cannot be loaded "
                                 f"here: {e}") from None

    def settings(self, **overrides) -> dict:
        """The run's sampling settings, with the given ones (those not None) instead."""
        return {**self.sampling, **{k: v for k, v in overrides.items() if v is not None}}

    def condition(self, prompts: list[str] | None = None, labels: list | None = None, repeat: int = 1) -> dict:
        """Prompts or labels (indices or class names) -> the model's condition dict, each row `repeat` times."""
        if self.kind == "text":
            if labels is not None or prompts is None:
                raise ValueError("this model is text-conditional: give a prompt, e.g. python sample.py \"a panda\"")
            return expand(self.encoder.condition(prompts, self.device), repeat)      # text (k, L, D), text_mask
        if self.kind == "label":
            if prompts is not None or labels is None:
                raise ValueError(f"this model is class-conditional: use --label with a class index or name: "
                                 f"{self.class_list()}")
            return expand({"label": torch.tensor([self.label_index(v) for v in labels], device=self.device)}, repeat)
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
        """Guidance's contrast, n rows: the negative prompt; the empty prompt if it is the null text; else None."""
        if negative_prompt is not None:
            if self.kind != "text":
                raise ValueError("a negative prompt needs a text-conditional model")
            return self.condition(prompts=[negative_prompt], repeat=n)
        if self.kind == "text" and self.model.null_text == "empty_prompt":
            return self.condition(prompts=[""], repeat=n)
        return None
