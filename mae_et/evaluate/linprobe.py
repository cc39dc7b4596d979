"""Linear probing of a frozen pretrained encoder (the MAE protocol), online or on cached features.

A `ProbeHead` (BatchNorm without affine + Linear) trained with LARS, warmup + cosine per step, the global batch
clamped to the training-set size; its batches come from a `ProbeData`: `OnlineImages` (the reference: augmented
images encoded at every step) or `CachedFeatures` (centre-crop features extracted once, kept in RUN/features/).
`ProbeMethod` is the probe for the evaluation engine. The two modes and DDP: docs/design.md, "The linear probe".
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from mae_et.data.folder import epoch_permutation_seed
from mae_et.data.labelled import (
    SeededClassificationDataset,
    build_eval_loader,
    build_train_loader,
    linprobe_train_transform,
    scan_train_split,
    shard_loader,
    shard_range,
    split_dir,
)
from mae_et.evaluate.config import ClassificationDataConfig, LinprobeConfig, LinprobeTrainConfig
from mae_et.evaluate.engine import (
    EvalResult,
    Recorder,
    evaluate_classifier,
    run_engine,
    train_epochs,
)
from mae_et.evaluate.lars import LARS
from mae_et.files import save_safetensors, write_atomic
from mae_et.models.features import extract_features
from mae_et.models.vit import encoder_features, load_pretrained_vit
from mae_et.recipes import ConfigError
from mae_et.run.config import CheckpointConfig, PlanSpec
from mae_et.run.plan import RunPlan, one_stage, plan_run
from mae_et.run.run import Run

HEAD_INIT_STD = 0.01  # MAE linear probe
FEATURES_DIR = "features"
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ProbeHead(nn.Module):
    """BatchNorm without affine (a per-feature whitening the probe cannot abuse) + a linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.bn(features))  # (N, D) -> (N, C)


# ----------------------------------------------------------------------------- batch sources


class ProbeData(Protocol):
    def start(self, step: int, end_step: int) -> None:
        """Prepare to serve optimizer steps [step, end_step)."""

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """This process's (features (n, D) float32, labels (n,)) of optimizer step `step`, on the device."""

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's disjoint shard of the validation set as (features, labels) batches."""


class CachedFeatures:
    """Features held on the device; step s of epoch e takes slice s of a (seed, e) permutation."""

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        val_x: Tensor,
        val_y: Tensor,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        eval_chunk: int = 4096,
    ) -> None:
        """`global_batch`: a `clamp_global_batch` (a multiple of the process count, within the features)."""
        self.train_x, self.train_y, self.val_x, self.val_y = train_x, train_y, val_x, val_y
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.rank, self.world_size, self.seed, self.eval_chunk = rank, world_size, seed, eval_chunk
        self.steps_per_epoch = train_x.shape[0] // global_batch  # the tail of each permutation is dropped
        self._perm: tuple[int, Tensor] | None = None

    def start(self, step: int, end_step: int) -> None:
        pass

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(epoch_permutation_seed(self.seed, epoch))  # same on every process
            self._perm = (epoch, torch.randperm(self.train_x.shape[0], generator=g).to(self.train_x.device))
        return self._perm[1]

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, j = divmod(step, self.steps_per_epoch)
        start = j * self.global_batch + self.rank * self.local_batch
        idx = self._permutation(epoch)[start : start + self.local_batch]  # (n,)
        return self.train_x[idx].float(), self.train_y[idx]

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        shard = shard_range(self.val_x.shape[0], self.rank, self.world_size)
        for s in range(shard.start, shard.stop, self.eval_chunk):
            e = min(s + self.eval_chunk, shard.stop)
            yield self.val_x[s:e].float(), self.val_y[s:e]


