"""What the pretraining loop watches: reconstruction grids and a weighted kNN of the encoder.

Both run on the main rank at `tracking.recon_every_epochs` / `tracking.knn_every_epochs` (the others wait), and
both are also what the evaluation commands show for any checkpoint (`mae_et.evaluate.visualize`,
`mae_et.evaluate.knn`), so a figure in a run folder and one made later read the same way.

The kNN itself (and the feature pass it runs on) is mae_et.models.features, shared with the evaluation commands
and the study; here is when and on which data the loop runs it.

Reconstruction grid: original | masked | reconstruction | reconstruction with the visible patches pasted back,
per image; norm-pix predictions are un-normalised per patch with the target's own statistics, so they read. A HOG
target (model.target=hog) reconstructs no pixels: its grid is original | masked | predicted HOG | target HOG.
Written as a figure (`titled_figure`): the grid under a strip of column titles, small crops enlarged with
nearest-neighbour (each pixel a square block, nothing smoothed) to at least `FIGURE_MIN_WIDTH` pixels.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Subset
from torchvision.utils import make_grid

from mae_et.curriculum.frequency import low_frequency_crop
from mae_et.data.folder import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device, scan_image_folder
from mae_et.data.fractal import FractalDataset
from mae_et.data.sources import data_dir
from mae_et.models.features import knn_evaluate, knn_evaluate_loaders
from mae_et.models.hog import hog_glyphs
from mae_et.models.mae import NORM_PIX_EPS, MaskedAutoencoderViT
from mae_et.train.config import PretrainConfig

# ----------------------------------------------------------------------------- reconstruction grids


# Grey shown in place of removed patches (in [0, 1] pixel space, after un-normalising).
_MASK_GREY = 0.5


_PANELS = 4


_PADDING = 2


PIXEL_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
HOG_TITLES = ("original", "masked", "predicted HOG", "target HOG")  # a HOG target reconstructs no pixels
FIGURE_MIN_WIDTH = 800  # a 64 px crop's grid (266 px) is too small to see; enlarged by a whole factor to this


def panel_titles(model: MaskedAutoencoderViT) -> tuple[str, ...]:
    """The column titles of `model`'s reconstruction grid."""
    return HOG_TITLES if model.hog is not None else PIXEL_TITLES


def _channel_stats(values: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)  # (1, C, 1, 1)


