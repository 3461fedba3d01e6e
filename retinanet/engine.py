"""Training: the learning-rate schedule, distributed setup, and one readable training loop.

One process (CPU or one GPU):
    retinanet train config.yaml --output runs/exp1
Several GPUs, or several CPU processes (DistributedDataParallel; nccl on GPUs, gloo on CPU):
    torchrun --nproc_per_node 8 -m retinanet train config.yaml --output runs/exp1
Several machines (the output folder on a filesystem that all of them see, for resuming):
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
        -m retinanet train config.yaml --output runs/exp1

The output folder holds config.yaml (the resolved config), metrics.jsonl (one JSON object per
logged iteration and per evaluation), checkpoint_NNNNNNN.pt (the newest `train.keep_checkpoints`),
best.pt (the weights with the best validation AP), final.pt (the weights at the end) and
loss_curve.png. Only the process of rank 0 writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .atomic import atomic_write
from .checkpoint import (checkpoint_name, latest_good_checkpoint, list_checkpoints, load_checkpoint, load_weights,
                         make_checkpoint, prune_checkpoints, rng_state, save_atomic, set_rng_state)
from .config import Config, as_current, config_to_dict, save_config
from .ema import ModelEMA
from .modeling import build_model
from .optimize import fold_frozen_bn_for_training, to_channels_last

RUN_FILES = ("config.yaml", "metrics.jsonl")  # a folder holding these (or checkpoints) holds a run


class NonFiniteLossError(RuntimeError):
    """A loss was NaN or infinite: training stopped before the optimizer step."""


# ----------------------------------------------------------------------------------------------
# learning rate


def get_lr(step: int, *, lr: float, warmup_iters: int, warmup_factor: float, steps: list, gamma: float) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Step decay: lr * gamma ** (number of `steps` <= step) (sec. 4.1: 0.01, divided by 10 at 60k and
    80k of 90k iterations). Linear warmup (Detectron): during the first `warmup_iters` steps the
    decayed rate is scaled by a factor that rises linearly from `warmup_factor` at step 0 to 1.
    """
    rate = lr * gamma ** sum(step >= s for s in steps)
    if step < warmup_iters:
        alpha = step / warmup_iters
        rate *= warmup_factor * (1 - alpha) + alpha
    return rate


def resolve_lr(cfg: Config) -> float:
    """train.lr if set, else the linear scaling rule: base_lr * batch / 16 (Goyal et al., "Accurate,
    Large Minibatch SGD", 2017), with batch = data.batch_size, the images of one optimizer step."""
    if cfg.train.lr is not None:
        return cfg.train.lr
    return cfg.train.base_lr * cfg.data.batch_size / 16


# ----------------------------------------------------------------------------------------------
# processes and devices


