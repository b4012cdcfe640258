"""
Train a Matryoshka Diffusion Model, progressively (section 3.3, appendix B).

`--res 64,256` trains in stages: stage 1 the innermost 64x64 UNet alone, stage 2 that model (and its EMA)
grown into the full NestedUNet, with Eq. 3's joint loss; `--steps` and `--batch` give one number per stage.

On a laptop CPU, the default (a small text-to-image model on the emoji, about 15 minutes):
    python train.py
On one GPU, or N GPUs of one machine (plain DDP through torchrun; bf16 autocast on GPUs):
    torchrun --standalone --nproc_per_node=8 train.py --config MDM-S64S256 --res 64,256 \\
        --steps 300000,500000 --batch 512,256 --data <imagenet folder> --lr 1e-4 \\
        --high-res-fraction 0.5                                                  # appendix B, ImageNet
On several machines (run on each, with its own --node_rank):
    torchrun --nnodes=4 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=<first node>:29500 train.py --config MDM-S64S256 --res 64,256 --lr 1e-4 \\
        --steps 500000,500000 --batch 2048,1024 --data pixparse/cc12m-wds --streaming --image-column jpg \\
        --caption-column txt --text-encoder google/flan-t5-xl --high-res-fraction 0.5  # CC12M
The video demo (video.py's model and moving-emoji clips, about 15 minutes on 2 cores):
    python train.py --config CPU-S16T8 --data emoji-motion --res 16,8x16 --steps 600,450 --batch 64,24
A run that was stopped or killed goes on where it stopped:
    python train.py --resume                  # the newest run in runs/, or --resume runs/<name>

A run folder runs/<name>/ holds log.jsonl, loss.png, samples/, checkpoint.pt (the whole state) and
ema.safetensors (the EMA weights with their config, for sample.py); helpers/run.py's Run keeps it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from diffusion import CLIP_NORM, THRESHOLDING, DiffusionConfig, MatryoshkaDiffusion, make_optimizer, training_step
import helpers.options as opt
from helpers.devices import memory_format, prepare, resolve_precision, setup_processes, to_device
from helpers.files import find_weights
from helpers.models import build_diffusion, build_model, load_weights, text_encoder
from helpers.options import option
from helpers.run import Run, choose_thresholding, parse_sizes
from nested_unet import NestedUNet, NestedUNetConfig, grow

# --- The options: one dataclass, saved in every checkpoint; the command line is made from it ---
# The defaults train the CPU demo; the paper's runs (appendix B) pass --lr 1e-4 --high-res-fraction 0.5.

MODEL, DATA, OPT, SPEED, RUN = "model and stages", "data", "optimisation (appendix B)", "speed and memory", "run"
# The checks of the values (helpers/options.py's check_options), besides its common ones.
GRAD_NORM = (lambda v: v > 0, "a positive gradient norm (inf: no clipping)")
DECAY = (lambda v: opt.finite(v) and 0 <= v < 1, "an EMA decay in [0, 1)")
WEIGHTS, EXPONENT = (opt.at_least(0), "weights >= 0, one per level"), (opt.at_least(0), "an exponent >= 0")
IMAGES = (opt.at_least(2), "at least 2 images (a covariance needs 2)")


@dataclasses.dataclass
class TrainOptions:
    config: str = option("CPU-S16S32", "a preset of nested_unet.py, video.py or tools/release.py, or a JSON "
                         "config file", group=MODEL)
    res: str = option("16,32", "top resolution of each stage, e.g. 64,256 (video: 64,16x64)", group=MODEL)
    steps: list = option([300, 800], "optimizer steps of each stage", opt.COUNT, group=MODEL)
    batch: list = option([64, 32], "global batch of each stage", opt.COUNT, group=MODEL)
    accum: int = option(1, "gradient accumulation: micro-batches per step", opt.COUNT, group=MODEL)
    init_from: str = option(None, "start from a trained run (a folder or ema.safetensors; a converted release): "
                            "fine-tune it, or grow it into the inner levels of --config", group=MODEL)
    data: str = option("emoji", "emoji, fashion-mnist, emoji-motion (video), a folder of images, or a Hugging "
                       "Face data set name", group=DATA)
    data_limit: int = option(0, "use only the first N images (0: all)", opt.NONNEGATIVE, group=DATA)
    cond: str = option("auto", "condition on captions, class labels or nothing (auto: what the data has)",
                       choices=["auto", "text", "label", "none"], group=DATA)
    text_encoder: str = option(None, "minilm (offline, the default) or a transformers name or folder, e.g. "
                               "google/flan-t5-xl (the paper's); with --init-from: that run's", group=DATA)
    text_tokenization: str = option(None, "hf: the tokenizer's own; ml-mdm: as the released models' code "
                                    "(default: --init-from's, or hf)", choices=["hf", "ml-mdm"], group=DATA)
    image_column: str = option("image", "the data set's column of images", group=DATA)
    caption_column: str = option("text", "its column of captions", group=DATA)
    label_column: str = option("label", "its column of class labels", group=DATA)
    streaming: bool = option(False, "stream a large hub data set (CC12M)", group=DATA)
    workers: int = option(0, "data loader processes per rank", opt.NONNEGATIVE, group=DATA)
    hflip: bool = option(False, "random horizontal flips (half the images; usual for ImageNet)", group=DATA)
    lr: float = option(6e-4, "learning rate (appendix B: 1e-4)", opt.POSITIVE, group=OPT)
    warmup: int = option(None, "linear LR warm-up steps per stage (default: a tenth of the stage, at most "
                         "appendix B's 30000)", opt.NONNEGATIVE, type=int, group=OPT)
    clip: float = option(CLIP_NORM, "gradient clipping norm", GRAD_NORM, group=OPT)
    ema: float = option(0.9999, "EMA decay (reached after the EMA warm-up)", DECAY, group=OPT)
    ema_power: float = option(2 / 3, "EMA warm-up: decay = 1 - (1 + step)^-power", opt.POSITIVE, group=OPT)
    high_res_fraction: float = option(1.0, "mixed-resolution training: share of each batch that also goes "
                                      "through the highest resolution (appendix B: 0.5)", opt.FRACTION, group=OPT)
    cond_drop: float = option(0.1, "conditioning dropout for classifier-free guidance", opt.PROBABILITY, group=OPT)
    loss_levels: str = option("all", "all: the joint loss of Eq. 3; top: only the highest resolution (simple DM)",
                              choices=["all", "top"], group=OPT)
    loss_weights: list = option(None, "extra weight per level, lowest first (e.g. 1,4,16)", WEIGHTS,
                                type=opt.comma_list(float, "1,4"), group=OPT)
    shift_power: float = option(2.0, "the resolution shift divides the SNR by s^power", EXPONENT, group=OPT)
    device: str = option(None, "cpu, cuda or cuda:N (default: cuda if there is one)", group=SPEED)
    precision: str = option("auto", "autocast of the network (auto: bf16 on GPUs that have it, else fp16 with "
                            "gradient scaling; fp32 on CPUs)", choices=["auto", "bf16", "fp16", "fp32"], group=SPEED)
    compile: bool = option(False, "torch.compile the model", group=SPEED)
    grad_ckpt: bool = option(False, "gradient checkpointing of the outer levels", group=SPEED)
    channels_last: str = option("auto", "channels-last images (auto: on a CPU)", choices=["auto", "on", "off"],
                                group=SPEED)
    out: str = option("runs", "folder of the run folders", group=RUN)
    name: str = option(None, "run name (default: date-time and data)", group=RUN)
    resume: str = option(None, "resume the newest run, or the run folder given", nargs="?", const="latest", group=RUN)
    seed: int = option(0, "seed of the initial weights and every per-sample draw", opt.NONNEGATIVE, group=RUN)
    log_every: int = option(25, "steps between log rows", opt.COUNT, group=RUN)
    ckpt_every: int = option(200, "steps between checkpoints", opt.COUNT, group=RUN)
    keep_checkpoints: int = option(3, "checkpoints kept besides each stage's last", opt.NONNEGATIVE, group=RUN)
    sample_every: int = option(400, "steps between sample grids", opt.COUNT, group=RUN)
    sample_steps: int = option(50, "DDIM steps of the sample grids", opt.COUNT, group=RUN)
    sample_guidance: float = option(3.0, "guidance scale of the sample grids", opt.FINITE, group=RUN)
    thresholding: str = option("auto", "of the predicted x, recorded for sample.py (auto: Imagen's, or clipping for "
                               "data often black or white)", choices=["auto", *THRESHOLDING], group=RUN)
    sample_prompts: str = option(None, "what the grids draw: prompts (or classes) separated by |, or a file of "
                                 "them (default: 8 of the data's captions, or every class)", group=RUN)
    no_samples: bool = option(False, "no sample grids (tests)", group=RUN)
    tensorboard: bool = option(False, "also log to tensorboard/ (log.jsonl stays the record)", group=RUN)
    eval_every: int = option(0, "FD-EffNet (and class accuracy) every N steps, at the final resolution; 0: never",
                             opt.NONNEGATIVE, group=RUN)
    eval_samples: int = option(256, "generated images per evaluation", IMAGES, group=RUN)
    eval_real: int = option(1000, "real images of the FD statistics", IMAGES, group=RUN)
    eval_steps: int = option(25, "DDIM steps of the evaluation samples (no guidance)", opt.COUNT, group=RUN)
    stop_after: int = option(0, "stop (with a checkpoint) after this many steps of this invocation; --resume "
                             "goes on (for jobs with a time limit)", opt.NONNEGATIVE, group=RUN)


def parse_args(argv=None) -> TrainOptions:
    return parse_args_given(argv)[0]


def parse_args_given(argv=None) -> tuple[TrainOptions, set]:
    """The options, and the names of those the command line gave (what a resumed run checks)."""
    return opt.parse_options(TrainOptions, "train.py", __doc__.split("\n\n")[0], argv)


# --- EMA (appendix B: decay 0.9999), with k-diffusion's warm-up so that short runs average ---
# over a window that grows with the run instead of over their random initialisation
def ema_decay(step: int, max_decay: float, power: float) -> float:
    return min(max_decay, 1 - (1 + step) ** -power)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    for e, p in zip(ema.parameters(), model.parameters()):    # parameters only: the model has no buffers
        e.lerp_(p.detach(), 1 - decay)             # e = decay * e + (1 - decay) * p


# --- Randomness per sample: the diffusion time, the noise of every resolution, the conditioning ---
# dropout and the mixed-resolution draw of a sample are a function of (seed, step, its index in the
# data set): a step computes the same however the batch is split (1 process = N processes = gradient
# accumulation), and a resumed run draws what the run it continues would have drawn. Instead of a
# generator per sample (a Python loop over the batch), number j of stream s of a sample is a hash of
# (sample, s, j), for the whole batch at once on the device. The hash is Chris Wellons' "lowbias32"
# (every input bit flips every output bit with probability close to 1/2), in int64 arithmetic that
# never overflows; two uniforms make two normals (Box-Muller).
M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for 32-bit values held in int64, in two 16-bit halves of c (no overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=16)
def _hashed_counter(n: int, device: torch.device) -> torch.Tensor:
    return hash32(torch.arange(n, device=device, dtype=torch.int64))[None, :]


def uniforms(sample_keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """(B, n) uniforms in (0, 1) of 24 random bits: number j of the given stream of each sample."""
    base = hash32((sample_keys + stream * 0x9E3779B9) & M32)          # one key per (sample, stream)
    return ((hash32(_hashed_counter(n, sample_keys.device) ^ base[:, None]) >> 8).float() + 0.5) / 2 ** 24


def normals(sample_keys: torch.Tensor, stream: int, shape: tuple) -> torch.Tensor:
    n = math.prod(shape)
    u = uniforms(sample_keys, stream, 2 * n)
    return (torch.sqrt(-2 * torch.log(u[:, :n])) * torch.cos(2 * math.pi * u[:, n:])).view(-1, *shape)


def per_sample_randomness(keys: torch.Tensor, step: int, seed: int, shapes: list[tuple], device):
    """Per sample (`keys`: its index in the data set): its time t, the noise of every level (`shapes`
    without the batch), and the uniforms of the dropout and mixed-resolution draws (on the CPU)."""
    k = sample_keys(keys, step, seed)
    t, u_drop, u_high = uniforms(k, 0, 3).unbind(1)
    k = to_device(k, device)
    noises = [normals(k, 1 + i, shape) for i, shape in enumerate(shapes)]
    return to_device(t, device), noises, u_drop, u_high


def sample_keys(keys, step: int, seed: int) -> torch.Tensor:
    """The key of each sample at a step (on the CPU): a hash of (seed, step, its index)."""
    k = torch.as_tensor(keys, dtype=torch.int64).cpu() & M32
    return hash32(hash32(hash32(torch.tensor(seed & M32)) ^ (step & M32)) ^ k)


def flip_draws(keys, step: int, seed: int) -> torch.Tensor:
    """A fourth uniform per sample on the CPU (per_sample_randomness's three stay): the flip of --hflip."""
    return uniforms(sample_keys(keys, step, seed), 0, 4)[:, 3]


# --- A training batch: conditioning dropout, mixed resolution, the per-sample random numbers ---
def prepare_batch(batch: dict, model, encoder, cond_kind: str, step: int, o: TrainOptions, device):
    """One micro-batch made ready for diffusion.loss on the device, dropout and mixed-resolution draw
    applied: (x, t, noises, cond, n_high). x: (B, 3, R, R) in [-1, 1] at the stage's top resolution R;
    a video stage's (B, 3, T, R, R); an image stage of a video run takes the first frames (D^r)."""
    x = to_device(batch["image"], device)          # (the loader pins it on a GPU machine)
    if x.dim() == 4:                               # images, not clips: the model's memory format
        x = x.contiguous(memory_format=memory_format(o.channels_last, device))
    keys = batch["index"]                          # its index in the data set (a stream's: data.HFStream)
    shapes = [s[1:] for s in model.input_shapes(1)]
    t, noises, u_drop, u_high = per_sample_randomness(keys, step, o.seed, shapes, device)
    if o.hflip:                                    # half the images mirrored (every frame of a clip)
        flip = to_device(flip_draws(keys, step, o.seed) < 0.5, device)
        x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
    # Conditioning dropout (--cond-drop): those samples learn the null condition, which
    # classifier-free guidance contrasts with when sampling. Its null text is no visible token, or
    # for the released models' architecture (null_text="empty_prompt") the caption "".
    drop = u_drop < o.cond_drop
    cond = {}                                      # the encoder's text features (B, L, C), or labels (B,)
    if cond_kind == "text":
        captions = batch["caption"]
        if model.null_text == "empty_prompt":
            captions, drop = ["" if d else c for c, d in zip(captions, drop.tolist())], torch.zeros_like(drop)
        cond = encoder.condition(captions, device)
    elif cond_kind == "label":
        cond = {"label": to_device(batch["label"], device)}
    cond = model.null_condition(cond, to_device(drop, device))
    # Mixed-resolution training (appendix B): each sample reaches the highest level with
    # probability --high-res-fraction; all train the lower levels. The NestedUNet runs its
    # outermost level on the first n_high rows only, so those samples go first.
    high = u_high < o.high_res_fraction if len(model.resolutions) > 1 else torch.ones_like(u_high, dtype=bool)
    order = torch.argsort((~high).int(), stable=True)
    n_high = int(high.sum())                       # on the CPU: no sync
    od = to_device(order, device)
    x, t, noises = x[od], t[od], [n[od] for n in noises]
    noises[-1] = noises[-1][:n_high]
    cond = {k: v[od] for k, v in cond.items()}
    return x, t, noises, cond, n_high


# --- The data of a run, and what it conditions the model on ----------------------------------
@dataclasses.dataclass
class RunData:
    """The stage's data set (`full`: without --data-limit), its conditioning, class names, text encoder."""
    dataset: object
    full: object
    cond_kind: str
    class_names: list | None
    encoder: data.TextEncoder | None


def load_data(o: TrainOptions, size, frames: int):
    """The data set of a stage, at its own top resolution (the paper's 64x64 stage is a 64x64
    training run): a map-style data set (first --data-limit images), or a stream."""
    if o.streaming:
        return data.HFStream(o.data, size[1], o.image_column, o.caption_column)
    try:
        ds = data.load_dataset(o.data, size[1], frames=frames, image_column=o.image_column,
                               caption_column=o.caption_column, label_column=o.label_column)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"train.py: {e}")
    return torch.utils.data.Subset(ds, range(min(o.data_limit, len(ds)))) if o.data_limit else ds


