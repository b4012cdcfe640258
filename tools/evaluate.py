"""
Evaluating Matryoshka Diffusion models (with helpers/measures.py: FD-EffNet, class accuracy,
CLIP score, the motion of video samples), and the paper's main comparison at small scale.

The comparison (section 4.2, Fig. 4): with equal network size and equal compute, train
  simple DM     the same NestedUNet, only the highest resolution's loss (loss_levels=top)
  MDM (no PT)   the joint loss of Eq. 3 from the start
  MDM (PT)      progressive: the low resolution first, then the grown model
and follow FD-EffNet (and class accuracy) along training and wall time:

    python -m tools.evaluate compare    # both: Fashion-MNIST (class-conditional, ImageNet's
                                        # stand-in), then emoji (text-conditional, CC12M's)
    python -m tools.evaluate compare --data fashion-mnist     # one of them
    python -m tools.evaluate sweep --ckpt runs/<run>          # guidance scale: FD vs accuracy (Fig. 8c)
    python -m tools.evaluate fd --ckpt runs/<run>             # FD-EffNet of one trained model
    python -m tools.evaluate video --ckpt runs/<video run>    # does the motion follow the caption?
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import data
import video
from diffusion import SAMPLERS, THRESHOLDING, MatryoshkaDiffusion, make_optimizer, training_step
import helpers.measures as metrics
import helpers.options as opt
from helpers.devices import autocast, prepare, timed
from helpers.models import Trained
from helpers.pictures import save_gif
from nested_unet import PRESETS, NestedUNet, preset

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_run(ckpt: str, device="cpu", video: bool | None = None) -> Trained:
    """A trained run (a folder or an ema.safetensors file; None: the newest run in runs/)."""
    try:
        return Trained(ckpt, device, video=video)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"tools/evaluate.py: {err}")


# ---------------------------------------------------------------------------------------
# The comparison of section 4.2 at small scale
# ---------------------------------------------------------------------------------------

# name -> the train.py flags of the arm; the same network (one NestedUNet config) in all three.
# simple DM differs by its loss, MDM (PT) by its two stages (compare's `plan`, below).
ARMS = {
    "simple DM": ["--loss-levels", "top"],
    "MDM (no PT)": [],
    "MDM (PT)": [],
}


def step_costs(config_name: str, low: int, batch: int, cond: dict, reps: int = 5):
    """Seconds per training step of the low-resolution stage and of the full model, measured
    here with train.py's training step (diffusion.training_step), on the device and in the
    precision train.py will use: the progressive arm's budget is set so that all arms train
    for the same time."""
    device = torch.device(DEVICE)
    out = []
    for truncate in (low, None):                   # the stage-1 model, then the whole NestedUNet
        torch.manual_seed(0)
        cfg = preset(config_name, **cond)
        model = prepare(NestedUNet(cfg.truncated(truncate) if truncate else cfg), device)    # as train.py runs it
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
    """Train every arm with two seeds, each with FD-EffNet (and class accuracy) evaluated along
    the way, then draw the curves against steps and against training time, and a table."""
    out = Path(args.out) / args.data
    out.mkdir(parents=True, exist_ok=True)
    low, high = args.res
    # The conditioning of the two built-in data sets: Fashion-MNIST's 10 classes, or the
    # emoji captions in MiniLM's 384-wide features (data.TextEncoder's default).
    cond = {"num_classes": 10} if args.data == "fashion-mnist" else {"text_channels": 384}
    c_low, c_high = step_costs(args.config, low, args.batch, cond)
    # Equal compute: the other arms take args.steps full steps. PT takes half as many steps of
    # the low-resolution model, which cost pt_low * c_low seconds, the time of
    # pt_low * c_low / c_high full steps; the grown model gets the remaining full steps.
    pt_low = args.steps // 2                       # half the number of steps (less than half the time)
    pt_high = args.steps - round(pt_low * c_low / c_high)
    # arm -> (--res, --steps) of train.py: one stage at the high resolution (the whole
    # NestedUNet, both resolutions), or two stages for progressive training.
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
                   "--lr", str(args.lr), "--out", str(out), "--name", name,
                   "--no-samples", "--log-every", "25", "--eval-every", str(args.eval_every),
                   "--eval-samples", str(args.eval_samples), "--ckpt-every", "1000000"] + ARMS[arm]
            print(" ".join(cmd[1:]), flush=True)
            # A fresh process per run: nothing (RNG, caches, memory) carries over between arms.
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    plot_comparison(out, plan, args)


def slug(s):
    """An arm's folder name: "MDM (no PT)" -> "mdm-no-pt". Not sample.slug: the folders of
    runs already made depend on this one."""
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-").replace("--", "-")


def read_evals(run: Path):
    """The evaluation rows of a run's log.jsonl (the training rows hold losses only)."""
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines() if r.strip()]
    return [r for r in rows if "eval_fd_effnet" in r]


