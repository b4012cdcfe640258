"""
Sample images from a trained Matryoshka Diffusion Model (appendix C).

All resolutions start from their own Gaussian noise and are denoised together by the NestedUNet; the paper
uses 250 DDPM steps, classifier-free guidance and Imagen's dynamic thresholding, as we do by default (a run
on black or white backgrounds records clipping, train.py --thresholding; a released model its authors').
Every run writes a grid and a "matryoshka" figure of every nested resolution (video: a GIF, every level).

    python sample.py "red heart" "fire"                     # 4 images of each, by the newest run in runs/
    python sample.py "a red heart" --num-images 16 --guidance-scale 5 --seed 1
    python sample.py "a cat" --sampler ddim --num-inference-steps 50 --show-steps
    python sample.py --label sandal                         # a class-conditional model
    python sample.py --ckpt runs/<name> "a rocket" --negative-prompt "a face"
    python sample.py --ckpt runs/flickr64 "a panda playing guitar"   # a released model (tools/release.py)
What only a nested model can do, through its levels (the given pixels stay as they are):
    python sample.py --label bag --upscale bag16.png           # super-resolution: 16x16 -> 32x32
    python sample.py --label bag --init-image bag.png --strength 0.5           # image-to-image
    python sample.py --label bag --init-image bag.png --mask right-half.png    # inpainting
    python sample.py "red heart" --guidance-scale 5,1          # a guidance scale per level
Many images for evaluation, into a folder, in batches (one process, or one per GPU):
    torchrun --nproc_per_node=8 sample.py --prompts-file prompts.txt --out-dir gen/ --batch-size 64
"""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import helpers.options as opt
from data import to_tensor
from diffusion import SAMPLERS, THRESHOLDING
from helpers.devices import autocast, resolve_precision, setup_processes
from helpers.models import Trained
from helpers.pictures import save_gif, save_grid, save_levels_figure, save_matryoshka, to_uint8


# No flags describe the model (the checkpoint's metadata does); those left out take the run's settings.
def parse_args(argv=None):
    p = opt.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", default=None, help="what to draw (text models), --num-images each")
    p.add_argument("--label", default=None, help="class index or name (class-conditional models)")
    p.add_argument("--ckpt", default=None, help="a run folder or ema.safetensors (default: newest in runs/)")
    p.add_argument("--num-images", type=int, default=4)   # per prompt; with --prompts-file, in all (see main)
    p.add_argument("--guidance-scale", type=opt.comma_list(float, "3 or 5,1"), default=None,
                   help="classifier-free guidance (1: none; default: the run's); one per level, lowest first: "
                   "5,1 guides the layout strongly and the texture not")
    p.add_argument("--negative-prompt", default=None, help="guide away from this instead of the null condition")
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: the run's (250, appendix C)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: the run's (ddpm); "
                   "dpm++2m: DPM-Solver++, as good in 25 steps as DDIM in far more")
    p.add_argument("--eta", type=float, default=None, help="DDIM's noise: 0 deterministic, 1 as much as DDPM")
    p.add_argument("--thresholding", choices=list(THRESHOLDING), default=None,
                   help="of the predicted x at every step (default: the run's; train.py records it)")
    p.add_argument("--no-dynamic-thresholding", action="store_true", help="the same as --thresholding none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-steps", action="store_true", help="also draw the denoising of every resolution over time")
    p.add_argument("--out", default=None, help="output file prefix (default: samples/<prompt>)")
    p.add_argument("--prompts-file", default=None, help="one prompt (or label) per line: many images into --out-dir")
    p.add_argument("--out-dir", default=None, help="the folder of --prompts-file's images (default: generated/)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--text-encoder", default=None, help="a local copy of the run's text encoder "
                   "(default: the one its metadata names, e.g. google/flan-t5-xl)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="of the network "
                   "(auto: bf16 on GPUs that have it, else fp16, fp32 on CPUs; a released model never fp16)")
    g = p.add_argument_group("drawing around given pixels (the result keeps them as they are)")
    g.add_argument("--upscale", default=None, help="super-resolution: an image of a lower level's size (16x16 for "
                   "a 16 -> 32 model); the levels above it are drawn around it")
    g.add_argument("--init-image", default=None, help="image-to-image: start from it; with --mask, inpaint it")
    g.add_argument("--strength", type=float, default=None, help="how far --init-image is noised, 0 to 1 "
                   "(1: pure noise; default 0.75, or 1 with --mask)")
    g.add_argument("--mask", default=None, help="inpainting: white where to draw, black where "
                   "--init-image stays (its size)")
    g.add_argument("--resample", type=int, default=0, help="RePaint's resampling: each step redone N "
                   "times with fresh noise, for a more coherent fill (--upscale, --mask)")
    a = p.parse_args(argv)
    if a.no_dynamic_thresholding:
        a.thresholding = "none"
    return a


