"""
Sample images from a trained Matryoshka Diffusion Model (appendix C).

All resolutions start from their own Gaussian noise and are denoised together by the
NestedUNet; the paper uses 250 DDPM steps, classifier-free guidance and Imagen's dynamic
thresholding, and so do we by default. Besides a grid of the final images, every run writes
a "matryoshka" figure with every nested resolution of each sample.

    python sample.py "red heart"                            # newest run in runs/, 4 images
    python sample.py "red heart" "grinning face" "fire"     # 4 images of each
    python sample.py "a red heart" --num-images 16 --guidance-scale 5 --seed 1
    python sample.py "a cat" --sampler ddim --num-inference-steps 50 --show-steps
    python sample.py --label sandal                         # a class-conditional model
    python sample.py --ckpt runs/<name> "a rocket" --negative-prompt "a face"
Many images for evaluation, into a folder, in batches (one process, or one per GPU):
    torchrun --nproc_per_node=8 sample.py --prompts-file prompts.txt --out-dir gen/ --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import data
from diffusion import DiffusionConfig, MatryoshkaDiffusion
from nested_unet import load_weights


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", default=None, help="what to draw (text-conditional models); "
                   "several prompts: --num-images of each")
    p.add_argument("--label", default=None, help="class index or name (class-conditional models)")
    p.add_argument("--ckpt", default=None, help="a run folder or an ema.safetensors file "
                   "(default: the newest run in runs/)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance; 1: none")
    p.add_argument("--negative-prompt", default=None, help="guide away from this instead of the null condition")
    p.add_argument("--num-inference-steps", type=int, default=250)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dynamic-thresholding", action="store_true")
    p.add_argument("--show-steps", action="store_true", help="also draw the denoising of every resolution over time")
    p.add_argument("--out", default=None, help="output file prefix (default: samples/<prompt>)")
    p.add_argument("--prompts-file", default=None, help="one prompt (or label) per line: many images into --out-dir")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def fail(msg):
    raise SystemExit(f"sample.py: {msg}")


# ---------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------

def find_weights(ckpt: str | None, runs="runs") -> Path:
    """The EMA weights of --ckpt (a run folder or a file), or of the newest run."""
    if ckpt is not None:
        path = Path(ckpt)
        path = path / "ema.safetensors" if path.is_dir() else path
        if not path.exists():
            fail(f"--ckpt {ckpt}: no such file (expected a run folder with ema.safetensors, or the file)")
        return path
    found = sorted(Path(runs).glob("*/ema.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        fail(f"no trained weights found in {runs}/. Train a model first: `python train.py` "
             f"(about 15 minutes on a laptop CPU), or point --ckpt at an ema.safetensors file")
    return found[-1]


class Pipeline:
    """A trained model with what it needs to turn a prompt or label into a condition."""

    def __init__(self, path, device):
        try:
            self.model, self.meta = load_weights(path, device=device)
        except ValueError as e:
            fail(str(e))
        if self.model.config.temporal_axis or self.meta.get("video"):
            fail(f"{path} is a video model: sample it with `python video.py sample \"...\"`")
        self.diffusion = MatryoshkaDiffusion.for_model(self.model, DiffusionConfig(**self.meta["diffusion_config"]))
        self.kind, self.device = self.meta["cond"], device
        self.encoder = data.TextEncoder(self.meta["text_encoder"], device=device) if self.kind == "text" else None
        self.class_names = self.meta.get("class_names")

    def condition(self, prompts: list[str] | None = None, labels: list | None = None) -> dict:
        """Prompts or labels (indices or class names) -> the model's condition dict."""
        if self.kind == "text":
            if labels is not None or prompts is None:
                fail("this model is text-conditional: give a prompt, e.g. python sample.py \"a panda\"")
            return self.encoder.condition(prompts, self.device)
        if self.kind == "label":
            names = ", ".join(f"{i} {n}" for i, n in enumerate(self.class_names))
            if prompts is not None or labels is None:
                fail(f"this model is class-conditional: use --label with a class index or name: {names}")
            return {"label": torch.tensor([self.label_index(v, names) for v in labels], device=self.device)}
        if prompts is not None or labels is not None:
            fail("this model is unconditional: give neither a prompt nor a label")
        return {}

    def label_index(self, value, names) -> int:
        value = str(value).strip()
        lowered = [n.lower() for n in self.class_names]
        if value.lower() in lowered:
            return lowered.index(value.lower())
        if not value.lstrip("-").isdigit():
            fail(f"--label {value!r} is not a class of this model: {names}")
        i = int(value)
        if not 0 <= i < len(self.class_names):
            fail(f"--label {i} is out of range: this model has {len(self.class_names)} classes: {names}")
        return i


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------

