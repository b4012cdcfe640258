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
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import data
import utils
from diffusion import DiffusionConfig, MatryoshkaDiffusion
import nested_unet
from nested_unet import load_weights


# No flags describe the model: its config, diffusion config and text encoder come from the
# checkpoint's metadata (STYLE point 6). The flags only say what to draw and how.
def parse_args(argv=None):
    p = utils.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", default=None, help="what to draw (text-conditional models); "
                   "several prompts: --num-images of each")
    p.add_argument("--label", default=None, help="class index or name (class-conditional models)")
    p.add_argument("--ckpt", default=None, help="a run folder or an ema.safetensors file "
                   "(default: the newest run in runs/)")
    # Images per prompt; with --prompts-file, the number of images in all (see main).
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance; 1: none")
    p.add_argument("--negative-prompt", default=None, help="guide away from this instead of the null condition")
    p.add_argument("--num-inference-steps", type=int, default=250)    # the paper's 250 steps (appendix C)
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


def check_args(args):
    """Every flag's value, checked before the model is loaded: one line each."""
    utils.check_flags("sample.py", args, [
        ("--num-images", utils.at_least(1), "at least 1 image"),
        ("--guidance-scale", utils.finite, "a finite guidance scale (1: no guidance), e.g. 3"),
        ("--num-inference-steps", utils.at_least(1), "at least 1 step"),
        ("--seed", utils.at_least(0), "an integer >= 0"),
        ("--batch-size", utils.at_least(1), "at least 1 image per batch"),
    ])
    utils.check_device("sample.py", args.device)
    if args.prompts_file:
        try:
            lines = [l.strip() for l in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()]
        except OSError as e:
            fail(f"--prompts-file {args.prompts_file}: cannot read it ({e.strerror})")
        except UnicodeDecodeError:
            fail(f"--prompts-file {args.prompts_file}: not a text file (expected one prompt or label per line, UTF-8)")
        if not any(lines):
            fail(f"--prompts-file {args.prompts_file}: holds no prompt (expected one prompt or label per line)")
        return [l for l in lines if l]
    return None


def fail(msg):
    # SystemExit with a message: the person sees one line on stderr and no traceback.
    raise SystemExit(f"sample.py: {msg}")


# ---------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------

def find_weights(ckpt: str | None, runs="runs") -> Path:
    """nested_unet.find_weights, its errors said as sample.py's."""
    try:
        return nested_unet.find_weights(ckpt, runs)
    except FileNotFoundError as e:
        fail(str(e))