def check_args(args):
    """Every flag's value, checked before the model is loaded (one line each); --prompts-file's lines, if given."""
    opt.check_flags("sample.py", args, [
        ("--num-images", opt.at_least(1), "at least 1 image"),
        ("--guidance-scale", opt.finite, "finite guidance scales (1: no guidance), e.g. 3, or 5,1 (one per level)"),
        ("--strength", lambda v: opt.finite(v) and 0 <= v <= 1, "a strength in [0, 1] (1: pure noise)"),
        ("--resample", opt.at_least(0), "an integer >= 0"),
        ("--num-inference-steps", opt.at_least(1), "at least 1 step"),
        ("--eta", lambda v: opt.finite(v) and v >= 0, "a DDIM noise level >= 0 (0: deterministic, 1: DDPM's)"),
        ("--seed", opt.at_least(0), "an integer >= 0"),
        ("--batch-size", opt.at_least(1), "at least 1 image per batch"),
    ])
    opt.check_device("sample.py", args.device)
    if args.mask and not args.init_image:
        fail(f"--mask {args.mask}: inpainting needs the image too: --init-image <image> --mask {args.mask}")
    if args.upscale and args.init_image:
        fail("--upscale and --init-image: one of them (the image to upscale, or the image to start from)")
    if args.strength is not None and not args.init_image:
        fail(f"--strength {args.strength}: the strength of --init-image's noise; give --init-image")
    if args.out_dir and not args.prompts_file:
        fail(f"--out-dir {args.out_dir}: a folder for --prompts-file's images; for prompts given here, "
             f"--out <file prefix>, e.g. --out {Path(args.out_dir) / 'picture'}")
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


def fail(msg):
    raise SystemExit(f"sample.py: {msg}")        # one line on stderr, no traceback


# --- Drawing: the model and its diffusion process, appendix C --------------------------------

class NonFinite(Exception):
    """A sample left the range of the network's precision (NaN or infinity) at step `args[0]`."""


def draw(run: Trained, cond: dict, n: int, seed: int, settings: dict, negative_prompt=None, callback=None,
         progress=False, precision: str = "fp32", **given) -> list:
    """n images for `cond` (n rows), every resolution, lowest first, by diffusion.sample (`given`: known
    pixels or an image to start from), the noise from a generator seeded by `seed` on the device (CPU and
    CUDA differ), guided against the negative prompt or null condition; the network in `precision`
    (autocast), the sampler in float32. A sample turning NaN or infinite stops at once (NonFinite)."""
    def step_done(i, t, zs, x_preds):
        if not all(bool(torch.isfinite(x).all()) for x in x_preds):
            raise NonFinite(i + 1)
        if callback is not None:
            callback(i, t, zs, x_preds)

    # The given pixels come as one image (1, C, r, r); every row of the batch draws around the same one
    # (expand: a view, no copy), so n samples of one photo differ only in what the model draws.
    def rows(x):                                   # a given image (1, C, r, r) for each of the n
        return x.expand(n, *x.shape[1:]) if torch.is_tensor(x) else x
    given = {k: [v and tuple(map(rows, v)) for v in g] if k == "known" else rows(g) for k, g in given.items()}
    # Only the network runs in `precision`: the sampler's state (z_t of every level) stays float32, since
    # hundreds of small updates rounded to bf16's 8 bits of mantissa would blur the image.
    with autocast(run.device, precision):
        return run.diffusion.sample(run.model, cond, batch_size=n, callback=step_done, progress=progress,
                                    negative_cond=run.negative_condition(n, negative_prompt), **settings,
                                    generator=torch.Generator(run.device).manual_seed(seed), **given)


