"""One MAE training micro-step under Accelerate, shared by the training loop, the study and the benchmarks: uint8
crops -> normalise -> low-frequency crop to B -> MAE -> backward -> (on an optimizer step) grad norm, a device-side
non-finite skip, fused AdamW. Nothing here waits on the host (docs/design.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from mae_et.curriculum.frequency import low_frequency_crop
from mae_et.data.folder import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device
from mae_et.models.mae import build_mae
from mae_et.train.config import PretrainConfig, mae_spec
from mae_et.train.optim import build_adamw


@dataclass
class MicroStepResult:
    loss: torch.Tensor  # () detached, may be non-finite
    nonfinite: torch.Tensor | None  # () bool, on optimizer-step boundaries only
    grad_norm: torch.Tensor | None  # () global grad norm before clipping, same boundaries


class TrainStep:
    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer,
        mask_ratio: float,
        frequency_mode: str,
        clip_grad: float | None,
        compile_mode: str = "none",
        sizes: tuple[int, ...] = (),
        compile_backend: str = "inductor",
        decode_fraction: float = 1.0,
        decode_of_patches: int | None = None,
    ):
        self.accelerator = accelerator
        self.model = model  # as prepared by Accelerate (DDP-wrapped when distributed)
        self.optimizer = optimizer
        self.raw_optimizer = optimizer.optimizer
        self.mask_ratio = mask_ratio
        self.decode_fraction = decode_fraction  # share of all patches the decoder reconstructs (model.decode_fraction)
        self.decode_of_patches = decode_of_patches  # the patch count it is a share of (None: each B's own)
        self.frequency_mode = frequency_mode
        self.max_norm = clip_grad or math.inf
        self.compile_mode = compile_mode
        if compile_mode == "none":
            self.forward = model
        else:
            accelerator.unwrap_model(model).cache_pos_embed(sizes)  # every curriculum size: one graph each
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            kwargs = {} if compile_mode == "default" else {"mode": compile_mode}
            self.forward = torch.compile(model, dynamic=False, backend=compile_backend, **kwargs)
        # fused AdamW skips on the device; fp16's GradScaler handles its own skipping
        self.skip_on_device = accelerator.scaler is None and self.raw_optimizer.defaults.get("fused", False)

    def __call__(self, images_uint8: torch.Tensor, size: int, noise: torch.Tensor) -> MicroStepResult:
        """images_uint8: (n, 3, S, S) on the device; size: B; noise: (n, (B/p)^2)."""
        accelerator = self.accelerator
        images = normalize_on_device(images_uint8, IMAGENET_MEAN, IMAGENET_STD)  # (n, 3, S, S) float32
        images = low_frequency_crop(images, size, self.frequency_mode)  # (n, 3, B, B): what the model sees
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: this step may overwrite the last one's outputs
        nonfinite = grad_norm = None
        with accelerator.accumulate(self.model):
            out = self.forward(
                images,
                mask_ratio=self.mask_ratio,
                noise=noise,
                decode_fraction=self.decode_fraction,
                decode_of_patches=self.decode_of_patches,
            )
            loss = out.loss.detach().clone()  # clone: a CUDA-graph output is overwritten by the next replay
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                # grads are all-reduced by now, so the norm and the skip decision agree on every rank
                grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.max_norm)
                nonfinite = ~torch.isfinite(grad_norm)
                if self.skip_on_device:
                    self.raw_optimizer.found_inf = nonfinite.float()
                elif accelerator.scaler is None and nonfinite.item():  # non-fused fallback: one host check
                    self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.skip_on_device:
                self.raw_optimizer.found_inf = None
        return MicroStepResult(loss=loss, nonfinite=nonfinite, grad_norm=grad_norm)


# ----------------------------------------------------------------------------- built from a config, in one place


def train_step_of(
    cfg: PretrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer,
    sizes: tuple[int, ...],
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
) -> TrainStep:
    """The step a run with `cfg` trains, every setting read from cfg here and nowhere else, so a benchmark times
    exactly that step; `compile_mode`: another mode than cfg.train.compile (a benchmark comparing modes)."""
    m = cfg.model
    # the patch count the decoded share is of: the full crop's (decode_fraction_of=full_size), or each B's own (None)
    of_patches = (cfg.data.crop_size // m.patch_size) ** 2 if m.decode_fraction_of == "full_size" else None
    return TrainStep(
        accelerator,
        model,
        optimizer,
        m.mask_ratio,
        cfg.curriculum.mode,
        cfg.optim.clip_grad,
        compile_mode=compile_mode or cfg.train.compile,
        sizes=tuple(sizes),
        compile_backend=compile_backend,
        decode_fraction=m.decode_fraction,
        decode_of_patches=of_patches,
    )


def build_training(
    cfg: PretrainConfig,
    accelerator: Accelerator,
    lr: float,
    sizes: tuple[int, ...],
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
) -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainStep]:
    """The MAE, fused AdamW at `lr` and its train step (one compiled graph per size in `sizes`), prepared by
    `accelerator`: for the training loop, the study's warm-up and the benchmarks."""
    model = build_mae(mae_spec(cfg))
    optimizer = build_adamw(model, lr, cfg.optim.weight_decay, cfg.optim.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, train_step_of(cfg, accelerator, model, optimizer, sizes, compile_mode, compile_backend)
