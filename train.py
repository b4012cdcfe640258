"""
Train a Matryoshka Diffusion Model, progressively (section 3.3, appendix B).

`--res 64,256` trains in stages: stage 1 trains the model up to 64x64 (its innermost UNet
alone), stage 2 wraps that model (and its EMA) as the inner model of the full NestedUNet with
`grow` and trains all of it, the joint loss of Eq. 3 over every resolution. `--steps` and
`--batch` give one number per stage, in appendix B's form.

On a laptop CPU, the default (a small text-to-image model on the built-in emoji data set,
about 15 minutes on 2 cores):
    python train.py
On one GPU, or N GPUs of one machine (plain DDP through torchrun; bf16 autocast on GPUs):
    torchrun --standalone --nproc_per_node=8 train.py --config MDM-S64S256 --res 64,256 \\
        --steps 300000,500000 --batch 512,256 --data <imagenet folder> --lr 1e-4 \\
        --high-res-fraction 0.5                                                  # appendix B, ImageNet
On several machines (run on each, with its own --node_rank):
    torchrun --nnodes=4 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=<first node>:29500 train.py --config MDM-S64S256 --res 64,256 \\
        --steps 500000,500000 --batch 2048,1024 --data pixparse/cc12m-wds --streaming \\
        --image-column jpg --caption-column txt --text-encoder google/flan-t5-xl \\
        --lr 1e-4 --high-res-fraction 0.5                                        # CC12M
The video demo (video.py's model and moving-emoji clips, about 15 minutes on 2 cores):
    python train.py --config CPU-S16T8 --data emoji-motion --res 16,8x16 --steps 600,450 --batch 64,24
A run that was stopped or killed goes on where it stopped:
    python train.py --resume                  # the newest run in runs/
    python train.py --resume runs/<name>      # that run

Each run writes a folder runs/<name>/: options.json, log.jsonl (losses per resolution, steps/s,
images/s), loss.png, samples/ (grids every --sample-every steps), checkpoint.pt (the whole
state, written atomically) and ema.safetensors (EMA weights with their config, for sample.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import runs
import utils
import video
from diffusion import DiffusionConfig, MatryoshkaDiffusion, make_optimizer, training_step, CLIP_NORM, THRESHOLDING
from nested_unet import NestedUNet, NestedUNetConfig, grow
from runs import Log, check_args, load_model_config, parse_sizes, save_checkpoint, side_work
from utils import option, to_device

# ---------------------------------------------------------------------------------------
# The options: one dataclass, saved in every checkpoint; the command line is made from it
# ---------------------------------------------------------------------------------------
# The defaults train the CPU demo; the paper's runs (appendix B) pass --lr 1e-4 and
# --high-res-fraction 0.5, as the commands above do.

MODEL, DATA, OPT, SPEED, RUN = "model and stages", "data", "optimisation (appendix B)", "speed and memory", "run"
# The checks of the values (utils.check_options), besides the common ones of utils.
GRAD_NORM = (lambda v: v > 0, "a positive gradient norm (inf: no clipping)")
DECAY = (lambda v: utils.finite(v) and 0 <= v < 1, "an EMA decay in [0, 1)")
WEIGHTS, EXPONENT = (utils.at_least(0), "weights >= 0, one per level"), (utils.at_least(0), "an exponent >= 0")
IMAGES = (utils.at_least(2), "at least 2 images (a covariance needs 2)")


@dataclass
class TrainOptions:
    config: str = option("CPU-S16S32", "a preset of nested_unet.py or video.py, or a JSON config file", group=MODEL)
    res: str = option("16,32", "top resolution of each stage, e.g. 64,256 (video: 64,16x64)", group=MODEL)
    steps: list = option([300, 800], "optimizer steps of each stage", utils.COUNT, group=MODEL)
    batch: list = option([64, 32], "global batch of each stage", utils.COUNT, group=MODEL)
    accum: int = option(1, "gradient accumulation: micro-batches per step", utils.COUNT, group=MODEL)
    init_from: str = option(None, "start from a trained run's weights (a run folder or ema.safetensors, e.g. a "
                            "released model converted by release.py): fine-tune it, or grow it into the inner "
                            "levels of --config", group=MODEL)
    data: str = option("emoji", "emoji, fashion-mnist, emoji-motion (video), a folder of images, or a Hugging "
                       "Face data set name", group=DATA)
    data_limit: int = option(0, "use only the first N images (0: all)", utils.NONNEGATIVE, group=DATA)
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
    workers: int = option(0, "data loader processes per rank", utils.NONNEGATIVE, group=DATA)
    hflip: bool = option(False, "random horizontal flips (half the images; usual for ImageNet)", group=DATA)
    lr: float = option(6e-4, "learning rate: appendix B's is 1e-4; the CPU demo takes 6e-4 (its model trains "
                       "for minutes, not days)", utils.POSITIVE, group=OPT)
    warmup: int = option(None, "linear LR warm-up steps per stage (default: a tenth of the stage, at most "
                         "appendix B's 30000)", utils.NONNEGATIVE, type=int, group=OPT)
    clip: float = option(CLIP_NORM, "gradient clipping norm", GRAD_NORM, group=OPT)
    ema: float = option(0.9999, "EMA decay (reached after the EMA warm-up)", DECAY, group=OPT)
    ema_power: float = option(2 / 3, "EMA warm-up: decay = 1 - (1 + step)^-power", utils.POSITIVE, group=OPT)
    high_res_fraction: float = option(1.0, "mixed-resolution training: share of each batch that also goes "
                                      "through the highest resolution (appendix B: 0.5; the CPU demo sends all: "
                                      "its outer level costs less than its inner UNet)", utils.FRACTION, group=OPT)
    cond_drop: float = option(0.1, "conditioning dropout for classifier-free guidance", utils.PROBABILITY, group=OPT)
    loss_levels: str = option("all", "all: the joint loss of Eq. 3; top: only the highest resolution (simple DM)",
                              choices=["all", "top"], group=OPT)
    loss_weights: list = option(None, "extra weight per level, lowest first (e.g. 1,4,16)", WEIGHTS,
                                type=utils.comma_list(float, "1,4"), group=OPT)
    shift_power: float = option(2.0, "the resolution shift divides the SNR by s^power", EXPONENT, group=OPT)
    device: str = option(None, "cpu, cuda or cuda:N (default: cuda if there is one)", group=SPEED)
    precision: str = option("auto", "autocast of the network: bf16 (appendix B), fp16 with gradient scaling (GPUs "
                            "without bf16: T4, V100), fp32; auto: bf16 on GPUs that have it, else fp16, fp32 on CPUs",
                            choices=["auto", "bf16", "fp16", "fp32"], group=SPEED)
    compile: bool = option(False, "torch.compile the model", group=SPEED)
    grad_ckpt: bool = option(False, "gradient checkpointing of the outer levels", group=SPEED)
    channels_last: str = option("auto", "channels-last memory format of images: on, off, or auto: on a CPU (its "
                                "convolutions are faster so), not on a GPU", choices=["auto", "on", "off"], group=SPEED)
    out: str = option("runs", "folder of the run folders", group=RUN)
    name: str = option(None, "run name (default: date-time and data)", group=RUN)
    resume: str = option(None, "resume the newest run, or the run folder given", nargs="?", const="latest", group=RUN)
    seed: int = option(0, "the seed of initial weights and of every per-sample random number", utils.NONNEGATIVE,
                       group=RUN)
    log_every: int = option(25, "steps between log rows", utils.COUNT, group=RUN)
    ckpt_every: int = option(200, "steps between checkpoints", utils.COUNT, group=RUN)
    keep_checkpoints: int = option(3, "checkpoints kept in checkpoints/ besides each stage's last (checkpoint.pt is "
                                   "always the latest)", utils.NONNEGATIVE, group=RUN)
    sample_every: int = option(400, "steps between sample grids", utils.COUNT, group=RUN)
    sample_steps: int = option(50, "DDIM steps of the sample grids", utils.COUNT, group=RUN)
    sample_guidance: float = option(3.0, "guidance scale of the sample grids", utils.FINITE, group=RUN)
    thresholding: str = option("auto", "of the predicted x while sampling, recorded for sample.py: auto chooses "
                               "Imagen's dynamic thresholding, or plain clipping for data whose pixels are often "
                               "black or white (printed)", choices=["auto", *THRESHOLDING], group=RUN)
    sample_prompts: str = option(None, "what the sample grids draw: prompts separated by |, or a file of them, one "
                                 "per line (class names or indices for a class-conditional model); default: 8 of "
                                 "the data's captions, or every class", group=RUN)
    no_samples: bool = option(False, "no sample grids (tests)", group=RUN)
    tensorboard: bool = option(False, "also log to TensorBoard, in the run folder's tensorboard/ (log.jsonl stays "
                               "the record; needs the tensorboard package)", group=RUN)
    eval_every: int = option(0, "FD-EffNet (and class accuracy) every N steps, at the final resolution; 0: never",
                             utils.NONNEGATIVE, group=RUN)
    eval_samples: int = option(256, "generated images per evaluation", IMAGES, group=RUN)
    eval_real: int = option(1000, "real images of the FD statistics", IMAGES, group=RUN)
    eval_steps: int = option(25, "DDIM steps of the evaluation samples (no guidance)", utils.COUNT, group=RUN)
    stop_after: int = option(0, "stop (with a checkpoint) after this many steps of this invocation; --resume "
                             "goes on (for jobs with a time limit)", utils.NONNEGATIVE, group=RUN)


def parse_args(argv=None) -> TrainOptions:
    return parse_args_given(argv)[0]


def parse_args_given(argv=None) -> tuple[TrainOptions, set]:
    """The options, and the names of those the command line gave (a resumed run takes the
    given ones that may change, and refuses the others where they differ)."""
    return utils.parse_options(TrainOptions, "train.py", __doc__.split("\n\n")[0], argv)


# ---------------------------------------------------------------------------------------
# EMA (appendix B: decay 0.9999), with k-diffusion's warm-up so that short runs average
# over a window that grows with the run instead of over their random initialisation
# ---------------------------------------------------------------------------------------

def ema_decay(step: int, max_decay: float, power: float) -> float:
    return min(max_decay, 1 - (1 + step) ** -power)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)             # e = decay * e + (1 - decay) * p


# ---------------------------------------------------------------------------------------
# A training batch: conditioning dropout, mixed resolution, the per-sample random numbers
# ---------------------------------------------------------------------------------------

def prepare_batch(batch: dict, model, encoder, cond_kind: str, step: int, o: TrainOptions, device):
    """One micro-batch from the loader, made ready for diffusion.loss: images, diffusion
    times, noises and conditions on the device, with the conditioning dropout and the
    mixed-resolution draw applied. Returns (x, t, noises, cond, n_high)."""
    # x: (B, 3, R, R) in [-1, 1] at this stage's top resolution R; for a video stage
    # (B, 3, T, R, R). An image stage of a video run takes the clips' first frames (video.py's
    # temporal D^r). B here is one process's micro-batch.
    x = to_device(batch["image"], device)          # (the loader pins it on a GPU machine)
    if x.dim() == 4:                               # images, not clips: the model's memory format
        x = x.contiguous(memory_format=utils.memory_format(o.channels_last, device))
    # A sample's key: its index in the data set (in a stream, its position in the stream of its
    # rank and loader worker, made unique over them: runs.HFStream).
    keys = batch["index"]
    shapes = [s[1:] for s in model.input_shapes(1)]
    t, noises, u_drop, u_high = utils.per_sample_randomness(keys, step, o.seed, shapes, device)
    if o.hflip:                                    # half the images mirrored (every frame of a clip)
        flip = to_device(utils.flip_draws(keys, step, o.seed) < 0.5, device)
        x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
    # Conditioning dropout (--cond-drop, 10% by default): those samples learn the null
    # condition, which classifier-free guidance contrasts with at sampling time (decided on
    # the CPU). Its null text is no visible token, or for the released models' architecture
    # (null_text="empty_prompt") the caption "".
    drop = u_drop < o.cond_drop
    # The condition: text features (B, L, text_channels) of the frozen encoder (a fixed
    # caption set is encoded once and looked up), or class labels (B,).
    cond = {}
    if cond_kind == "text":
        captions = batch["caption"]
        if model.config.null_text == "empty_prompt":
            captions, drop = ["" if d else c for c, d in zip(captions, drop.tolist())], torch.zeros_like(drop)
        cond = encoder.condition(captions, device)
    elif cond_kind == "label":
        cond = {"label": to_device(batch["label"], device)}
    cond = model.null_condition(cond, drop)
    # Mixed-resolution training (appendix B): each sample reaches the highest level with
    # probability --high-res-fraction; all samples train the lower levels. The NestedUNet
    # runs its outermost level on the first n_high rows only, so those samples go first;
    # the rest skip the costliest resolution.
    if len(model.resolutions) > 1:
        high = u_high < o.high_res_fraction
    else:
        high = torch.ones_like(u_high, dtype=torch.bool)
    order = torch.argsort((~high).int(), stable=True)
    n_high = int(high.sum())                       # on the CPU: no sync
    od = to_device(order, device)
    x, t = x[od], t[od]
    noises = [n[od] for n in noises]
    noises[-1] = noises[-1][:n_high]
    cond = {k: v[od] for k, v in cond.items()}
    return x, t, noises, cond, n_high


# ---------------------------------------------------------------------------------------
# A stage's model: built, or grown from the previous stage's (the run's data and folder: runs.py)
# ---------------------------------------------------------------------------------------

def conditioned(cfg: NestedUNetConfig, d: runs.RunData) -> NestedUNetConfig:
    """The model's inputs as the data sets them: the text encoder's width or the number of
    classes (section 3.2's conditioning), and the image channels (one for Fashion-MNIST)."""
    return NestedUNetConfig(**{**cfg.to_dict(), "text_channels": d.encoder.dim if d.encoder else 0,
                               "num_classes": len(d.class_names) if d.cond_kind == "label" else 0,
                               "in_channels": getattr(d.full, "channels", 3)})


@dataclass
class Stage:
    """A stage's model, its EMA, optimizer and LR schedule, the module that runs the step,
    the diffusion process of its levels, and its batches."""
    index: int
    model: NestedUNet
    ema: NestedUNet
    opt: torch.optim.Optimizer
    sched: object
    train_model: torch.nn.Module
    diffusion: MatryoshkaDiffusion
    scaler: torch.amp.GradScaler | None
    batches: runs.Batches | None = None


def build_stage(o: TrainOptions, index: int, cfg_full, dcfg, device, world, init=None, previous: Stage = None,
                precision: str = "fp32") -> Stage:
    """Stage 0 builds the innermost model (or starts from --init-from's); a later stage grows
    the previous one (section 3.3), model and EMA alike."""
    sizes = parse_sizes(o.res)
    cfg = cfg_full.truncated(sizes[index][1], sizes[index][0])
    build = video.build_level if any(c.temporal_axis for c in cfg_full.levels()) else NestedUNet
    if previous is None:
        torch.manual_seed(o.seed)                  # the same initial weights on every rank
        if init is not None and init.config.to_dict() != cfg.to_dict():
            # --init-from a smaller model: it becomes this stage's inner levels, and the new
            # levels start as grow() starts them.
            try:
                model = grow(init.to(device), cfg, build)
            except ValueError as e:
                raise SystemExit(f"train.py: --init-from {o.init_from}: {e}")
        else:
            model = build(cfg).to(device)
            if init is not None:                   # --init-from the same model: fine-tuning
                model.load_state_dict(init.state_dict())
        ema = build(cfg).to(device)
        ema.load_state_dict(model.state_dict())
    else:
        # The new level starts from the same random weights in the model and its EMA.
        torch.manual_seed(o.seed + index)
        model = grow(previous.model, cfg, build)
        torch.manual_seed(o.seed + index)
        ema = grow(previous.ema, cfg, build)
    ema.requires_grad_(False).eval()
    if o.grad_ckpt:
        for level in model.levels()[1:]:
            level.gradient_checkpointing = True
    layout = utils.memory_format(o.channels_last, device, cfg.frames)
    model, ema = model.to(memory_format=layout), ema.to(memory_format=layout)
    # A fresh optimizer per stage (the grown model has new parameters), with its own
    # warm-up: appendix B's 30k steps, or a tenth of a short stage.
    opt = make_optimizer(model, o.lr)
    warm = max(1, o.warmup if o.warmup is not None else min(30_000, o.steps[index] // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    # The module that runs the step: DDP all-reduces the gradients during backward.
    # Compiling the DDP-wrapped model is the order PyTorch documents (its DDPOptimizer cuts
    # the graph at the gradient buckets, so communication still overlaps the backward
    # pass). `model` stays the plain module: its state dict, the EMA and grow() use it.
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    train_model = torch.compile(train_model) if o.compile else train_model
    # The diffusion process of the stage's levels (of the model and its EMA alike):
    # --loss-weights gives one weight per level of the whole model, lowest first, and a stage
    # takes those of its own levels. A video run's D^r (first frames) serves its image stage too.
    n = len(model.levels())
    stage_cfg = dataclasses.replace(dcfg, loss_weights=dcfg.loss_weights[:n] if dcfg.loss_weights else None)
    diffusion = (video.diffusion_for if build is not NestedUNet else MatryoshkaDiffusion.for_model)(model, stage_cfg)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Stage(index, model, ema, opt, sched, train_model, diffusion, scaler)


# ---------------------------------------------------------------------------------------
# A step, and a stage's start
# ---------------------------------------------------------------------------------------

def optimizer_step(st: Stage, d: runs.RunData, o: TrainOptions, step: int, world: int, device, autocast, log: Log):
    """Step number `step` (from 0): --accum micro-batches (the time spent waiting for the
    loader is logged as data_wait: workers decode the next batches while the model runs),
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
    st.sched.step()
    update_ema(st.ema, st.model, ema_decay(step + 1, o.ema, o.ema_power))
    log.sums += sums
    log.nonfinite |= bad
    log.steps += 1


def restore_stage(o: TrainOptions, ckpt, first: int, cfg_full, dcfg, d: runs.RunData, init, rank: int, world: int,
                  device, precision: str) -> Stage:
    """The stage a run starts at: stage 0's model (or --init-from's), or for a resumed run its
    stage's shape grown step by step, then the whole saved state (weights, EMA, Adam's
    moments, the schedule's step, this rank's RNG states: ranks beyond those saved take the
    last's) and the data position."""
    st = build_stage(o, 0, cfg_full, dcfg, device, world, init, precision=precision)
    for s in range(1, first + 1):
        st = build_stage(o, s, cfg_full, dcfg, device, world, previous=st, precision=precision)
    if ckpt:
        runs.load_state(st, ckpt, rank)
    else:
        torch.manual_seed(o.seed * 1000 + rank)    # per-rank seed for everything not per-sample
    st.batches = stage_batches(o, d.dataset, first, rank, world, ckpt["data"] if ckpt else {})
    return st


def start_stage(o: TrainOptions, index: int, cfg_full, dcfg, data_position: dict, rank: int, world: int, device,
                precision: str, previous: Stage) -> Stage:
    """A stage ready to train: its model grown from the previous stage's, and its batches, at
    its own top resolution, from `data_position` on."""
    st = build_stage(o, index, cfg_full, dcfg, device, world, previous=previous, precision=precision)
    dataset = runs.load_data(o, parse_sizes(o.res)[index], cfg_full.frames)
    st.batches = stage_batches(o, dataset, index, rank, world, data_position)
    return st


def stage_batches(o: TrainOptions, dataset, index: int, rank: int, world: int, position: dict) -> runs.Batches:
    """This rank's batches of stage `index`, from the data position `position` on. --batch is
    the global batch of a step: world processes x accum micro-batches x micro-batch."""
    return runs.Batches(dataset, o.batch[index] // (world * o.accum), rank, world, o.seed, o.workers, **position)


# ---------------------------------------------------------------------------------------
# The training story
# ---------------------------------------------------------------------------------------

def main(argv=None):
    # -- the options (a resumed run's own), the model config, their checks, the processes --
    o, ckpt, run_dir, changes = runs.open_run(*parse_args_given(argv), defaults=parse_args([]))
    cfg_full = load_model_config(o.config)         # the whole model; each stage trains a truncation of it
    check_args(o, utils.process_env()[1], cfg_full)
    rank, world, device = utils.setup_processes(o.device)
    is_main = rank == 0
    init, init_meta = runs.load_init(o, ckpt is not None)

    # -- the data, and the conditioning inputs it sets: the encoder's width, or the classes --
    sizes, stage_ends = parse_sizes(o.res), np.cumsum(o.steps).tolist()   # stage s ends at step stage_ends[s]
    first, step = (ckpt["stage"], ckpt["step"]) if ckpt else (0, 0)
    d = runs.setup_data(o, sizes[first], cfg_full.frames, world, device)
    cfg_full = conditioned(cfg_full, d)
    dcfg = DiffusionConfig(shift_power=o.shift_power, loss_weights=o.loss_weights, loss_levels=o.loss_levels,
                           thresholding=runs.choose_thresholding(o, d.full, init_meta, is_main))

    # -- the run folder, and the model of the current stage (resumed: its whole state) --
    run_dir = runs.make_run_dir(o, run_dir, ckpt, changes, is_main)
    meta = runs.run_meta(o, d, cfg_full, init_meta)
    precision = utils.resolve_precision(o.precision, device)      # what "auto" means on this device
    st = restore_stage(o, ckpt, first, cfg_full, dcfg, d, init, rank, world, device, precision)

    # -- precision, sample grids, evaluations, the log, a polite stop (SIGTERM of a cluster) --
    autocast = utils.autocast(device, precision)
    grid, evaluate = runs.side_tools(o, d, sizes[-1], device) if is_main else (None, None)
    log = Log(run_dir, ckpt, len(st.model.resolutions), device, is_main, o.tensorboard)
    stop = runs.stop_on_sigterm()                  # a threading.Event, set by SIGTERM
    if is_main:
        print(runs.start_text(st.model, o, first, len(sizes), run_dir, d.cond_kind, device, world, precision))
    bar = tqdm(total=stage_ends[-1], initial=step, disable=not is_main, dynamic_ncols=True)

    # -- the loop over stages, and in each the loop over steps --
    steps_run = 0
    try:
        for stage in range(first, len(sizes)):
            while step < stage_ends[stage] and not stop.is_set():
                optimizer_step(st, d, o, step, world, device, autocast, log)
                step, steps_run = step + 1, steps_run + 1
                bar.update(1)
                if step % o.log_every == 0 or step == stage_ends[stage]:
                    bar.set_postfix_str(runs.loss_text(log.row(step, st, o)))
                side_work(run_dir, st, step, stage_ends, sizes, o, grid, evaluate, log, autocast, bar, device)
                if steps_run == o.stop_after and step < stage_ends[-1]:
                    stop.set()
                if runs.checkpoint_due(step, stage_ends[stage], stage_ends[-1], o.ckpt_every, stop.is_set()):
                    save_checkpoint(run_dir, st, step, o, meta, log, world)
            if step == stage_ends[stage] and stage < len(sizes) - 1:   # grow (section 3.3); a resume starts here
                st = start_stage(o, stage + 1, cfg_full, dcfg, st.batches.state(), rank, world, device, precision, st)
                log.new_stage(st.model, stage + 2, bar)
                save_checkpoint(run_dir, st, step, o, meta, log, world)
            if stop.is_set():
                break
    except KeyboardInterrupt:                      # Ctrl-C: saved, like a stop
        save_checkpoint(run_dir, st, step, o, meta, log, world)
    except FloatingPointError:
        runs.diverged(run_dir, step, is_main)      # says so, and exits with 1: the last good checkpoint stays
    finally:
        bar.close()
    runs.finish(run_dir, sizes, d.cond_kind, step, stage_ends[-1], is_main)
    return run_dir


if __name__ == "__main__":
    main()
