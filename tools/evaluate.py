"""Evaluating Matryoshka Diffusion models (with helpers/measures.py: FD-EffNet, class accuracy,
CLIP score, the motion of video samples), and the paper's main comparison at small scale.

The comparison (section 4.2, Fig. 4): with equal network size and equal compute, train
  simple DM     the same NestedUNet, only the highest resolution's loss (loss_levels=top)
  MDM (no PT)   the joint loss of Eq. 3 from the start
  MDM (PT)      progressive: the low resolution first, then the grown model
and follow FD-EffNet (and class accuracy) along training and wall time:
    python -m tools.evaluate compare    # Fashion-MNIST (ImageNet's stand-in), then emoji (CC12M's)
    python -m tools.evaluate compare --data fashion-mnist     # one of them
    python -m tools.evaluate sweep --ckpt runs/<run>          # guidance scale: FD vs accuracy (Fig. 8c)
    python -m tools.evaluate fd --ckpt runs/<run>             # FD-EffNet of one trained model
    python -m tools.evaluate video --ckpt runs/<video run>    # does the motion follow the caption?
    python -m tools.evaluate nested --ckpt runs/<fashion run> # super-resolution, inpainting, image to image
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import video
from diffusion import SAMPLERS, THRESHOLDING, MatryoshkaDiffusion, make_optimizer, training_step
import helpers.measures as metrics
import helpers.options as opt
from helpers.devices import autocast, prepare, timed
from helpers.models import Trained
from helpers.pictures import save_gif, save_grid
from nested_unet import PRESETS, NestedUNet, preset
from sample import given_pixels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_run(ckpt: str, device="cpu", video: bool | None = None) -> Trained:
    """A trained run (a folder or an ema.safetensors file; None: the newest run in runs/)."""
    try:
        return Trained(ckpt, device, video=video)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"tools/evaluate.py: {err}")


def pyplot():
    """matplotlib's pyplot drawing to files only (Agg), imported when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# --- The comparison of section 4.2 at small scale ---

# name -> the arm's train.py flags, all of one NestedUNet config (MDM (PT)'s two stages: compare's `plan`)
ARMS = {"simple DM": ["--loss-levels", "top"], "MDM (no PT)": [], "MDM (PT)": []}


def step_costs(config_name: str, low: int, batch: int, cond: dict, reps: int = 5):
    """Seconds per train.py step (on its device, in its precision) of the low stage and of the full model."""
    device, out = torch.device(DEVICE), []
    for truncate in (low, None):                   # the stage-1 model, then the whole NestedUNet
        torch.manual_seed(0)
        cfg = preset(config_name, **cond)
        model = prepare(NestedUNet(cfg.truncated(truncate) if truncate else cfg), device)
        diffusion, opt = MatryoshkaDiffusion.for_model(model), make_optimizer(model, 1e-4)
        R = model.resolutions[-1]
        x = torch.rand(batch, 3, R, R, device=device) * 2 - 1    # random pixels: the content costs nothing
        c = {"text": torch.randn(batch, 16, cfg.text_channels, device=device)} if cfg.text_channels else \
            {"label": torch.randint(cfg.num_classes, (batch,), device=device)}
        times = timed(lambda: training_step(diffusion, model, opt, [(x, c, None, None, None)],
                                            autocast=autocast(device)), reps + 3, device)
        out.append(float(np.median(times[3:])))    # the first steps warm up
    return out