def read_image(source, channels: int) -> torch.Tensor:
    """An image (file or bytes) -> (1, C, H, W) in [-1, 1], grey for one channel; ValueError if no image."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            a = np.asarray(img.convert("RGBA").convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read it as an image ({e})") from None
    return to_tensor(a[..., None] if a.ndim == 2 else a)[None]


def given_pixels(run: Trained, upscale=None, image=None, mask=None, strength=None, resample: int = 0) -> dict:
    """diffusion.sample's given pixels for one image (draw repeats it), from (1, C, H, W) in [-1, 1]:
    `upscale` of a lower level's size, known there and below; `image` to start from, noised to `strength`,
    or with `mask` (white: draw, black: keep) its kept pixels known at every level. ValueError: no fit."""
    sizes, R = run.model.resolutions, run.model.resolutions[-1]
    if upscale is None and image is None:
        return {}
    if run.is_video:
        raise ValueError("drawing around given pixels is for images; this is a video model")
    # Super-resolution. In the extended space (Eq. 2) a lower level is the top image average-pooled, so an
    # image of a lower level's size is that level, and pooling it further gives every level below it. Those
    # levels are known; at each step diffusion.sample puts them back, noised to that step by their own
    # schedule, and the levels above see them through the nesting while they denoise.
    if upscale is not None:
        if upscale.shape[-2] != upscale.shape[-1] or upscale.shape[-1] not in sizes[:-1]:
            raise ValueError(f"{upscale.shape[-1]}x{upscale.shape[-2]} pixels; this model's lower levels are "
                             f"{', '.join(f'{r}x{r}' for r in sizes[:-1])}: expected an image of one of those sizes")
        k = sizes.index(upscale.shape[-1])         # that level known, and the ones below it (pooled)
        return dict(known=[(F.avg_pool2d(upscale, upscale.shape[-1] // r).to(run.device), None) if i <= k else None
                           for i, r in enumerate(sizes)], resample=resample)
    top = image if image.shape[-2:] == (R, R) else \
        F.interpolate(image, size=(R, R), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    # Image-to-image (SDEdit): every level starts from the image pooled to it and noised to `strength`, so a
    # small strength keeps the layout and colours and redraws the detail; 1 forgets the image.
    if mask is None:
        return dict(init=top.to(run.device), strength=0.75 if strength is None else strength)
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} pixels, the image "
                         f"{image.shape[-1]}x{image.shape[-2]}: expected the same size")
    keep = (F.interpolate(mask[:, :1], size=(R, R), mode="nearest") < 0).float()     # black: keep, white: draw
    # Inpainting: every level knows the image, pooled to it; a level's pixel is kept only if all the pixels
    # it averages are (a min-pool of the mask), since its pooled value would otherwise mix in pixels that
    # are about to be redrawn. The drawn region is then free at every level, the rest fixed at every level.
    out = dict(known=[(F.avg_pool2d(top, R // r).to(run.device), (-F.max_pool2d(-keep, R // r)).to(run.device))
                      for r in sizes], resample=resample)
    if strength is not None and strength < 1:
        out.update(init=top.to(run.device), strength=strength)
    return out


def given_by_flags(run: Trained, args) -> dict:
    """given_pixels of --upscale, --init-image, --mask and --strength; each mistake in one line."""
    flags, images = {"--upscale": args.upscale, "--init-image": args.init_image, "--mask": args.mask}, {}
    for flag, path in flags.items():
        try:
            images[flag] = None if path is None else read_image(path, 1 if flag == "--mask" else
                                                                run.model.config.in_channels)
        except ValueError as e:
            fail(f"{flag} {path}: {e}")
    try:
        return given_pixels(run, *images.values(), args.strength, args.resample)    # upscale, image, mask
    except ValueError as e:
        fail(" ".join(f"{f} {p}" for f, p in flags.items() if p) + f": {e}")


def main(argv=None):
    args = parse_args(argv)
    lines = check_args(args)                       # --prompts-file's lines, or None
    # One process, or one per GPU under torchrun: a few prompts are one process's work (the others stop
    # here); for many (--prompts-file) they share nothing but the barrier at the end.
    rank, world, device = setup_processes(args.device, join=bool(args.prompts_file))
    if not args.prompts_file and rank != 0:
        return
    # -- the trained model, its diffusion process and its text encoder, rebuilt from the run's file --
    try:
        run = Trained(args.ckpt, device, text_encoder_path=args.text_encoder)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    scales = args.guidance_scale                   # how to sample: the run's settings, unless a flag says
    if scales and len(scales) not in (1, len(run.model.resolutions)):
        fail(f"--guidance-scale {','.join(map(str, scales))}: {len(scales)} scales for a model of "
             f"{len(run.model.resolutions)} levels: give one, or one per level, lowest first")
    # One guidance scale serves every level; a list guides level i by scales[i] (diffusion.predict_v).
    settings = run.settings(sampler=args.sampler, num_inference_steps=args.num_inference_steps, eta=args.eta,
                            guidance_scale=scales and (scales[0] if len(scales) == 1 else scales),
                            thresholding=args.thresholding)
    if args.negative_prompt is not None and run.kind != "text":
        fail("--negative-prompt needs a text-conditional model")
    # The released models' activations exceed fp16's range (ml-mdm issue 69): never fp16 unless asked.
    precision = resolve_precision(args.precision, device, fp16=run.fp16_ok)
    # The images of --upscale, --init-image and --mask are read and fitted before the first step: a wrong
    # size ends in one line now, not after minutes of sampling.
    given = given_by_flags(run, args)
    try:
        if args.prompts_file:
            write_folder(run, lines, args, settings, rank, world, precision=precision, **given)
        else:
            write_figures(run, args, settings, precision=precision, **given)
    except NonFinite as e:                         # a NaN never recovers: every later step mixes it in
        fail(f"the sample turned NaN or infinite at step {e.args[0]} in {precision}: its values left that "
             f"precision's range; run it with --precision fp32" + (" (or bf16)" if precision == "fp16" else ""))


def write_figures(run: Trained, args, settings: dict, **draw_kw):
    """A few prompts (or one label): a grid, the matryoshka figure, and --show-steps' figure."""
    prompts = args.prompt or None
    try:          # k conditions (one per prompt, or the one label), each repeated --num-images times
        cond = run.condition(prompts=prompts, labels=[args.label] if args.label is not None else None,
                             repeat=args.num_images)
    except ValueError as e:
        fail(str(e))
    n = (len(prompts) if prompts else 1) * args.num_images      # --num-images rows per condition
    # --show-steps: the first image's x_pred per resolution at 8 moments, t = 1 to 0 (the paper's Fig. 11).
    steps = settings["num_inference_steps"]
    marks = {round(i * (steps - 1) / 7) for i in range(8)} if args.show_steps else set()
    frames = []                                    # (t, the first image's x_pred per level) at the marks

    def keep(i, t, zs, x_preds):                   # x_preds: (n, C, r, r) per resolution
        if i in marks:
            frames.append((t, [x[:1].float().cpu() for x in x_preds]))
    levels = draw(run, cond, n, args.seed, settings, args.negative_prompt, keep, progress=True, **draw_kw)
    names = prompts or [run.class_name(args.label) if args.label is not None else "unconditional"]
    prefix = Path(args.out or Path("samples") / slug(names[0]))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if run.is_video:                               # clips: a GIF, and the frames of every level
        save_gif(levels[-1], f"{prefix}.gif")
        save_levels_figure(levels, f"{prefix}-levels.png")
        written = [f"{prefix}.gif", f"{prefix}-levels.png"]
    else:
        save_grid(levels[-1], f"{prefix}.png", nrow=args.num_images)   # top level, a row per prompt, ~128 px
        # The matryoshka figure: a row per resolution (lowest on top), a column per image, all one size
        # (nearest neighbour: a low resolution's pixels stay visible).
        save_matryoshka(levels, f"{prefix}-matryoshka.png", captions=[c for c in names for _ in range(args.num_images)])
        written = [f"{prefix}.png", f"{prefix}-matryoshka.png"]
    if frames:
        save_matryoshka([torch.cat([lv[r] for _, lv in frames]) for r in range(len(frames[0][1]))],
                        f"{prefix}-steps.png", captions=[f"t={t:.2f}" for t, _ in frames])
        written.append(f"{prefix}-steps.png")
    print("wrote " + ", ".join(written))