class OnlineImages:
    """Augmented images encoded by the frozen encoder at every step (the reference protocol)."""

    def __init__(
        self,
        encode: Callable[[Tensor], Tensor],
        dataset: SeededClassificationDataset,
        val_loader,
        local_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        pin_memory: bool,
        device,
    ) -> None:
        self.encode, self.dataset, self.val_loader = encode, dataset, val_loader
        self.local_batch, self.rank, self.world_size, self.seed = local_batch, rank, world_size, seed
        self.num_workers, self.pin_memory, self.device = num_workers, pin_memory, device
        self.steps_per_epoch = len(dataset) // (local_batch * world_size)
        self._batches: Iterator | None = None

    def start(self, step: int, end_step: int) -> None:
        loader = build_train_loader(
            self.dataset,
            self.local_batch,
            self.rank,
            self.world_size,
            self.seed,
            start_micro_step=step,
            num_micro_steps=end_step - step,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        self._batches = iter(loader)

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        images, labels = next(self._batches)
        images = images.to(self.device, non_blocking=True)  # (n, 3, S, S)
        return self.encode(images), labels.to(self.device, non_blocking=True)

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.val_loader:
            if labels.numel() == 0:
                continue
            yield self.encode(images.to(self.device, non_blocking=True)), labels.to(self.device)


def make_encode(
    encoder: nn.Module, pool: str, chunk: int, precision: str, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """images (n, 3, S, S) -> features (n, D) float32 of the frozen encoder, `chunk` images per forward."""
    dtype = _AUTOCAST.get(precision)

    @torch.no_grad()
    def encode(images: Tensor) -> Tensor:
        outs = []
        for part in images.split(chunk):
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
                outs.append(encoder_features(encoder, part, pool).float())  # (c, D)
        return torch.cat(outs)  # (n, D)

    return encode


# ----------------------------------------------------------------------------- the method


class ProbeMethod:
    """The probe for the evaluation engine (`mae_et.evaluate.engine.EvalMethod`): a `ProbeHead` trained by LARS on
    batches of a `ProbeData`, one optimizer step per global batch (no accumulation)."""

    task = "linprobe"
    keeps_best_weights = False

    def __init__(
        self,
        data: ProbeData,
        dim: int,
        num_classes: int,
        plan: RunPlan,
        accelerator: Accelerator,
        weight_decay: float,
        momentum: float,
        lines: list[str] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.data, self.plan, self.accelerator = data, plan, accelerator
        head = ProbeHead(dim, num_classes)
        optimizer = LARS(head.parameters(), lr=plan.base_lr, weight_decay=weight_decay, momentum=momentum)
        self.model, self.optimizer = accelerator.prepare(head, optimizer)
        self.raw_model: ProbeHead = accelerator.unwrap_model(self.model)
        self.lines, self.fields = lines or [], fields or {}

    def describe(self) -> list[str]:
        return self.lines

    def start_epoch(self, epoch: int, step: int, stop: int) -> None:
        self.data.start(step, stop)

    def train_step(self, step: int) -> Tensor:
        features, labels = self.data.train_batch(step)  # (n, D), (n,)
        loss = F.cross_entropy(self.model(features), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        return loss.detach()

    def step_metrics(self, step: int) -> dict[str, Any]:
        return {}

    def evaluate(self) -> dict[str, float]:
        if self.accelerator.num_processes > 1:
            # DDP gives every process rank 0's BatchNorm statistics before each forward, and each then updates its
            # own copy: share rank 0's again so every shard is evaluated with one head
            for buffer in self.raw_model.buffers():
                broadcast(buffer, from_process=0)
        # the unwrapped head: DDP's forward must run the same number of times on each process
        return evaluate_classifier(self.raw_model, self.data.val_batches(), self.accelerator)

    def result_fields(self) -> dict[str, Any]:
        return self.fields


def fit_probe_on_features(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    *,
    epochs: int = 90,
    global_batch: int = 16384,
    blr: float = 0.1,
    warmup_epochs: float = 10.0,
    min_lr: float = 0.0,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
    accelerator: Accelerator | None = None,
) -> list[dict]:
    """The cached probe on given features (no images, no run folder): per-epoch top-1/top-5 history, for the study
    and tests; `linprobe()` runs the same loop with tracking and checkpoints."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    global_batch = clamp_global_batch(global_batch, train_x.shape[0], accelerator.num_processes)
    set_seed(seed)
    world = accelerator.num_processes
    tensors = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    data = CachedFeatures(*tensors, global_batch, accelerator.process_index, world, seed)
    spec = PlanSpec(
        epochs=epochs,
        micro_batch=global_batch // world,
        accum_steps=1,
        max_steps=None,
        blr=blr,
        lr=None,
        min_lr=min_lr,
        warmup_epochs=warmup_epochs,
        log_every=LinprobeTrainConfig.log_every,  # the loop has no log here: only its cadence
        checkpoint=CheckpointConfig(every_epochs=0.0),  # no run folder: no checkpoints
    )
    full_size = ClassificationDataConfig.img_size  # features have no input size: one stage, at any size
    plan = plan_run(spec, train_x.shape[0], world, *one_stage(full_size), full_size)
    method = ProbeMethod(data, train_x.shape[1], num_classes, plan, accelerator, weight_decay, momentum)
    recorder = Recorder(method)
    method.model.train()
    train_epochs(method, 0, recorder)
    return recorder.history


def clamp_global_batch(requested: int, num_train: int, world_size: int) -> int:
    """min(requested, training-set size), rounded down to a multiple of the process count."""
    batch = min(requested, num_train) // world_size * world_size
    if batch // world_size < 2:
        raise ConfigError(
            f"{num_train} training images give {batch // world_size} per process per step; BatchNorm needs >= 2: "
            "use fewer processes or more data"
        )
    return batch


# ----------------------------------------------------------------------------- feature cache


def gather_in_order(x: Tensor, accelerator: Accelerator) -> Tensor:
    """All processes' contiguous shards (rank order) -> the whole tensor on every process, no padding left."""
    if accelerator.num_processes == 1:
        return x
    device = accelerator.device
    x = x.to(device)
    counts = accelerator.gather(torch.tensor([x.shape[0]], device=device)).tolist()
    padded = accelerator.pad_across_processes(x, dim=0)  # (max, ...)
    allx = accelerator.gather(padded)  # (world * max, ...)
    width = padded.shape[0]
    return torch.cat([allx[r * width : r * width + n] for r, n in enumerate(counts)])


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of the encoder weights: a cache made with other weights is never reused."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_split_features(
    name: str,
    loader,
    encoder: nn.Module,
    cfg: LinprobeConfig,
    fingerprint: str,
    run_dir: Path,
    accelerator: Accelerator,
) -> tuple[Tensor, Tensor]:
    """Features + labels of a whole split on every process: from RUN/features/<name>.safetensors when
    it matches, else extracted (sharded over processes) and saved atomically by the main process."""
    files = loader.dataset.index.samples
    key = {
        "weights": fingerprint,
        "img_size": str(cfg.data.img_size),
        "pool": cfg.linprobe.pool,
        "precision": cfg.train.precision,
        "num_images": str(len(files)),
        "files": hashlib.sha256("\n".join(p for p, _ in files).encode()).hexdigest()[:16],
    }
    path = run_dir / FEATURES_DIR / f"{name}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in key.items()):
                saved = load_file(str(path), device=str(accelerator.device))
                return saved["features"], saved["labels"]
        except Exception:  # noqa: BLE001 - an unreadable cache is only a cache: extract again
            pass
    dtype = _AUTOCAST.get(cfg.train.precision)
    shard = shard_loader(loader, accelerator.process_index, accelerator.num_processes)
    with torch.autocast(accelerator.device.type, dtype=dtype) if dtype is not None else nullcontext():
        feats, labels = extract_features(
            encoder,
            shard,
            accelerator.device,
            pool=cfg.linprobe.pool,
            desc=f"probe features: {name}" if accelerator.is_main_process else None,
        )  # (n, D), (n,) CPU
    feats, labels = (gather_in_order(t.to(accelerator.device), accelerator) for t in (feats, labels))
    if accelerator.is_main_process:
        path.parent.mkdir(exist_ok=True)
        tensors = {"features": feats.contiguous().cpu(), "labels": labels.contiguous().cpu()}
        write_atomic(path, lambda tmp: save_safetensors(tensors, tmp, metadata=key))
    return feats, labels


# ----------------------------------------------------------------------------- the run


def linprobe(cfg: LinprobeConfig) -> EvalResult:
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")  # the encoder's autocast
    with Run(cfg.run_spec()) as run:  # accelerator, the run folder (locked), resume, tracking, checkpoints
        return run_engine(run, build_probe(cfg, run))


def build_probe(cfg: LinprobeConfig, run: Run) -> ProbeMethod:
    """The probe of a run: data checked, the frozen encoder loaded, features cached (or an online encoder), the plan."""
    accelerator, device, world, rank = run.accelerator, run.device, run.world, run.rank
    set_seed(cfg.train.seed)

    # --- data checks before any model is built
    index = scan_train_split(cfg.data.root, cfg.data.train_split)
    num_classes = len(index.classes)
    global_batch = clamp_global_batch(cfg.train.batch_size, len(index.samples), world)
    if global_batch < cfg.train.batch_size:
        run.say(
            f"global batch {cfg.train.batch_size} clamped to {global_batch} ({len(index.samples)} training images, "
            f"{world} process(es)); the lr follows: blr x {global_batch}/256"
        )
    eval_bs = cfg.linprobe.encoder_batch
    # checks that the val split has exactly the training classes, before the encoder is loaded
    val_full = build_eval_loader(
        split_dir(cfg.data.root, cfg.data.val_split, "data.val_split"),
        cfg.data.img_size,
        eval_bs,
        cfg.data.num_workers,
        classes=index.classes,
    )

    # --- frozen encoder
    encoder, spec = load_pretrained_vit(cfg.model.checkpoint, img_size=cfg.data.img_size)  # no head, token pool
    encoder.requires_grad_(False).eval().to(device)
    dim = encoder.embed_dim

    if cfg.linprobe.mode == "cached":
        fingerprint = weights_fingerprint(encoder)
        train_root = split_dir(cfg.data.root, cfg.data.train_split, "data.train_split")
        train_eval = build_eval_loader(
            train_root, cfg.data.img_size, eval_bs, cfg.data.num_workers, classes=index.classes
        )
        t0 = time.perf_counter()
        train_x, train_y = cached_split_features(
            "train", train_eval, encoder, cfg, fingerprint, run.run_dir, accelerator
        )
        val_x, val_y = cached_split_features("val", val_full, encoder, cfg, fingerprint, run.run_dir, accelerator)
        run.say(f"features: train {tuple(train_x.shape)}, val {tuple(val_x.shape)} in {time.perf_counter() - t0:.1f}s")
        # an unreadable training image is dropped at extraction: the clamp follows the features
        global_batch = clamp_global_batch(global_batch, train_x.shape[0], world)
        data: ProbeData = CachedFeatures(train_x, train_y, val_x, val_y, global_batch, rank, world, cfg.train.seed)
        num_train = train_x.shape[0]
        del encoder  # not needed any more: free its memory for the features
    else:
        encode = make_encode(encoder, cfg.linprobe.pool, cfg.linprobe.encoder_batch, cfg.train.precision, device)
        dataset = SeededClassificationDataset(
            index, linprobe_train_transform(cfg.data.img_size, cfg.augment.scale, cfg.augment.hflip)
        )
        val_loader = shard_loader(val_full, rank, world)
        data = OnlineImages(
            encode,
            dataset,
            val_loader,
            global_batch // world,
            rank,
            world,
            cfg.train.seed,
            cfg.data.num_workers,
            cfg.data.pin_memory and device.type == "cuda",
            device,
        )
        num_train = len(dataset)
    stages, budget = one_stage(cfg.data.img_size)
    plan = plan_run(cfg.plan_spec(global_batch // world), num_train, world, stages, budget, cfg.data.img_size)
    lines = [
        f"linear probe {cfg.name} ({cfg.linprobe.mode}): {cfg.model.checkpoint} ({spec.size}/{spec.patch_size}) at "
        f"{cfg.data.img_size} px, {cfg.linprobe.pool} features (D={dim}), {num_classes} classes, {len(index.samples)} "
        f"training images, global batch {global_batch}, lr {plan.base_lr:.3g}, {plan.total_steps} steps in "
        f"{cfg.train.epochs} epochs"
    ]
    fields = {
        "mode": cfg.linprobe.mode,
        "checkpoint": str(cfg.model.checkpoint),
        "encoder": spec.__dict__,
        "img_size": cfg.data.img_size,
        "pool": cfg.linprobe.pool,
        "num_classes": num_classes,
        "global_batch_requested": cfg.train.batch_size,
    }
    return ProbeMethod(
        data, dim, num_classes, plan, accelerator, cfg.optim.weight_decay, cfg.optim.momentum, lines, fields
    )