def plot_comparison(out: Path, plan: dict, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["eval_fd_effnet"] + (["eval_class_acc"] if args.data == "fashion-mnist" else [])
    # A row per metric; left against training steps, right against training time (Fig. 4 and
    # appendix D.3's wall-clock view). One colour per arm, the first seed solid, others dashed.
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.8 * len(metrics)), squeeze=False)
    table = []
    for color, arm in zip(("C3", "C0", "C2"), plan):
        finals = {m: [] for m in metrics}
        for k, seed in enumerate(args.seeds):
            ev = read_evals(out / f"{slug(arm)}-seed{seed}")
            for i, m in enumerate(metrics):
                for j, x in enumerate(("step", "time")):     # "time": train.py's seconds -> minutes
                    axes[i, j].plot([r[x] if x == "step" else r[x] / 60 for r in ev], [r[m] for r in ev],
                                    color=color, marker="o", ms=3, alpha=0.9, linestyle="-" if k == 0 else "--",
                                    label=f"{arm}, seed {seed}")
                finals[m].append(ev[-1][m])          # the last evaluation of this seed
        # The table: mean over seeds of the final values, with their range.
        table.append((arm, {m: (np.mean(v), np.min(v), np.max(v)) for m, v in finals.items()}))
    names = {"eval_fd_effnet": "FD-EffNet (lower is better)", "eval_class_acc": "class accuracy (higher is better)"}
    for i, m in enumerate(metrics):
        axes[i, 0].set(xlabel="training step (all stages)", ylabel=names[m])
        axes[i, 1].set(xlabel="training time (minutes; evaluations excluded)", ylabel=names[m])
        for ax in axes[i]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{args.data}: simple DM vs MDM vs MDM with progressive training "
                 f"({args.res[0]}->{args.res[1]}, {args.config}, {len(args.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
    lines = ["| arm | " + " | ".join(names[m] for m in metrics) + " |", "|---" * (1 + len(metrics)) + "|"]
    for arm, v in table:
        lines.append(f"| {arm} | " + " | ".join(f"{a:.3g} ({lo:.3g} to {hi:.3g})" for a, lo, hi in v.values()) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def sweep(args):
    """Guidance scale against FD-EffNet and class accuracy for one class-conditional model:
    the analogue of the paper's Fig. 8c (FID against CLIP score)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(args.ckpt, args.device)
    model, meta, diffusion = run.model, run.meta, run.diffusion
    if meta["cond"] != "label":
        raise SystemExit("tools/evaluate.py sweep: needs a class-conditional model (Fashion-MNIST)")
    # Class accuracy stands in for the paper's CLIP score (does the image show what was asked
    # for?), FD-EffNet for its FID. The classifier stays on the CPU, with the images.
    res = model.resolutions[-1]
    feats = metrics.EffNetFeatures(args.device)
    real = metrics.real_stats(meta["data"], res, 1000, feats)
    clf, clf_acc = metrics.train_classifier(meta["data"], res)
    rows = []
    for w in args.scales:
        # The same seed at every scale (generate_set's default): the same starting noise, so
        # the rows differ by the guidance alone.
        with autocast(args.device):
            imgs, labels = metrics.generate_set(model, diffusion, "label", args.num, meta["class_names"], guidance=w,
                                                steps=args.steps, sampler=args.sampler)
        rows.append({"guidance_scale": w, "fd_effnet": metrics.fd_effnet(imgs, real, feats),
                     "class_acc": metrics.accuracy(clf, imgs, labels)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "guidance_sweep.json").write_text(json.dumps({"rows": rows, "classifier_test_acc": clf_acc}, indent=2))
    # Like Fig. 8c: the condition metric on x, the distance to the data on y, one point per scale.
    fig, ax = plt.subplots(figsize=(5.5, 4))
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
    """Clips of a trained video model (the emoji-motion demo), one motion per caption in turn:
    the fraction whose motion (video.motion_of) is the caption's, per motion and in all, and
    the same measure read on the data set's real clips (how far it can be trusted)."""
    run = load_run(a.ckpt, a.device, video=True)
    if not run.is_video:
        raise SystemExit(f"tools/evaluate.py video: {run.path} is an image model")
    ds = data.EmojiMotion(size=run.model.resolutions[-1], frames=run.model.config.frames)
    rng, M = np.random.default_rng(0), len(data.MOTIONS)
    captions = [f"{ds.names[rng.integers(len(ds.names))]} {data.MOTIONS[i % M]}" for i in range(a.num)]
    settings = run.settings(sampler=a.sampler, num_inference_steps=a.steps, guidance_scale=a.guidance_scale)
    clips = []
    for i in range(0, a.num, 16):                  # 16 clips at a time, each batch its own seed
        with autocast(run.device):
            clips.append(run.diffusion.sample(run.model, run.condition(prompts=captions[i:i + 16]),
                                              batch_size=len(captions[i:i + 16]), **settings,
                                              generator=torch.Generator(run.device).manual_seed(i))[-1].float().cpu())
    right = [video.motion_of(c) == i % M for i, c in enumerate(torch.cat(clips))]
    real = [video.motion_of(ds[i]["image"]) == i % M for i in range(min(len(ds), 600))]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_gif(torch.cat(clips)[:12], f"{out}.gif")
    result = {"clips": a.num, "motion_accuracy": float(np.mean(right)), "chance": 1 / M,
              "per_motion": {m: float(np.mean(right[k::M])) for k, m in enumerate(data.MOTIONS)},
              "measure_on_real_clips": float(np.mean(real)), **settings}
    Path(f"{out}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def check_args(a):
    """Every flag of the subcommand, checked before any work: one line each."""
    opt.check_flags("tools/evaluate.py", a, [
        ("--steps", opt.at_least(1), "at least 1 step"),
        ("--batch", opt.at_least(1), "a batch of at least 1"),
        ("--lr", opt.positive, "a positive learning rate, e.g. 6e-4"),
        ("--seeds", opt.at_least(0), "seeds >= 0, e.g. 0,1"),
        ("--eval-every", opt.at_least(1), "a number of steps >= 1"),
        ("--eval-samples", opt.at_least(2), "at least 2 images (a covariance needs 2)"),
        ("--num", opt.at_least(2), "at least 2 images (a covariance needs 2)"),
        ("--scales", opt.finite, "finite guidance scales, e.g. 1,3,5"),
        ("--guidance-scale", opt.finite, "a finite guidance scale (1: no guidance)"),
    ])
    opt.check_device("tools/evaluate.py", getattr(a, "device", None))
    if a.cmd == "compare":
        unknown = [d for d in a.data.split(",") if d not in ("fashion-mnist", "emoji")]
        if unknown:
            raise SystemExit(f"tools/evaluate.py: --data {a.data}: the comparison runs on the built-in sets "
                             f"fashion-mnist and emoji (comma-separated), not {', '.join(unknown)}")
        if a.config not in PRESETS:
            raise SystemExit(f"tools/evaluate.py: --config {a.config}: not a preset; the presets are {', '.join(PRESETS)}")
        lo_hi = a.res
        if len(lo_hi) != 2 or lo_hi[0] < 1 or lo_hi[1] <= lo_hi[0] or lo_hi[1] % lo_hi[0]:
            raise SystemExit(f"tools/evaluate.py: --res {','.join(map(str, lo_hi))}: expected two resolutions, the low "
                             f"one dividing the high one, e.g. 16,32")
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
    s = sub.add_parser("sweep", help="guidance scale: FD-EffNet vs class accuracy")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--scales", type=opt.comma_list(float, "1,3,5"), default=[1, 1.5, 2, 3, 5, 8])
    s.add_argument("--num", type=int, default=500)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    s.add_argument("--out", default="runs/compare")
    s.add_argument("--device", default=DEVICE)
    f = sub.add_parser("fd", help="FD-EffNet (and class accuracy / CLIP score) of one trained model")
    f.add_argument("--ckpt", default=None)
    f.add_argument("--num", type=int, default=1000)
    f.add_argument("--steps", type=int, default=50)
    f.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    f.add_argument("--guidance-scale", type=float, default=1.0)
    f.add_argument("--thresholding", choices=list(THRESHOLDING), default=None,
                   help="of the predicted x while sampling (default: the one the run records)")
    f.add_argument("--clip", default=None, help="a CLIP model (local folder or cache) for the CLIP score")
    f.add_argument("--device", default=DEVICE)
    v = sub.add_parser("video", help="does the motion of a video model's clips follow the caption?")
    v.add_argument("--ckpt", default=None, help="a video run (default: the newest)")
    v.add_argument("--num", type=int, default=48, help="clips, 8 of each motion")
    v.add_argument("--steps", type=int, default=50)
    v.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    v.add_argument("--guidance-scale", type=float, default=4.0)
    v.add_argument("--out", default="samples/video-eval")
    v.add_argument("--device", default=DEVICE)
    a = p.parse_args(argv)
    check_args(a)
    if a.cmd == "compare":
        for name in a.data.split(","):             # one comparison per data set, in its own folder
            compare(argparse.Namespace(**{**vars(a), "data": name}))
    elif a.cmd == "sweep":
        sweep(a)
    elif a.cmd == "video":
        video_motion(a)
    else:
        # fd: a set of samples of one model against 1,000 real training images.
        run = load_run(a.ckpt, a.device)
        model, meta, diffusion, encoder = run.model, run.meta, run.diffusion, run.encoder
        res = model.resolutions[-1]
        caps = metrics.dataset_captions(meta["data"], res, a.num) if meta["cond"] == "text" else None
        with autocast(a.device):
            imgs, conds = metrics.generate_set(model, diffusion, meta["cond"], a.num, meta.get("class_names"), caps,
                                               encoder, guidance=a.guidance_scale, steps=a.steps, sampler=a.sampler,
                                               thresholding=a.thresholding)
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
