"""What the pretraining loop watches: reconstruction figures (`mae_et.models.figures`) of fixed images and a weighted
kNN of the encoder (`mae_et.models.features`), on the main rank while the others wait (docs/design.md)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, Subset

from mae_et.curriculum.frequency import low_frequency_crop
from mae_et.data.folder import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device, scan_image_folder
from mae_et.data.fractal import FractalDataset
from mae_et.data.sources import data_dir
from mae_et.models.features import knn_evaluate, knn_evaluate_loaders
from mae_et.models.figures import panel_titles, reconstruction_grid, save_png, titled_figure
from mae_et.models.mae import MaskedAutoencoderViT
from mae_et.train.config import PretrainConfig

RECON_SEED = 1234  # fixed images and masks, so reconstruction grids compare across steps


def run_knn_monitor(model: MaskedAutoencoderViT, cfg: PretrainConfig, accelerator: Accelerator) -> dict[str, float]:
    """Weighted kNN of the unmasked encoder, on the main rank (the others wait): {"knn_top1_cls": .., ...}."""
    box: list[Any] = [None]
    if accelerator.is_main_process and cfg.data.source == "fractal":
        train, val = fractal_knn_loaders(cfg)
        box[0] = knn_evaluate_loaders(model, train, val, cfg.data.fractal_classes, device=accelerator.device)
    elif accelerator.is_main_process:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable files were already reported by the training loader
            box[0] = knn_evaluate(
                model,
                data_dir(cfg.data),
                Path(cfg.data.root) / cfg.tracking.knn_split,
                cfg.data.crop_size,
                batch_size=cfg.tracking.knn_batch_size,
                num_workers=cfg.data.num_workers,
                device=accelerator.device,
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


FRACTAL_KNN_BANK_PER_CLASS = 50  # fixed renders of the training systems: the kNN bank


# The held-out split: the same systems, renders never trained on; 100 a class keeps the standard error near 1.6
# points at 10 classes (docs/design.md, "The pretraining loop")
FRACTAL_KNN_VAL_PER_CLASS = 100


def knn_held_out_count(cfg: PretrainConfig) -> int:
    """How many images the kNN monitor scores (its accuracies move by a binomial standard error of that n)."""
    if cfg.data.source == "fractal":
        return cfg.data.fractal_classes * FRACTAL_KNN_VAL_PER_CLASS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a listing only; bad files are reported by the loaders
        return len(scan_image_folder(Path(cfg.data.root) / cfg.tracking.knn_split).samples)


# The kNN a run leads with: the mean-pooled patch tokens, which the MAE loss reaches directly (docs/design.md)
HEADLINE_KNN = "knn_top1_mean"


def standard_error(top1_percent: float, n: int) -> float:
    """The binomial standard error of a top-1 accuracy (in points) over n images."""
    p = top1_percent / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def fractal_knn_loaders(cfg: PretrainConfig) -> tuple[DataLoader, DataLoader]:
    """Labelled loaders of fixed fractal renders, normalised like the training input: (bank, held-out)."""
    d = cfg.data
    bank = FractalDataset(
        d.fractal_classes, d.fractal_images_per_class, d.crop_size, seed=cfg.train.seed, split="train"
    )
    val = FractalDataset(d.fractal_classes, FRACTAL_KNN_VAL_PER_CLASS, d.crop_size, seed=cfg.train.seed, split="val")
    n_bank = d.fractal_classes * min(FRACTAL_KNN_BANK_PER_CLASS, d.fractal_images_per_class)  # index i is class i % K

    def collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([item["image"] for item in items])  # (B, 3, S, S) uint8
        return normalize_on_device(images, IMAGENET_MEAN, IMAGENET_STD), torch.tensor([item["label"] for item in items])

    def loader(dataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=cfg.tracking.knn_batch_size, num_workers=d.num_workers, collate_fn=collate
        )

    return loader(Subset(bank, range(n_bank))), loader(val)


def reconstruction_figure_path(run_dir: Path, step: int) -> Path:
    """Where `log_reconstructions` writes step `step`'s figure."""
    return run_dir / "reconstructions" / f"step_{step:08d}.png"


def log_reconstructions(model, dataset, cfg, size, run_dir, tracker, step, device, main) -> None:
    """A titled figure (original | masked | reconstruction | reconstruction + visible; HOG: predicted | target HOG)
    of fixed images at size B, in the run folder (`reconstruction_figure_path`) and to the tracker."""
    if not main:
        return
    n = min(cfg.tracking.recon_images, len(dataset))
    picks = [dataset[(i * (len(dataset) // n), RECON_SEED)]["image"] for i in range(n)]
    images = normalize_on_device(torch.stack(picks).to(device), IMAGENET_MEAN, IMAGENET_STD)  # (n, 3, S, S)
    images = low_frequency_crop(images, size, cfg.curriculum.mode)  # (n, 3, B, B)
    gen = torch.Generator(device=device).manual_seed(RECON_SEED)
    noise = torch.rand((n, (size // cfg.model.patch_size) ** 2), generator=gen, device=device)  # (n, L)
    grid = reconstruction_grid(model, images, IMAGENET_MEAN, IMAGENET_STD, mask_ratio=cfg.model.mask_ratio, noise=noise)
    figure = titled_figure(grid, panel_titles(model))
    save_png(figure, reconstruction_figure_path(run_dir, step))
    tracker.log_image("reconstructions", figure, step)