def setup_data(o: TrainOptions, size, frames: int, world: int, device) -> RunData:
    dataset = load_data(o, size, frames)
    full = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    if o.streaming:
        has_text, class_names = True, None
    else:
        has_text = getattr(full, "captions", None) is not None or getattr(full, "caption_column", None)
        class_names = getattr(full, "class_names", None)
        if len(dataset) < o.batch[0] // world:
            raise SystemExit(f"train.py: --data {o.data} has {len(dataset)} images, fewer than one "
                             f"batch per process ({o.batch[0] // world})")
    cond_kind = o.cond if o.cond != "auto" else ("text" if has_text else "label" if class_names else "none")
    if cond_kind == "label" and not class_names:
        raise SystemExit(f"train.py: --cond label: {o.data} has no class labels")
    if cond_kind == "text" and not has_text:
        raise SystemExit(f"train.py: --cond text: {o.data} has no captions (--caption-column {o.caption_column})")
    encoder = None  # the text encoder is frozen (FLAN-T5 XL in the paper): only the model's projection trains
    if cond_kind == "text":                        # a stream's captions do not come back: no cache
        try:
            encoder = text_encoder(o.text_encoder, device, o.text_tokenization,
                                   **({"cache_size": 0} if o.streaming else {}))
        except ValueError as e:
            raise SystemExit(f"train.py: {e}")
        if not o.streaming and full.captions is not None:
            encoder(list(dict.fromkeys(full.captions)))   # a fixed caption set: encode it once, now
    return RunData(dataset, full, cond_kind, class_names, encoder)