def compare(args):
    """Train every arm with every seed, evaluated along the way; then the curves and a table."""
    (out := Path(args.out) / args.data).mkdir(parents=True, exist_ok=True)
    low, high = args.res
    # Fashion-MNIST's 10 classes, or emoji captions in MiniLM's 384-wide features (data.TextEncoder's default)
    cond = {"num_classes": 10} if args.data == "fashion-mnist" else {"text_channels": 384}
    c_low, c_high = step_costs(args.config, low, args.batch, cond)
    # Equal compute: the other arms take args.steps full steps. PT takes half as many (cheaper) steps of
    # the low model, the time of pt_low * c_low / c_high full steps; the grown model gets the remaining ones.
    pt_low = args.steps // 2
    pt_high = args.steps - round(pt_low * c_low / c_high)
    # arm -> train.py's (--res, --steps): one stage of the whole NestedUNet, or PT's two stages.
    plan = {"simple DM": (f"{high}", f"{args.steps}"), "MDM (no PT)": (f"{high}", f"{args.steps}"),
            "MDM (PT)": (f"{low},{high}", f"{pt_low},{pt_high}")}
    print(f"step costs here: {c_low:.3f}s at {low}x{low}, {c_high:.3f}s for the full model; "
          f"MDM (PT): {pt_low} steps at {low} + {pt_high} steps at {high}, the time of {args.steps} full steps")
    for arm, (res, steps) in plan.items():
        for seed in args.seeds:
            name = f"{slug(arm)}-seed{seed}"
            if (out / name / "ema.safetensors").exists() and not args.redo:
                continue                           # trained already: an interrupted comparison goes on
            batch = ",".join([str(args.batch)] * len(res.split(",")))    # the same batch in every stage
            # Evaluations only at the final resolution (PT's curves start after its first stage);
            # checkpoints only at stage ends and the end: writing one counts as training time.
            cmd = [sys.executable, str(Path(__file__).parent.parent / "train.py"), "--config", args.config,
                   "--data", args.data, "--res", res, "--steps", steps, "--batch", batch, "--seed", str(seed),
                   "--lr", str(args.lr), "--out", str(out), "--name", name, "--no-samples", "--log-every", "25",
                   "--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples),
                   "--ckpt-every", "1000000"] + ARMS[arm]
            print(" ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # a fresh process: nothing shared
    plot_comparison(out, plan, args)


def slug(s):
    """An arm's folder name ("MDM (no PT)" -> "mdm-no-pt"); not sample.slug: existing runs' folders use it."""
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-").replace("--", "-")


def plot_comparison(out: Path, plan: dict, args):
    plt = pyplot()
    metrics = ["eval_fd_effnet"] + (["eval_class_acc"] if args.data == "fashion-mnist" else [])
    # A row per metric, against steps (Fig. 4) and time (D.3); a colour per arm, seeds after the first dashed
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.8 * len(metrics)), squeeze=False)
    names = {"eval_fd_effnet": "FD-EffNet (lower is better)", "eval_class_acc": "class accuracy (higher is better)"}
    table = ["| arm | " + " | ".join(map(names.get, metrics)) + " |", "|---" * (1 + len(metrics)) + "|"]
    for color, arm in zip(("C3", "C0", "C2"), plan):
        finals = {m: [] for m in metrics}
        for k, seed in enumerate(args.seeds):
            log = (out / f"{slug(arm)}-seed{seed}" / "log.jsonl").read_text().splitlines()  # evaluations:
            ev = [r for r in map(json.loads, filter(str.strip, log)) if "eval_fd_effnet" in r]
            for i, m in enumerate(metrics):
                for j, x in enumerate(("step", "time")):     # "time": train.py's seconds -> minutes
                    axes[i, j].plot([r[x] if x == "step" else r[x] / 60 for r in ev], [r[m] for r in ev],
                                    color=color, marker="o", ms=3, alpha=0.9, linestyle="-" if k == 0 else "--",
                                    label=f"{arm}, seed {seed}")
                finals[m].append(ev[-1][m])          # the last evaluation of this seed
        table.append(f"| {arm} | " + " | ".join(f"{np.mean(v):.3g} ({np.min(v):.3g} to {np.max(v):.3g})"
                                                for v in finals.values()) + " |")
    for i, m in enumerate(metrics):
        axes[i, 0].set(xlabel="training step (all stages)", ylabel=names[m])
        axes[i, 1].set(xlabel="training time (minutes; evaluations excluded)", ylabel=names[m])
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{args.data}: simple DM vs MDM vs MDM with progressive training "
                 f"({args.res[0]}->{args.res[1]}, {args.config}, {len(args.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def sweep(args):
    """FD-EffNet and class accuracy against the guidance scale, of a class-conditional model (Fig. 8c)."""
    plt = pyplot()
    run = load_run(args.ckpt, args.device)
    model, meta, diffusion = run.model, run.meta, run.diffusion
    if meta["cond"] != "label":
        raise SystemExit("tools/evaluate.py sweep: needs a class-conditional model (Fashion-MNIST)")
    # Class accuracy stands in for the paper's CLIP score (does the image show what was asked
    # for?), FD-EffNet for its FID. The classifier stays on the CPU, with the images.
    res, feats = model.resolutions[-1], metrics.EffNetFeatures(args.device)
    real = metrics.real_stats(meta["data"], res, 1000, feats)
    (clf, clf_acc), rows = metrics.train_classifier(meta["data"], res), []
    for w in args.scales:
        # generate_set's default seed at every scale: the same noise, rows differ by the guidance alone
        with autocast(args.device):
            imgs, labels = metrics.generate_set(model, diffusion, "label", args.num, meta["class_names"], guidance=w,
                                                steps=args.steps, sampler=args.sampler)
        rows.append({"guidance_scale": w, "fd_effnet": metrics.fd_effnet(imgs, real, feats),
                     "class_acc": metrics.accuracy(clf, imgs, labels)})
        print(rows[-1], flush=True)
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    (out / "guidance_sweep.json").write_text(json.dumps({"rows": rows, "classifier_test_acc": clf_acc}, indent=2))
    fig, ax = plt.subplots(figsize=(5.5, 4))      # as Fig. 8c: condition metric on x, distance to data on y
    ax.plot([r["class_acc"] for r in rows], [r["fd_effnet"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"w={r['guidance_scale']:g}", (r["class_acc"], r["fd_effnet"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="class accuracy of samples (higher: more on-class)", ylabel="FD-EffNet (lower: closer to data)",
           title="classifier-free guidance trade-off")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "guidance_sweep.png", dpi=110)


def video_motion(a):
    """Clips of a video model (emoji-motion), one motion per caption in turn: the fraction whose motion
    (video.motion_of) is the caption's, per motion and in all, and on real clips (can it be trusted?)."""
    run = load_run(a.ckpt, a.device, video=True)
    if not run.is_video:
        raise SystemExit(f"tools/evaluate.py video: {run.path} is an image model")
    ds = data.EmojiMotion(size=run.model.resolutions[-1], frames=run.model.config.frames)
    rng, M, clips = np.random.default_rng(0), len(data.MOTIONS), []
    captions = [f"{ds.names[rng.integers(len(ds.names))]} {data.MOTIONS[i % M]}" for i in range(a.num)]
    settings = run.settings(sampler=a.sampler, num_inference_steps=a.steps, guidance_scale=a.guidance_scale)
    for i in range(0, a.num, 16):                  # 16 clips at a time, each batch its own seed
        with autocast(run.device):
            clips.append(run.diffusion.sample(run.model, run.condition(prompts=captions[i:i + 16]),
                                              batch_size=len(captions[i:i + 16]), **settings,
                                              generator=torch.Generator(run.device).manual_seed(i))[-1].float().cpu())
    right = [video.motion_of(c) == i % M for i, c in enumerate(torch.cat(clips))]
    real = [video.motion_of(ds[i]["image"]) == i % M for i in range(min(len(ds), 600))]
    (out := Path(a.out)).parent.mkdir(parents=True, exist_ok=True)
    save_gif(torch.cat(clips)[:12], f"{out}.gif")
    result = {"clips": a.num, "motion_accuracy": float(np.mean(right)), "chance": 1 / M,
              "per_motion": {m: float(np.mean(right[k::M])) for k, m in enumerate(data.MOTIONS)},
              "measure_on_real_clips": float(np.mean(real)), **settings}
    Path(f"{out}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def nested(a):
    """What only a nested model can do, on real Fashion-MNIST test images and their labels: super-resolution,
    inpainting, image-to-image, guidance per level; each scored by class accuracy (kept?) and FD-EffNet."""
    run = load_run(a.ckpt, a.device)
    if run.kind != "label" or len(run.model.resolutions) < 2:
        raise SystemExit("tools/evaluate.py nested: needs a class-conditional model of two levels or more "
                         "(Fashion-MNIST)")
    R, r = run.model.resolutions[-1], run.model.resolutions[-2]
    test = data.load_fashion_mnist(R, "test")
    idx = np.concatenate([np.flatnonzero(test.labels == c)[:a.num // 10] for c in range(10)])
    x, labels = data.to_tensor(test.images[idx]), torch.from_numpy(test.labels[idx])
    feats, rows, shown = metrics.EffNetFeatures(a.device), {}, {}     # shown: one image of each class
    real = metrics.real_stats(run.meta["data"], R, 1000, feats)
    classifier = metrics.train_classifier(run.meta["data"], R)[0]
    low, keep = F.avg_pool2d(x, R // r), torch.ones(1, 1, R, R)
    keep[..., R // 2:] = 0                         # the right half drawn: white in sample.py's mask

    first = lambda t: t[:: len(x) // 10][:10]         # the first image of each class

    def score(name, images, **extra):
        rows[name] = {"class_acc": metrics.accuracy(classifier, images, labels),
                      "fd_effnet": metrics.fd_effnet(images, real, feats), **extra}
        shown[name] = first(images)
        print(name, rows[name], flush=True)

    def generate(guidance=None, **given):          # the run's sampling, DDIM --steps steps, 100 images a batch
        settings, out = run.settings(sampler="ddim", num_inference_steps=a.steps, guidance_scale=guidance), []
        for i in range(0, len(x), 100):
            part = {k: [v and tuple(u if u is None or u.shape[0] == 1 else u[i:i + 100] for u in v) for v in g]
                    if k == "known" else g[i:i + 100] if torch.is_tensor(g) else g for k, g in given.items()}
            with autocast(run.device):
                out.append(run.diffusion.sample(run.model, {"label": labels[i:i + 100].to(run.device)},
                                                batch_size=len(labels[i:i + 100]), **settings, **part,
                                                generator=torch.Generator(run.device).manual_seed(i))[-1].float().cpu())
        return torch.cat(out)
    score(f"real {R}x{R} test images", x)
    score(f"bicubic {r} -> {R}", F.interpolate(low, size=(R, R), mode="bicubic", align_corners=False).clamp(-1, 1))
    score("samples of the labels", generate())
    score("unconditional samples (guidance 0)", generate(guidance=0.0))   # accuracy: chance, FD: the data's
    for k in (0, a.resample):                      # the given pixels as sample.py --upscale / --mask makes them
        out = generate(**given_pixels(run, upscale=low, resample=k))
        score(f"super-resolution {r} -> {R}" + (f", resampling {k}" if k else ""), out,
              pooled_mad=float((F.avg_pool2d(out, R // r) - low).abs().mean()))
    out = generate(**given_pixels(run, image=x, mask=1 - 2 * keep))
    score("inpainting the right half", out, kept_exact=bool(torch.equal(out[..., :R // 2], x[..., :R // 2])))
    for strength in (0.25, 0.5, 0.75):
        score(f"image-to-image, strength {strength}", generate(init=x, strength=strength))
    for scales in ([5.0, 1.0], [3.0, 3.0], [1.0, 5.0]):
        score(f"guidance per level {scales}", generate(guidance=scales))
    (out := Path(a.out)).parent.mkdir(parents=True, exist_ok=True)
    # The figure, a column per class: the real image, its low resolution, super-resolved; its left half,
    # inpainted; image-to-image at strength 0.5; a sample of the label.
    shown |= {"low": F.interpolate(first(low), size=(R, R), mode="nearest"), "half": first(x) * keep}
    names = [f"real {R}x{R} test images", "low", f"super-resolution {r} -> {R}", "half",
             "inpainting the right half", "image-to-image, strength 0.5", "samples of the labels"]
    save_grid(torch.cat([shown[k] for k in names]), f"{out}.png", nrow=10)
    Path(f"{out}.json").write_text(json.dumps({"ckpt": str(run.path), "images": len(x), "steps": a.steps,
                                              "settings": run.settings(sampler="ddim", num_inference_steps=a.steps),
                                              "rows": rows}, indent=2))
    print(f"wrote {out}.json and {out}.png")


def check_args(a):
    """Every flag of the subcommand, checked before any work: one line each."""
    two = "at least 2 images (a covariance needs 2)"
    opt.check_flags("tools/evaluate.py", a, [
        ("--steps", opt.at_least(1), "at least 1 step"), ("--batch", opt.at_least(1), "a batch of at least 1"),
        ("--lr", opt.positive, "a positive learning rate, e.g. 6e-4"),
        ("--seeds", opt.at_least(0), "seeds >= 0, e.g. 0,1"),
        ("--eval-every", opt.at_least(1), "a number of steps >= 1"), ("--eval-samples", opt.at_least(2), two),
        ("--num", opt.at_least(2), two), ("--scales", opt.finite, "finite guidance scales, e.g. 1,3,5"),
        ("--guidance-scale", opt.finite, "a finite guidance scale (1: no guidance)")])
    opt.check_device("tools/evaluate.py", getattr(a, "device", None))
    if a.cmd == "compare":
        if unknown := [d for d in a.data.split(",") if d not in ("fashion-mnist", "emoji")]:
            raise SystemExit(f"tools/evaluate.py: --data {a.data}: the comparison runs on the built-in sets "
                             f"fashion-mnist and emoji (comma-separated), not {', '.join(unknown)}")
        if a.config not in PRESETS:
            raise SystemExit(f"tools/evaluate.py: --config {a.config}: not a preset; the presets are "
                             f"{', '.join(PRESETS)}")
        if len(a.res) != 2 or a.res[0] < 1 or a.res[1] <= a.res[0] or a.res[1] % a.res[0]:
            raise SystemExit(f"tools/evaluate.py: --res {','.join(map(str, a.res))}: expected two resolutions, "
                             f"the low one dividing the high one, e.g. 16,32")
        if a.steps < 2:
            raise SystemExit(f"tools/evaluate.py: --steps {a.steps}: expected at least 2 (progressive training "
                             f"splits them over two stages)")


def main(argv=None):
    p = opt.ArgumentParser(prog="tools/evaluate.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=opt.ArgumentParser)
    c = sub.add_parser("compare", help="simple DM vs MDM vs MDM with progressive training")
    c.add_argument("--data", default="fashion-mnist,emoji", help="one data set or several, comma-separated")
    c.add_argument("--config", default="CPU-tiny-S16S32")
    c.add_argument("--res", type=opt.comma_list(int, "16,32"), default=[16, 32])
    c.add_argument("--steps", type=int, default=800, help="steps of the full model; PT gets the same time")
    c.add_argument("--batch", type=int, default=32)
    c.add_argument("--lr", type=float, default=6e-4)
    c.add_argument("--seeds", type=opt.comma_list(int, "0,1"), default=[0, 1])
    c.add_argument("--eval-every", type=int, default=200)
    c.add_argument("--eval-samples", type=int, default=200)
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--redo", action="store_true", help="train again the runs that exist")

    def sampling(q, num, steps, guidance=None, num_help=None):     # the flags that sweep, fd and video share
        q.add_argument("--num", type=int, default=num, help=num_help)
        q.add_argument("--steps", type=int, default=steps)
        q.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
        if guidance is not None:
            q.add_argument("--guidance-scale", type=float, default=guidance)
    s = sub.add_parser("sweep", help="guidance scale: FD-EffNet vs class accuracy")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--scales", type=opt.comma_list(float, "1,3,5"), default=[1, 1.5, 2, 3, 5, 8])
    sampling(s, 500, 25)
    f = sub.add_parser("fd", help="FD-EffNet (and class accuracy / CLIP score) of one trained model")
    f.add_argument("--ckpt", default=None)
    sampling(f, 1000, 50, 1.0)
    f.add_argument("--thresholding", choices=list(THRESHOLDING), default=None,
                   help="of the predicted x while sampling (default: the one the run records)")
    f.add_argument("--clip", default=None, help="a CLIP model (local folder or cache) for the CLIP score")
    v = sub.add_parser("video", help="does the motion of a video model's clips follow the caption?")
    v.add_argument("--ckpt", default=None, help="a video run (default: the newest)")
    sampling(v, 48, 50, 4.0, "clips, 8 of each motion")
    n = sub.add_parser("nested", help="super-resolution, inpainting, image-to-image, guidance per level")
    n.add_argument("--ckpt", default=None, help="a class-conditional Fashion-MNIST run (default: the newest)")
    n.add_argument("--num", type=int, default=500, help="real test images in all, as many of each class")
    n.add_argument("--steps", type=int, default=50, help="DDIM steps")
    n.add_argument("--resample", type=int, default=2, help="RePaint's resampling of the second super-resolution")
    for q, out in ((s, "runs/compare"), (f, None), (v, "samples/video-eval"), (n, "samples/nested-eval")):
        if out:                                    # the last flags of these: --out (fd has none), --device
            q.add_argument("--out", default=out)
        q.add_argument("--device", default=DEVICE)
    a = p.parse_args(argv)
    check_args(a)
    if a.cmd == "compare":
        for name in a.data.split(","):             # one comparison per data set, in its own folder
            compare(argparse.Namespace(**{**vars(a), "data": name}))
    elif a.cmd != "fd":
        {"sweep": sweep, "video": video_motion, "nested": nested}[a.cmd](a)
    else:                                          # fd: one model's samples against 1,000 real images
        run = load_run(a.ckpt, a.device)
        model, meta, diffusion, res = run.model, run.meta, run.diffusion, run.model.resolutions[-1]
        caps = metrics.dataset_captions(meta["data"], res, a.num) if meta["cond"] == "text" else None
        with autocast(a.device):
            imgs, conds = metrics.generate_set(model, diffusion, meta["cond"], a.num, meta.get("class_names"), caps,
                                               run.encoder, guidance=a.guidance_scale, steps=a.steps,
                                               sampler=a.sampler, thresholding=a.thresholding)
        feats = metrics.EffNetFeatures(a.device)
        result = {"fd_effnet": metrics.fd_effnet(imgs, metrics.real_stats(meta["data"], res, 1000, feats), feats),
                  "n": a.num, "sampler": a.sampler, "steps": a.steps, "guidance_scale": a.guidance_scale,
                  "thresholding": a.thresholding or diffusion.config.thresholding}
        if meta["cond"] == "label":
            result["class_acc"] = metrics.accuracy(metrics.train_classifier(meta["data"], res)[0], imgs, conds)
        if a.clip and meta["cond"] == "text":      # conds: the captions the images were drawn for
            result["clip_score"] = metrics.ClipScore(a.clip, a.device)(imgs, conds)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
