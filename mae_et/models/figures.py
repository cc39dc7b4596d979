"""A MAE's reconstruction figure, the one the pretraining loop writes and `mae-et visualize` makes for any checkpoint:
per image, original | masked | reconstruction | reconstruction + visible (a HOG target: predicted | target HOG), under
column titles, enlarged to be seen (docs/design.md)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from mae_et.models.hog import hog_glyphs
from mae_et.models.mae import NORM_PIX_EPS, MaskedAutoencoderViT

_MASK_GREY = 0.5  # shown in place of removed patches (in [0, 1] pixel space, after un-normalising)
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