def write_folder(run: Trained, lines: list[str], args, settings: dict, rank: int = 0, world: int = 1, **draw_kw):
    """--prompts-file: many images into a folder (for evaluation) and a captions file: the lines (labels,
    prompts, anything) cycled to --num-images, each at least once, in batches, each process its own."""
    if run.kind == "label":                        # every line must name a class: checked before any image
        try:
            run.condition(labels=list(dict.fromkeys(lines)))
        except ValueError as e:
            fail(f"--prompts-file {args.prompts_file}: {e}")
    out = Path(args.out_dir or "generated")
    items = [lines[i % len(lines)] for i in range(max(args.num_images, len(lines)))]
    out.mkdir(parents=True, exist_ok=True)
    B = args.batch_size
    batches = [items[i:i + B] for i in range(0, len(items), B)]
    with open(out / f"captions-{rank}.jsonl", "w") as captions:   # one per process, begun afresh by each run
        for b in tqdm(range(rank, len(batches), world), disable=rank != 0, desc="batches"):   # whole batches
            texts = batches[b]
            cond = run.condition(**({"labels": texts} if run.kind == "label" else
                                    {"prompts": texts} if run.kind == "text" else {}))
            # Batch b's seed: from the seed and b alone (1_000_003 > any batch count), never the number of
            # processes (on a CPU, threads per process can still move a pixel by one level: sums split apart).
            images = draw(run, cond, len(texts), args.seed * 1_000_003 + b, settings, **draw_kw)[-1]   # the top level
            for j, (img, text) in enumerate(zip(to_uint8(images), texts)):
                i = b * B + j                      # the image's index in `items`: file names never collide
                Image.fromarray(img).save(out / f"{i:06d}.png")
                captions.write(json.dumps({"file": f"{i:06d}.png", "prompt": text}) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {len(items)} images to {out}/")


def slug(text: str) -> str:
    """A file name from a prompt: "Red heart!" -> "red-heart" (at most 60 characters)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "sample"


if __name__ == "__main__":
    main()