class Pipeline:
    """A trained model with what it needs to turn a prompt or label into a condition."""

    def __init__(self, path, device):
        try:
            self.model, self.meta = load_weights(path, device=device)
        except ValueError as e:
            fail(str(e))
        if self.model.config.temporal_axis or self.meta.get("video"):
            fail(f"{path} is a video model: sample it with `python video.py sample \"...\"`")
        # The schedules of training (shift_power, log-SNR bounds): the noise levels it learned.
        self.diffusion = MatryoshkaDiffusion.for_model(self.model, DiffusionConfig(**self.meta["diffusion_config"]))
        self.kind, self.device = self.meta["cond"], device          # kind: "text", "label" or "none"
        # The frozen encoder of training, by name: the network knows its features and no other's.
        try:
            self.encoder = data.TextEncoder(self.meta["text_encoder"], device=device) if self.kind == "text" else None
        except ValueError as e:
            fail(f"{path} was trained with a text encoder that cannot be loaded here: {e}")
        self.class_names = self.meta.get("class_names")

    def condition(self, prompts: list[str] | None = None, labels: list | None = None) -> dict:
        """Prompts or labels (indices or class names) -> the model's condition dict."""
        if self.kind == "text":
            if labels is not None or prompts is None:
                fail("this model is text-conditional: give a prompt, e.g. python sample.py \"a panda\"")
            # {"text": (k, L, D) token features, "text_mask": (k, L) when a prompt is padded}
            return self.encoder.condition(prompts, self.device)
        if self.kind == "label":
            names = ", ".join(f"{i} {n}" for i, n in enumerate(self.class_names))
            if prompts is not None or labels is None:
                fail(f"this model is class-conditional: use --label with a class index or name: {names}")
            return {"label": torch.tensor([self.label_index(v, names) for v in labels], device=self.device)}   # (k,)
        if prompts is not None or labels is not None:
            fail("this model is unconditional: give neither a prompt nor a label")
        return {}                                  # unconditional: no condition, and no guidance either

    def label_index(self, value, names) -> int:
        """A class given by its name (in any case) or its index -> the index. `names` lists
        the classes for the error messages."""
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
    """Images at every resolution (lowest first) for `cond`, which holds one condition per
    image (num_images rows; see `expand`). The same seed gives the same images. With
    snapshots=k, also returns the predicted x of every resolution at k moments of the
    denoising (the paper's Fig. 11)."""
    device = device or next(model.parameters()).device
    bar = tqdm(total=num_inference_steps, desc=f"{sampler} x{num_images}", disable=not progress, leave=False)
    # k steps spread evenly from the first (t = 1) to the last; a set: with few steps some coincide.
    marks = {round(i * (num_inference_steps - 1) / max(1, snapshots - 1)) for i in range(snapshots)}
    frames = []

    def callback(i, t, zs, x_preds):
        # After step i, begun at time t: x_preds is the x predicted at t, (B, C, r, r) per resolution.
        # Only the first image is kept, on the CPU: the figure shows one sample.
        bar.update(1)
        if i in marks:
            frames.append((t, [x[:1].cpu() for x in x_preds]))

    # Appendix C: every resolution from its own noise, all denoised together. The generator
    # lives on the device (CPU and CUDA draw different numbers): same seed, same device, same images.
    levels = diffusion.sample(model, cond, batch_size=num_images, sampler=sampler,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              negative_cond=negative_cond, dynamic_thresholding=dynamic_thresholding,
                              generator=torch.Generator(device).manual_seed(seed), device=device,
                              callback=callback)
    bar.close()
    # levels: [(num_images, C, r, r) per resolution, lowest first], float32: the last step's
    # predicted x, in [-1, 1] with dynamic thresholding. Without it values may stray outside,
    # which is why what saves or measures images clamps them (data.to_uint8, evaluate.py).
    return (levels, frames) if snapshots else levels


def expand(cond: dict, n: int) -> dict:
    """k conditions -> each repeated n times (k * n images, condition by condition)."""
    # e.g. text (k, L, D) -> (k * n, L, D) in the order c0, c0, ..., c1, c1, ...: the n images
    # of one prompt are neighbours, and become one row of the grid in main().
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def save_steps_figure(frames, path):
    """Rows: resolutions; columns: moments of the denoising, t = 1 -> 0 (the paper's Fig. 11)."""
    # frames: [(t, [x per resolution, (1, C, r, r) each]), ...], one entry per moment.
    # save_matryoshka draws each list entry as a row and its batch as columns, so each
    # resolution's K moments are stacked into one (K, C, r, r): despite its name, cols[r] is a row.
    cols = [torch.cat([lv[r] for _, lv in frames]) for r in range(len(frames[0][1]))]
    data.save_matryoshka(cols, path, captions=[f"t={t:.2f}" for t, _ in frames])