@torch.no_grad()
def reconstruction_grid(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    mask_ratio: float = 0.75,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (3, H_grid, W_grid): one row per image, 4 panels each, at any input side B.

    ``imgs`` (N, 3, B, B) are normalised with (mean, std) per channel, as the model sees them. Pixel target:
    original | masked | reconstruction | reconstruction + visible. HOG target (it reconstructs no pixels):
    original | masked | predicted HOG | the target's HOG, as orientation glyphs per cell (`hog_glyphs`).
    """
    was_training = model.training
    model.eval()
    try:
        imgs = imgs.float()  # (N, 3, B, B)
        out = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)

    grid_side = imgs.shape[-1] // model.patch_size
    m = _channel_stats(mean, imgs)  # (1, 3, 1, 1)
    s = _channel_stats(std, imgs)  # (1, 3, 1, 1)
    original = imgs * s + m  # (N, 3, B, B) in pixel space
    patch_mask = out.mask.float().unsqueeze(-1).expand(-1, -1, model.patch_size**2 * 3)  # (N, L, p*p*3)
    mask = model.unpatchify(patch_mask, grid_side)  # (N, 3, B, B), 1 = removed
    masked_input = original * (1 - mask) + _MASK_GREY * mask  # (N, 3, B, B)
    if model.hog is not None:
        h = model.hog
        # one brightness scale for prediction and target, so the two panels compare
        both = hog_glyphs(
            torch.cat([out.pred.float(), model.target_of(imgs)]), grid_side, h.patch_size, h.cell_size, h.bins
        ).expand(-1, 3, -1, -1)  # (2N, 3, B, B)
        panels = torch.stack([original, masked_input, both[: len(imgs)], both[len(imgs) :]], dim=1)  # (N, 4, 3, B, B)
        return _panel_grid(panels)

    pred = out.pred.float()  # (N, L, p*p*3)
    if model.norm_pix_loss:
        # The decoder predicts each patch normalised by its OWN statistics; undo that with
        # the target patch's mean/var (same unbiased var and eps as the loss) to get pixels.
        target = model.patchify(imgs)  # (N, L, p*p*3)
        t_mean = target.mean(dim=-1, keepdim=True)  # (N, L, 1)
        t_var = target.var(dim=-1, keepdim=True)  # (N, L, 1)
        pred = pred * (t_var + NORM_PIX_EPS) ** 0.5 + t_mean  # (N, L, p*p*3)
    recon = model.unpatchify(pred, grid_side) * s + m  # (N, 3, B, B) in pixel space
    pasted = original * (1 - mask) + recon * mask  # (N, 3, B, B)
    panels = torch.stack([original, masked_input, recon, pasted], dim=1)  # (N, 4, 3, B, B)
    return _panel_grid(panels)


def _panel_grid(panels: torch.Tensor) -> torch.Tensor:
    """(N, 4, 3, B, B) in [0, 1] -> uint8 (3, H_grid, W_grid), one row per image."""
    panels = panels.flatten(0, 1).clamp(0.0, 1.0)  # (4N, 3, B, B), row-major: image by image
    grid = make_grid(panels.cpu(), nrow=_PANELS, padding=_PADDING)  # (3, H_grid, W_grid)
    return (grid * 255.0).round().clamp(0, 255).to(torch.uint8)  # (3, H_grid, W_grid)


def titled_figure(grid_uint8: torch.Tensor, titles: Sequence[str], min_width: int = FIGURE_MIN_WIDTH) -> torch.Tensor:
    """A `reconstruction_grid` as a figure: uint8 (3, H, W), the grid enlarged by the smallest whole factor that makes
    it at least `min_width` pixels wide (nearest-neighbour, so patches stay sharp), under a white strip with each
    column's title centred over its panels."""
    scale = max(1, math.ceil(min_width / grid_uint8.shape[-1]))
    grid = F.interpolate(grid_uint8[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)
    pad, width = _PADDING * scale, grid.shape[-1]
    column = (width - pad) // len(titles)  # one panel and the padding after it
    size = max(14, min(24, 6 * scale))
    font = ImageFont.load_default(size=size)
    while size > 8 and max(font.getlength(t) for t in titles) > column - 2 * pad:  # the longest title fits its column
        size -= 1
        font = ImageFont.load_default(size=size)
    strip = Image.new("RGB", (width, 2 * size), "white")
    draw = ImageDraw.Draw(strip)
    for i, title in enumerate(titles):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        x = pad + i * column + (column - pad - (right - left)) / 2 - left
        draw.text((x, (2 * size - (bottom - top)) / 2 - top), title, fill="black", font=font)
    strip_uint8 = torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)  # (3, 2 * size, W)
    return torch.cat([strip_uint8, grid], dim=1)  # (3, 2 * size + H * scale, W)


def save_png(grid_uint8: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a uint8 (3, H, W) tensor as a PNG, creating the parent folder if needed."""
    if grid_uint8.dtype != torch.uint8 or grid_uint8.ndim != 3:
        raise ValueError(f"expected a uint8 (C, H, W) tensor, got {grid_uint8.dtype} {tuple(grid_uint8.shape)}")
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    # PIL rather than torchvision.io, whose image encoders are deprecated.
    array = grid_uint8.detach().cpu().permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    if array.shape[-1] == 1:
        array = array[..., 0]  # (H, W) greyscale
    Image.fromarray(array).save(os.fspath(path), format="PNG")


# ----------------------------------------------------------------------------- the loop's monitors


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


# The held-out split: the same systems, renders never trained on. 100 a class (1,000 at 10 classes): the top-1 of
# n images has a binomial standard error of sqrt(p (1 - p) / n), 1.6 points at 50%; 20 a class gave 3.5 points,
# more than the run's gain over some untrained encoders.
FRACTAL_KNN_VAL_PER_CLASS = 100


def knn_held_out_count(cfg: PretrainConfig) -> int:
    """How many images the kNN monitor scores (its accuracies move by a binomial standard error of that n)."""
    if cfg.data.source == "fractal":
        return cfg.data.fractal_classes * FRACTAL_KNN_VAL_PER_CLASS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a listing only; bad files are reported by the loaders
        return len(scan_image_folder(Path(cfg.data.root) / cfg.tracking.knn_split).samples)


# The kNN a run leads with: the mean-pooled patch tokens. The MAE loss reaches every patch token directly (each must
# carry what the decoder needs to fill in its masked neighbours); the cls token only through attention, and on the
# default fractal recipe it gains little over the untrained encoder's (numbers in that recipe).
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