@dataclass
class DistEnv:
    """Where this process runs: its rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this module started the process group (and ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for (--device, train.device), but no CUDA GPU is available (use cpu)")
    return device


def setup_distributed(device: str) -> DistEnv:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT), one GPU per process (cuda:LOCAL_RANK) with nccl, or CPU processes with gloo.
    Without WORLD_SIZE > 1 this is a single process on `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world_size == 1:
        return DistEnv(rank=0, world_size=1, local_rank=0, device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_group=owns)


def distributed_model(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """`model` wrapped in DistributedDataParallel. A model some of whose parameters get no gradient in a step says
    so (`find_unused_parameters = True`: SharpMask, whose two training stages each leave a part unused); DDP
    then looks for them in every step, which it otherwise need not."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=getattr(model, "find_unused_parameters", False))


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# pieces of the loop


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (sec. 4.1), or AdamW, over the trainable parameters.

    With train.decay_norm_bias false, normalization weights and all biases get no weight decay
    (a second parameter group), as many modern recipes do; the paper decays everything.
    """
    t = cfg.train
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if (not t.decay_norm_bias and (is_norm or name == "bias")) else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=resolve_lr(cfg), momentum=t.momentum)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=resolve_lr(cfg))
    raise ValueError(f"train.optimizer must be sgd or adamw, got '{t.optimizer}'")


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA GPU (its gradient scaler is GPU-only); use bf16 on CPU")
        return torch.float16
    raise ValueError(f"train.amp must be none, bf16 or fp16, got '{amp}'")


def check_output_dir(output: Path, resuming: bool) -> None:
    """Refuse a folder that holds anything but this run: never overwrite a user's files or another run.

    Resuming, the folder must hold a run (or be empty/new, which starts one); otherwise it must be
    empty or new.
    """
    if not output.exists():
        above = next(a for a in output.absolute().parents if a.exists())  # made when the run starts
        if not above.is_dir():
            raise ValueError(f"--output {output}: {above} is a file, not a folder")
        return
    if not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder")
    entries = [p.name for p in output.iterdir()]
    if not entries:
        return
    holds_run = any(name in entries for name in RUN_FILES) or list_checkpoints(str(output))
    if not resuming:
        what = "a training run" if holds_run else f"other files ({', '.join(sorted(entries)[:5])})"
        raise ValueError(f"--output {output} already holds {what}; pass --resume auto to continue the run there, "
                         f"or choose a new folder")
    if not holds_run:
        raise ValueError(f"--output {output} holds files that are not a training run "
                         f"({', '.join(sorted(entries)[:5])}); choose a new folder")


@contextmanager
def deterministic_algorithms():
    """Deterministic algorithms (train.deterministic) inside the block: `torch.use_deterministic_algorithms`,
    no cuDNN benchmarking, and the cuBLAS workspace that deterministic CUDA matmuls need. These are
    process-wide, so the caller's settings are restored on leaving (a test or a notebook that trains
    once keeps its own)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        enabled, warn_only, benchmark, workspace = saved
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _config_differences(old: dict, new: dict, prefix: str = "") -> list:
    """['train.iterations: 1000 -> 2000', ...] for the leaves that differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _gather_rng(env: DistEnv) -> list:
    """Every process's RNG state, on every process (a collective under DDP)."""
    state = rng_state()
    if not env.distributed:
        return [state]
    states = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def _format_losses(losses: dict, sep: str = ", ") -> str:
    """{"cls": 1.2, "box": nan} -> 'cls=1.2, box=nan' (tensors or floats)."""
    return sep.join(f"{name}={float(value.detach()) if torch.is_tensor(value) else value:.4g}"
                    for name, value in losses.items())


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metrics logged after `iteration` (by a run that crashed after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line)["iteration"] <= iteration]
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


def evaluate_model(model: nn.Module, dataset, env: DistEnv, batch_size: int = 8) -> Optional[dict]:
    """COCO bbox metrics (retinanet.evaluate.evaluate_coco) of `model` on a validation CocoDataset.

    Each process runs float32 inference on its shard of the images; rank 0 gathers the detections
    and scores them against the dataset's JSON, restricted to the dataset's images (those left out
    as unreadable are not scored). A model that predicts masks is also scored on them
    (segm_AP, ...); class-agnostic segment proposals (model.arch deepmask, sharpmask, fpn_masks) are
    scored by proposal recall instead: segment AR@10/100/1000, ARs/m/l, AUC, and box_AR... for boxes.
    The images travel to the device as decoded uint8 (pinned, without waiting, on a GPU: a quarter of
    float32's bytes); the model's preprocess converts, normalizes and resizes them there.
    Returns the metrics on rank 0, None elsewhere, with `ms_per_image`: rank 0's time in the model's
    forward pass (pre-processing, uint8 conversion included, to detections; not image loading or the
    copy to the device) per image, batches of `batch_size`.
    The random number generators are left as evaluation found them (torch, CUDA, NumPy, Python): the data
    loader draws its base seed from torch's, and a Faster R-CNN samples its training anchors and RoIs from
    it, so otherwise train.eval_every would change the weights a run trains.
    """
    state = rng_state()
    try:
        return _evaluate_model(model, dataset, env, batch_size)
    finally:
        set_rng_state(state)