def slug(text: str) -> str:
    """A file name from a prompt: "Red heart!" -> "red-heart" (at most 60 characters)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "sample"


# ---------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    lines = check_args(args)
    # One process, or one per GPU under torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # Under torchrun each process takes the GPU of its LOCAL_RANK; one process takes --device
    # as given (cuda:1 too), or the first GPU if there is one.
    use_cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    if world == 1 and args.device is not None:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if world > 1 and not args.prompts_file:
        # A few prompts are one process's work: under torchrun, the others stop here.
        if rank != 0:
            return
        world = 1
    if world > 1:
        # The processes share nothing while sampling; the group is only for the barrier at the end.
        dist.init_process_group("nccl" if use_cuda else "gloo")
    pipe = Pipeline(find_weights(args.ckpt), device)
    # bf16 on GPUs, as in training. Only the network runs in it: diffusion.sample keeps z in float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    kw = dict(sampler=args.sampler, num_inference_steps=args.num_inference_steps,
              guidance_scale=args.guidance_scale, dynamic_thresholding=not args.no_dynamic_thresholding)
    # The negative prompt takes the place of the null condition in the guided batch:
    # v = v_neg + w (v_cond - v_neg), one copy per image (`expand` below).
    neg = None
    if args.negative_prompt is not None:
        if pipe.kind != "text":
            fail("--negative-prompt needs a text-conditional model")
        neg = pipe.condition(prompts=[args.negative_prompt])

    if args.prompts_file:                          # many images into a folder
        # Here --num-images counts all images: lines are cycled to that many, each used at least once.
        items = [lines[i % len(lines)] for i in range(max(args.num_images, len(lines)))]
        out = Path(args.out_dir or "generated")
        out.mkdir(parents=True, exist_ok=True)
        batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
        mine = list(range(rank, len(batches), world))   # whole batches per process: same images for any world size
        # One captions file per process (no two write to one file), begun afresh by each run.
        with open(out / f"captions-{rank}.jsonl", "w") as captions:
            for b in tqdm(mine, disable=rank != 0, desc="batches"):
                texts = batches[b]
                # A line is a label (index or name) or a prompt; an unconditional model ignores
                # it but still draws an image for it.
                cond = pipe.condition(**({"labels": texts} if pipe.kind == "label" else
                                         {"prompts": texts} if pipe.kind == "text" else {}))
                with autocast:
                    # Batch b's seed comes from --seed and b alone (1_000_003 exceeds any batch
                    # count, so no two (seed, b) collide): an image never depends on the number
                    # of processes.
                    imgs = generate(pipe.model, pipe.diffusion, cond, len(texts), seed=args.seed * 1_000_003 + b,
                                    negative_cond=expand(neg, len(texts)) if neg is not None else None,
                                    progress=False, device=device, **kw)[-1]     # the highest resolution only
                for j, (img, text) in enumerate(zip(data.to_uint8(imgs), texts)):   # uint8 (H, W, 3) each
                    i = b * args.batch_size + j    # the image's index in `items`: file names never collide
                    Image.fromarray(img).save(out / f"{i:06d}.png")
                    captions.write(json.dumps({"file": f"{i:06d}.png", "prompt": text}) + "\n")
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        if rank == 0:
            print(f"wrote {len(items)} images to {out}/")
        return

    # -- a few prompts (or one label): a grid, the matryoshka figure, and the steps --
    prompts = args.prompt or None
    cond = pipe.condition(prompts=prompts, labels=[args.label] if args.label is not None else None)
    k = len(prompts) if prompts else 1             # conditions: one per prompt, or the one label
    n = k * args.num_images                        # images in all
    with autocast:
        res = generate(pipe.model, pipe.diffusion, expand(cond, args.num_images), n,
                       negative_cond=expand(neg, n) if neg is not None else None, seed=args.seed,
                       snapshots=8 if args.show_steps else 0, device=device, **kw)
    levels, frames = res if args.show_steps else (res, None)
    # One name per condition (the label was checked by pipe.condition: no class list needed here).
    names = prompts or [pipe.class_names[pipe.label_index(args.label, "")] if args.label is not None
                        else "unconditional"]
    prefix = Path(args.out or Path("samples") / slug(names[0]))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    top = levels[-1].shape[-1]
    # The grid: the top resolution, one row per prompt, small images enlarged (integer factor) to ~128 px.
    data.save_grid(levels[-1], f"{prefix}.png", nrow=args.num_images, scale=max(1, 128 // top))
    # The matryoshka figure: a row per resolution (lowest on top), a column per image, all drawn at
    # one size (nearest neighbour: a low resolution's pixels stay visible), captioned with the prompt.
    data.save_matryoshka(levels, f"{prefix}-matryoshka.png",
                         captions=[c for c in names for _ in range(args.num_images)])
    written = [f"{prefix}.png", f"{prefix}-matryoshka.png"]
    if frames:
        save_steps_figure(frames, f"{prefix}-steps.png")
        written.append(f"{prefix}-steps.png")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