def conditioned(cfg: NestedUNetConfig, d: RunData) -> NestedUNetConfig:
    """The model's inputs as the data sets them: text width or classes (section 3.2), image channels."""
    return dataclasses.replace(cfg, text_channels=d.encoder.dim if d.encoder else 0,
                               num_classes=len(d.class_names) if d.cond_kind == "label" else 0,
                               in_channels=getattr(d.full, "channels", 3))


def load_init(o: TrainOptions, resuming: bool):
    """--init-from's model and metadata; its text encoder and tokenisation become the run's, unless given."""
    init, meta = None, {}
    if o.init_from is not None and not resuming:
        try:
            init, meta = load_weights(find_weights(o.init_from))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: --init-from: {e}")
    o.text_encoder = o.text_encoder or meta.get("text_encoder") or "minilm"   # resolved once, and saved
    o.text_tokenization = o.text_tokenization or meta.get("text_tokenization", "hf")
    return init, meta


def run_meta(o: TrainOptions, d: RunData, cfg: NestedUNetConfig, init_meta: dict) -> dict:
    """What sample.py needs besides the weights; a video run samples as its grids do (DDIM, guidance 4)."""
    sampling = init_meta.get("sampling") or ({"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 4.0}
                                            if cfg.frames > 1 else None)
    return {"cond": d.cond_kind, "text_encoder": o.text_encoder if d.encoder else None,
            "class_names": d.class_names, "text_tokenization": o.text_tokenization, "data": o.data, "res": o.res,
            "video": cfg.frames > 1, "data_limit": o.data_limit, **({"sampling": sampling} if sampling else {})}


# --- A stage's model: built, or grown from the previous stage's ------------------------------
@dataclasses.dataclass
class Stage:
    """A stage's model, EMA, optimizer, LR schedule, the module that runs the step, diffusion, batches."""
    index: int
    model: NestedUNet
    ema: NestedUNet
    opt: torch.optim.Optimizer
    sched: object
    train_model: torch.nn.Module
    diffusion: MatryoshkaDiffusion
    scaler: torch.amp.GradScaler | None
    batches: data.Batches | None = None


def build_stage(o: TrainOptions, index: int, cfg_full, dcfg, device, world, init=None, previous: Stage = None,
                precision: str = "fp32") -> Stage:
    """Stage 0 builds the innermost model (or --init-from's); a later stage grows the previous (3.3)."""
    sizes = parse_sizes(o.res)
    cfg = cfg_full.truncated(sizes[index][1], sizes[index][0])
    if previous is None:
        torch.manual_seed(o.seed)                  # the same initial weights on every rank
        if init is not None and init.config.to_dict() != cfg.to_dict():
            # --init-from a smaller model: it becomes this stage's inner levels, grow() adds the rest.
            try:
                model = grow(init.to(device), cfg, build_model)
            except ValueError as e:
                raise SystemExit(f"train.py: --init-from {o.init_from}: {e}")
        else:
            model = build_model(cfg).to(device)
            if init is not None:                   # --init-from the same model: fine-tuning
                model.load_state_dict(init.state_dict())
        ema = build_model(cfg).to(device)
        ema.load_state_dict(model.state_dict())
    else:
        torch.manual_seed(o.seed + index)          # the new level: the same random weights in model and EMA
        model = grow(previous.model, cfg, build_model)
        torch.manual_seed(o.seed + index)
        ema = grow(previous.ema, cfg, build_model)
    ema.requires_grad_(False).eval()
    if o.grad_ckpt:
        for level in model.levels()[1:]:
            level.gradient_checkpointing = True
    model, ema = prepare(model, device, o.channels_last), prepare(ema, device, o.channels_last)
    # A fresh optimizer per stage (new parameters), with its own warm-up: appendix B's 30k steps or a tenth.
    opt = make_optimizer(model, o.lr)
    warm = max(1, o.warmup if o.warmup is not None else min(30_000, o.steps[index] // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    # The module that runs the step: DDP all-reduces the gradients during backward. Compiling the DDP
    # model is the order PyTorch documents (its DDPOptimizer cuts the graph at the gradient buckets, so
    # communication still overlaps backward). `model` stays the plain module (state dict, EMA, grow).
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    train_model = torch.compile(train_model) if o.compile else train_model
    # The diffusion of the stage's levels: --loss-weights has a weight per level of the whole model,
    # lowest first; a stage takes its own. A video run's D^r (first frames) serves its image stage too.
    n = len(model.levels())
    stage_cfg = dataclasses.replace(dcfg, loss_weights=dcfg.loss_weights[:n] if dcfg.loss_weights else None)
    diffusion = build_diffusion(model, stage_cfg, clips=cfg_full.frames > 1)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Stage(index, model, ema, opt, sched, train_model, diffusion, scaler)


def stage_batches(o: TrainOptions, dataset, index: int, rank: int, world: int, position: dict) -> data.Batches:
    """This rank's batches of stage `index` from `position` on (--batch = world x accum x micro-batch)."""
    return data.Batches(dataset, o.batch[index] // (world * o.accum), rank, world, o.seed, o.workers, **position)


# --- A step ----------------------------------------------------------------------------------
def optimizer_step(st: Stage, d: RunData, o: TrainOptions, step: int, world: int, device, autocast, log):
    """Step `step` (from 0): --accum micro-batches (the wait for the loader is logged as data_wait),
    Eq. 3's loss, clipping and Adam (diffusion.training_step), the warm-up, the EMA."""
    st.model.train()
    micro = []
    for _ in range(o.accum):
        t0 = time.perf_counter()
        batch = next(st.batches)
        log.wait += time.perf_counter() - t0
        x, t, noises, cond, n_high = prepare_batch(batch, st.model, d.encoder, d.cond_kind, step, o, device)
        micro.append((x, cond, t, noises, n_high))
    # Under DDP only the last micro-batch all-reduces (no_sync); not under --compile, where
    # every micro-batch all-reduces (the same result, more communication).
    sums, bad = training_step(st.diffusion, st.model, st.opt, micro, st.train_model, o.clip,
                              o.high_res_fraction if len(st.model.resolutions) > 1 else None, autocast,
                              st.train_model.no_sync if world > 1 and not o.compile else None, st.scaler)
    # The learning rate's warm-up, then the EMA: the weights that sample.py uses. The EMA follows every
    # step, also the last of a stage, so a grown model starts from the average the small one ended with.
    st.sched.step()
    update_ema(st.ema, st.model, ema_decay(step + 1, o.ema, o.ema_power))
    log.sums += sums
    log.nonfinite |= bad
    log.steps += 1


# --- The training story ----------------------------------------------------------------------
def main(argv=None):
    # -- the options (a resumed run's own) and the model config, checked; the processes --
    run = Run.open(*parse_args_given(argv), defaults=parse_args([]))
    o, cfg_full = run.options, run.config          # the whole model; each stage trains a truncation of it
    rank, world, device = setup_processes(o.device)
    init, init_meta = load_init(o, run.ckpt is not None)

    # -- the data, and the conditioning inputs it sets: the encoder's width, or the classes --
    sizes, stage_ends = parse_sizes(o.res), np.cumsum(o.steps).tolist()   # stage s ends at step stage_ends[s]
    first, step = run.position()
    d = setup_data(o, sizes[first], cfg_full.frames, world, device)
    cfg_full = conditioned(cfg_full, d)
    dcfg = DiffusionConfig(shift_power=o.shift_power, loss_weights=o.loss_weights, loss_levels=o.loss_levels,
                           thresholding=choose_thresholding(o, d.full, init_meta, rank == 0))

    # -- the model of the current stage (resumed: its whole state), its data position --
    precision = resolve_precision(o.precision, device)      # what "auto" means on this device
    st = build_stage(o, 0, cfg_full, dcfg, device, world, init, precision=precision)
    for s in range(1, first + 1):                  # a resumed run's stage: its shape, grown step by step
        st = build_stage(o, s, cfg_full, dcfg, device, world, previous=st, precision=precision)
    if run.ckpt:
        run.restore(st, rank)
    else:
        torch.manual_seed(o.seed * 1000 + rank)    # per-rank seed for everything not per-sample
    st.batches = stage_batches(o, d.dataset, first, rank, world, run.ckpt["data"] if run.ckpt else {})

    # -- the run folder, log, grids, evaluations, a polite stop (SIGTERM); the loops over stages and steps --
    run.start(st, d, run_meta(o, d, cfg_full, init_meta), rank, world, device, precision)
    try:
        for stage in range(first, len(sizes)):
            while step < stage_ends[stage] and not run.stopping.is_set():
                optimizer_step(st, d, o, step, world, device, run.autocast, run.log)
                step += 1
                run.after_step(st, step)          # the log row, grids, evaluations, a checkpoint when due
            if step == stage_ends[stage] and stage < len(sizes) - 1:   # grow (section 3.3); a resume starts here
                position = st.batches.state()
                st = build_stage(o, stage + 1, cfg_full, dcfg, device, world, previous=st, precision=precision)
                st.batches = stage_batches(o, load_data(o, sizes[stage + 1], cfg_full.frames), stage + 1, rank,
                                           world, position)
                run.new_stage(st, step)
            if run.stopping.is_set():
                break
    except KeyboardInterrupt:                      # Ctrl-C: saved, like a stop
        run.save(st, step)
    except FloatingPointError:
        run.diverged(step)                         # says so, and exits with 1: the last good checkpoint stays
    run.finish(step, d.cond_kind)
    return run.dir


if __name__ == "__main__":
    main()