@torch.no_grad()
def _evaluate_model(model: nn.Module, dataset, env: DistEnv, batch_size: int) -> Optional[dict]:
    from .data.loader import build_test_loader, images_to_device
    from .evaluate import detections_to_coco_results, evaluate_coco, ground_truth_subset

    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    results, seconds, count = [], 0.0, 0
    on_gpu = env.device.type == "cuda"
    for images, targets in build_test_loader(dataset, batch_size=batch_size, rank=env.rank, world_size=env.world_size,
                                             pin_memory=on_gpu, pending_images=True):
        images = images_to_device(images, env.device)  # uint8, converted by the model's preprocess
        _synchronize(env.device)
        start = time.perf_counter()
        detections = model(images)
        _synchronize(env.device)
        seconds, count = seconds + time.perf_counter() - start, count + len(images)
        results += detections_to_coco_results(detections, [t["image_id"] for t in targets],
                                              dataset.label_to_category_id)
    model.train(was_training)
    if env.distributed:
        shards = [None] * env.world_size
        dist.gather_object(results, shards if env.is_main else None, dst=0)
        results = [r for shard in shards for r in shard] if env.is_main else None
    if not env.is_main:
        return None
    # Scored against the images evaluated only: an image the dataset left out (data.skip_unreadable)
    # has no detections, and its objects would count as misses.
    gt = ground_truth_subset(dataset.json_path, dataset.image_ids)
    if getattr(model, "class_agnostic_proposals", False):  # segment proposals: recall, masks and boxes
        from .evaluate import proposal_recall

        metrics = proposal_recall(gt, results, "segm")
        metrics.update({f"box_{k}": v for k, v in proposal_recall(gt, results, "bbox").items()})
    else:
        metrics = evaluate_coco(gt, results)
        if results and "segmentation" in results[0]:  # a mask detector: mask AP too
            metrics.update({f"segm_{k}": v for k, v in evaluate_coco(gt, results, iou_type="segm").items()
                            if not isinstance(v, dict)})
    metrics["ms_per_image"] = 1000.0 * seconds / max(count, 1)
    return metrics