def generate(model, diffusion, cond, num_images, sampler="ddpm", num_inference_steps=250, guidance_scale=3.0,
             negative_cond=None, dynamic_thresholding=True, seed=0, progress=True, snapshots=0, device=None):
    """Images at every resolution (lowest first) for one condition (batched). The same seed
    gives the same images. With snapshots=k, also returns the predicted x of every
    resolution at k moments of the denoising (the paper's Fig. 11)."""
    if num_inference_steps < 1:
        fail(f"--num-inference-steps {num_inference_steps}: need at least 1 step")
    device = device or next(model.parameters()).device
    bar = tqdm(total=num_inference_steps, desc=f"{sampler} x{num_images}", disable=not progress, leave=False)
    marks = {round(i * (num_inference_steps - 1) / max(1, snapshots - 1)) for i in range(snapshots)}
    frames = []

    def callback(i, t, zs, x_preds):
        bar.update(1)
        if i in marks:
            frames.append((t, [x[:1].cpu() for x in x_preds]))

    levels = diffusion.sample(model, cond, batch_size=num_images, sampler=sampler,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              negative_cond=negative_cond, dynamic_thresholding=dynamic_thresholding,
                              generator=torch.Generator(device).manual_seed(seed), device=device,
                              callback=callback)
    bar.close()
    return (levels, frames) if snapshots else levels


def expand(cond: dict, n: int) -> dict:
    """k conditions -> each repeated n times (k * n images, condition by condition)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def save_steps_figure(frames, path):
    """Rows: resolutions; columns: moments of the denoising, t = 1 -> 0 (the paper's Fig. 11)."""
    cols = [torch.cat([lv[r] for _, lv in frames]) for r in range(len(frames[0][1]))]
    data.save_matryoshka(cols, path, captions=[f"t={t:.2f}" for t, _ in frames])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "sample"


def main(argv=None):
    args = parse_args(argv)
    if args.num_inference_steps < 1:
        fail(f"--num-inference-steps {args.num_inference_steps}: need at least 1 step")
    if args.num_images < 1:
        fail(f"--num-images {args.num_images}: need at least 1")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    pipe = Pipeline(find_weights(args.ckpt), device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    kw = dict(sampler=args.sampler, num_inference_steps=args.num_inference_steps,
              guidance_scale=args.guidance_scale, dynamic_thresholding=not args.no_dynamic_thresholding)

    if args.prompts_file:                          # many images into a folder
        lines = [l.strip() for l in Path(args.prompts_file).read_text().splitlines() if l.strip()]
        items = [lines[i % len(lines)] for i in range(max(args.num_images, len(lines)))]
        out = Path(args.out_dir or "generated")
        out.mkdir(parents=True, exist_ok=True)
        batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
        mine = list(range(rank, len(batches), world))   # whole batches per process: same images for any world size
        for b in tqdm(mine, disable=rank != 0, desc="batches"):
            texts = batches[b]
            cond = pipe.condition(**({"labels": texts} if pipe.kind == "label" else
                                     {"prompts": texts} if pipe.kind == "text" else {}))
            with autocast:
                imgs = generate(pipe.model, pipe.diffusion, cond, len(texts), seed=args.seed * 1_000_003 + b,
                                progress=False, device=device, **kw)[-1]
            for j, (img, text) in enumerate(zip(data.to_uint8(imgs), texts)):
                i = b * args.batch_size + j
                Image.fromarray(img).save(out / f"{i:06d}.png")
                with open(out / f"captions-{rank}.jsonl", "a") as f:
                    f.write(json.dumps({"file": f"{i:06d}.png", "prompt": text}) + "\n")
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        if rank == 0:
            print(f"wrote {len(items)} images to {out}/")
        return

    prompts = args.prompt or None
    cond = pipe.condition(prompts=prompts, labels=[args.label] if args.label is not None else None)
    k = len(prompts) if prompts else 1
    n = k * args.num_images
    neg = None
    if args.negative_prompt is not None:
        if pipe.kind != "text":
            fail("--negative-prompt needs a text-conditional model")
        neg = expand(pipe.condition(prompts=[args.negative_prompt]), n)
    with autocast:
        res = generate(pipe.model, pipe.diffusion, expand(cond, args.num_images), n,
                       negative_cond=neg, seed=args.seed, snapshots=8 if args.show_steps else 0,
                       device=device, **kw)
    levels, frames = res if args.show_steps else (res, None)
    names = prompts or [pipe.class_names[pipe.label_index(args.label, "")] if args.label is not None
                        else "unconditional"]
    prefix = Path(args.out or Path("samples") / slug(names[0]))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    top = levels[-1].shape[-1]
    data.save_grid(levels[-1], f"{prefix}.png", nrow=args.num_images, scale=max(1, 128 // top))
    data.save_matryoshka(levels, f"{prefix}-matryoshka.png",
                         captions=[c for c in names for _ in range(args.num_images)])
    written = [f"{prefix}.png", f"{prefix}-matryoshka.png"]
    if frames:
        save_steps_figure(frames, f"{prefix}-steps.png")
        written.append(f"{prefix}-steps.png")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