def headline_metrics(metrics: dict) -> tuple:
    """The metric that picks best.pt and the ones printed after an evaluation: AP (detectors) or the
    segment AR@100 (proposal models, which have no AP)."""
    if "AR@100" in metrics and "AP" not in metrics:
        return "AR@100", ("AR@10", "AR@100", "AR@1000")
    return "AP", ("AP", "AP50", "AP75")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plot_loss_curve(metrics_path: Path, out_path: Path) -> None:
    """loss_curve.png: total, classification and box loss by iteration, validation AP on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val" in r and r["val"].get(headline_metrics(r["val"])[0]) is not None]
    parts = [k for k in train[0] if k not in ("iteration", "loss", "lr", "images_per_s", "time_s")] if train else []
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, key in enumerate(["loss"] + parts):
        ax.plot([r["iteration"] for r in train], [r[key] for r in train], ["-", "--", ":", "-."][i % 4],
                label="total loss" if key == "loss" else f"{key} loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if val:
        ax2 = ax.twinx()
        for key, marker in zip(headline_metrics(val[0]["val"])[1][:2], "os"):
            ax2.plot([r["iteration"] for r in val], [r["val"][key] for r in val], marker + "-", color=f"C{3 + len(ax2.lines)}",
                     label=f"val {key}")
        ax2.set_ylabel(f"validation {headline_metrics(val[0]['val'])[0][:2]}")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    with atomic_write(out_path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the training loop


def train(cfg: Config, output_dir: str, *, resume: Optional[str] = None, weights: Optional[str] = None,
          progress: bool = True) -> dict:
    """Train cfg's model (any model.arch) on cfg.data's COCO-format training set; see the module docstring.

    resume: None (a new run: the output folder must be new or empty), "auto" (continue from the
        newest checkpoint in the output folder that loads, falling back to the one before it if the
        newest is broken; start a new run if there is none) or the path of a training checkpoint
        (checkpoint_NNNNNNN.pt; final.pt and best.pt hold weights only and are refused: use `weights`).
    weights: a retinanet checkpoint to start from (fine-tuning); tensors whose shapes differ, such
        as the classifier's when the class count changes, are left at their initialization and
        reported.
    Returns a summary on rank 0: {"iterations", "seconds", "final", "best_ap", "val"}; {} elsewhere.
    Raises NonFiniteLossError, naming the iteration and each loss, on a NaN or infinite loss.
    """
    from tqdm import tqdm

    from .data.loader import batch_to_device, build_train_dataset, build_train_loader, build_val_dataset

    cfg = copy.deepcopy(cfg)
    t = cfg.train
    env = setup_distributed(t.device)
    output = Path(output_dir)
    log = print if env.is_main else (lambda *a, **k: None)
    settings = ExitStack()  # process-wide settings this run changes, restored when it ends
    try:
        check_output_dir(output, resuming=resume is not None)
        _barrier(env)  # every process has checked before rank 0 writes anything
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            settings.enter_context(deterministic_algorithms())
        amp_dtype = autocast_dtype(t.amp, env.device)
        for key in ("iterations", "accumulate", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(t, key) < 1:
                raise ValueError(f"train.{key} must be at least 1, got {getattr(t, key)}")
        if not 0.0 <= t.ema < 1.0:
            raise ValueError(f"train.ema must be in [0, 1) (0 disables it), got {t.ema}")
        accum, world = t.accumulate, env.world_size
        if cfg.data.batch_size % (world * accum):
            raise ValueError(f"data.batch_size {cfg.data.batch_size} must be divisible by {world} process(es) "
                             f"x train.accumulate {accum}")

        # Resume state first: it may say where the data stands.
        ckpt, ckpt_path = None, None
        if resume == "auto":
            ckpt_path, ckpt = latest_good_checkpoint(str(output))
        elif resume is not None:
            ckpt_path, ckpt = Path(resume), load_checkpoint(resume)
            if "optimizer" not in ckpt:  # final.pt, best.pt, a converted or exported model's weights
                raise ValueError(f"{ckpt_path}: weights only (no optimizer state, data position or RNG state, as "
                                 f"final.pt and best.pt), so training cannot resume from it; --weights {ckpt_path} "
                                 f"fine-tunes from its weights (a new schedule, in a new folder), --resume auto "
                                 f"continues the run from its newest checkpoint_*.pt")

        # Data: validated before the first step (errors list every problem, with file and ids; an
        # unreadable image stops here, or is left out with data.skip_unreadable). Rank 0 decodes the
        # images first and caches the results; the other processes then find them in the cache.
        if not env.is_main:
            _barrier(env)
        try:
            dataset = build_train_dataset(cfg, progress=progress and env.is_main)
            val_dataset = build_val_dataset(cfg, progress=progress and env.is_main)
        finally:
            if env.is_main:
                _barrier(env)
        categories = dataset.categories
        if cfg.model.arch in Config.PROPOSAL_ARCHS:  # class-agnostic: one class, whatever the dataset's
            categories = [{"id": 1, "name": "object"}]
            cfg.model.num_classes = 1
        elif cfg.model.num_classes != dataset.num_classes:
            log(f"model.num_classes: {cfg.model.num_classes} -> {dataset.num_classes} (the training set's categories)")
            cfg.model.num_classes = dataset.num_classes
        if ckpt is not None:
            stored = as_current(ckpt["config"])  # keys added since: what the run meant
            mismatch = _config_differences(stored["model"], config_to_dict(cfg)["model"])
            if mismatch:
                raise ValueError(f"{ckpt_path}: its model config differs from this one: {'; '.join(mismatch)}")
            changed = _config_differences(stored, config_to_dict(cfg))
            if changed:
                log(f"resuming with changed settings: {'; '.join(changed)}")

        # Model: the same initialization on every process (DDP also broadcasts rank 0's weights).
        torch.manual_seed(t.seed)
        model = build_model(cfg)
        if weights:
            report = load_weights(model, weights)
            if not report["loaded"]:  # training would silently start from scratch
                raise ValueError(f"{weights}: none of its {len(report['skipped']) + len(report['unexpected'])} tensors "
                                 f"fit this model (model.arch {cfg.model.arch}): a checkpoint of another kind of model?")
            log(f"weights from {weights}: {len(report['loaded'])} tensors loaded")
            for what, meaning in (("skipped", "shape differs, re-initialized"), ("missing", "not in the file, "
                                  "initialized"), ("unexpected", "in the file, not in this model")):
                if report[what]:
                    log(f"  {len(report[what])} {what} ({meaning}): {', '.join(report[what])}")
        if ckpt is not None:  # with train.ema, "model" holds the average and "raw_model" the trained weights
            model.load_state_dict(ckpt.get("raw_model", ckpt["model"]))
        model.to(env.device)
        if t.channels_last:
            to_channels_last(model, log=log)
        if t.fold_frozen_bn:
            fold_frozen_bn_for_training(model)
        if t.sync_bn and env.distributed:
            if env.device.type != "cuda":
                raise ValueError("train.sync_bn needs GPUs (nccl); use model.backbone_norm gn or frozen_bn on CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw_model = model
        ema = ModelEMA(raw_model, t.ema, t.ema_ramp) if t.ema > 0 else None  # evaluated and saved instead of raw_model
        if ema is not None and ckpt is not None and "raw_model" in ckpt:
            ema.load_state_dict(ckpt["model"], updates=int(ckpt["ema_updates"]))
        if env.distributed:
            model = distributed_model(model, env.device)
        optimizer = build_optimizer(raw_model, cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        start, best_ap = 0, None
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start, best_ap = int(ckpt["iteration"]), ckpt.get("best_ap")
            log(f"resuming from {ckpt_path} at iteration {start}")

        # The data order is a pure function of (seed, micro-batch index): start where the run stopped.
        micro_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // accum))
        on_gpu = env.device.type == "cuda"  # uint8 images in pinned memory, converted and resized on the GPU
        loader = build_train_loader(micro_cfg, dataset, seed=t.seed, rank=env.rank, world_size=world,
                                    start_iteration=start * accum, pin_memory=on_gpu, pending_images=on_gpu)
        batches = iter(loader)
        if ckpt is not None and len(ckpt.get("rng", [])) == world:
            set_rng_state(ckpt["rng"][env.rank])
        else:
            torch.manual_seed(t.seed + env.rank + start)

        metrics_path = output / "metrics.jsonl"
        if env.is_main:
            output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, str(output / "config.yaml"))
            _truncate_metrics(metrics_path, start)

        def weights_checkpoint(**extra) -> dict:
            """A checkpoint of the weights to use (the EMA's when on, with the trained ones beside them)."""
            if ema is None:
                return make_checkpoint(raw_model, cfg, categories, **extra)
            return make_checkpoint(ema.model, cfg, categories, raw_model=raw_model.state_dict(),
                                   ema_updates=ema.updates, **extra)

        def save(iteration: int) -> None:  # a collective under DDP (RNG states); rank 0 writes
            rng = _gather_rng(env)
            if env.is_main:
                state = weights_checkpoint(iteration=iteration, optimizer=optimizer.state_dict(),
                                           scaler=scaler.state_dict() if scaler.is_enabled() else None,
                                           data_position={"micro_batches": iteration * accum, "seed": t.seed,
                                                          "world_size": world, "batch_size": cfg.data.batch_size},
                                           rng=rng, best_ap=best_ap)
                save_atomic(state, str(output / checkpoint_name(iteration)))
                prune_checkpoints(str(output), t.keep_checkpoints)

        lr_at = partial(get_lr, lr=resolve_lr(cfg), warmup_iters=t.warmup_iters, warmup_factor=t.warmup_factor,
                        steps=t.lr_steps, gamma=t.lr_gamma)
        log(f"training {t.iterations - start} iterations on {world} process(es) ({env.device}), "
            f"{cfg.data.batch_size} images per iteration, lr {resolve_lr(cfg):g}, amp {t.amp}")
        model.train()
        bar = tqdm(total=t.iterations, initial=start, disable=not (progress and env.is_main), dynamic_ncols=True,
                   desc="train", unit="it")
        window, window_start, window_iters = {}, time.perf_counter(), 0  # loss name -> sum over the window
        run_start, eval_seconds, val_metrics, speed = time.perf_counter(), 0.0, None, None
        for it in range(start, t.iterations):
            lr = lr_at(it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_values = []  # per micro-batch: its losses, (number of losses,) on the device
            for micro in range(accum):
                images, targets = next(batches)
                if env.device.type != "cpu":  # checked on the CPU: the step on the device never waits to read them
                    raw_model.check_targets(targets)
                images, targets = batch_to_device(images, targets, env.device)  # uint8 images realized there
                # Gradients are all-reduced on the last micro-batch only.
                sync = nullcontext() if (micro == accum - 1 or not env.distributed) else model.no_sync()
                with sync:
                    with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        losses = model(images, targets)
                    # Each micro-batch's loss is normalized by its own foreground count, then averaged.
                    scaler.scale(sum(losses.values()) / accum).backward()
                step_values.append(torch.stack([v.detach().float() for v in losses.values()]))
            # The step's one host synchronization: its losses are read to be checked (the optimizer step
            # is taken only if they are finite) and logged, after every backward has been queued.
            local = values = torch.stack(step_values)  # (accum, number of losses)
            if env.distributed:
                values = local.clone()
                dist.all_reduce(values)  # a NaN anywhere stops every process at this same step
                values /= world
            step_losses = {}  # loss name -> this step's value (mean over micro-batches and processes)
            for micro, row in enumerate(values.tolist()):
                reduced = dict(zip(losses, row))
                if not all(math.isfinite(v) for v in reduced.values()):
                    mine = dict(zip(losses, local[micro]))
                    where = f"; this process: {_format_losses(mine)}" if env.distributed else ""
                    raise NonFiniteLossError(
                        f"iteration {it}: non-finite loss ({_format_losses(reduced)}{where}); stopped before "
                        f"the optimizer step, the checkpoints in {output} are unchanged")
                for name, value in reduced.items():
                    step_losses[name] = step_losses.get(name, 0.0) + value / accum
            if t.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(raw_model.parameters(), t.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(raw_model, "on_optimizer_step"):  # a model that counts steps (SharpMask's stages)
                raw_model.on_optimizer_step()
            if ema is not None:
                ema.update(raw_model)

            done = it + 1
            for name, value in step_losses.items():
                window[name] = window.get(name, 0.0) + value
            window_iters += 1
            if done % t.log_every == 0 or done == t.iterations:
                mean = {name: total / window_iters for name, total in window.items()}
                speed = window_iters * cfg.data.batch_size / (time.perf_counter() - window_start)  # images/s
                if env.is_main:
                    _append_jsonl(metrics_path, {"iteration": done, "loss": sum(mean.values()), **mean, "lr": lr,
                                                 "images_per_s": speed, "time_s": time.perf_counter() - run_start})
                window, window_iters, window_start = {}, 0, time.perf_counter()
            bar.set_postfix_str(f"loss {sum(step_losses.values()):.3f} ({_format_losses(step_losses, ' ')}) "
                                f"lr {lr:.2g}" + (f" {speed:.1f} img/s" if speed else ""), refresh=False)
            bar.update(1)
            if val_dataset is not None and ((t.eval_every > 0 and done % t.eval_every == 0) or done == t.iterations):
                eval_start = time.perf_counter()
                val_metrics = evaluate_model(model if ema is None else ema.model, val_dataset, env)
                if env.is_main:
                    _append_jsonl(metrics_path, {"iteration": done, "val": val_metrics,
                                                 "time_s": time.perf_counter() - run_start,
                                                 "train_s": eval_start - run_start - eval_seconds})
                    primary, shown = headline_metrics(val_metrics)
                    ap = val_metrics[primary]
                    bar.write(f"iteration {done}: validation " + "  ".join(
                        f"{k} {val_metrics[k]:.3f}" for k in shown if val_metrics[k] is not None))
                    if ap is not None and (best_ap is None or ap > best_ap):
                        best_ap = ap
                        save_atomic(weights_checkpoint(iteration=done, val=val_metrics), str(output / "best.pt"))
                if env.distributed:
                    shared = [best_ap]
                    dist.broadcast_object_list(shared, src=0)
                    best_ap = shared[0]
                window_start += time.perf_counter() - eval_start  # images/s counts training time only
                eval_seconds += time.perf_counter() - eval_start
            if done % t.checkpoint_every == 0 or done == t.iterations:
                save(done)
        bar.close()

        summary = {}
        if env.is_main:
            final = output / "final.pt"
            save_atomic(weights_checkpoint(iteration=t.iterations, val=val_metrics), str(final))
            if metrics_path.exists() and metrics_path.stat().st_size:
                plot_loss_curve(metrics_path, output / "loss_curve.png")
            summary = {"iterations": t.iterations, "seconds": time.perf_counter() - run_start, "final": str(final),
                       "best_ap": best_ap, "val": val_metrics}
        _barrier(env)
        return summary
    finally:
        settings.close()
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()
