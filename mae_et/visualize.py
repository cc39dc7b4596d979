"""Reconstruction figures for a MAE: original | masked | reconstruction | reconstruction + visible."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image
from torchvision.utils import make_grid

from mae_et.model import NORM_PIX_EPS, MaskedAutoencoderViT

__all__ = ["reconstruction_grid", "save_png"]

# Grey shown in place of removed patches (in [0, 1] pixel space, after un-normalising).
_MASK_GREY = 0.5
_PANELS = 4
_PADDING = 2


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

    ``imgs`` (N, 3, B, B) are normalised with (mean, std) per channel, as the model sees them.
    """
    was_training = model.training
    model.eval()
    try:
        imgs = imgs.float()  # (N, 3, B, B)
        out = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)

    grid_side = imgs.shape[-1] // model.patch_size
    pred = out.pred.float()  # (N, L, p*p*3)
    if model.norm_pix_loss:
        # The decoder predicts each patch normalised by its OWN statistics; undo that with
        # the target patch's mean/var (same unbiased var and eps as the loss) to get pixels.
        target = model.patchify(imgs)  # (N, L, p*p*3)
        t_mean = target.mean(dim=-1, keepdim=True)  # (N, L, 1)
        t_var = target.var(dim=-1, keepdim=True)  # (N, L, 1)
        pred = pred * (t_var + NORM_PIX_EPS) ** 0.5 + t_mean  # (N, L, p*p*3)
    recon = model.unpatchify(pred, grid_side)  # (N, 3, B, B)

    # Per-pixel mask: broadcast each patch's 0/1 over its p*p*3 values, then unpatchify.
    mask = out.mask.float().unsqueeze(-1).expand(-1, -1, pred.shape[-1])  # (N, L, p*p*3)
    mask = model.unpatchify(mask, grid_side)  # (N, 3, B, B), 1 = removed

    m = _channel_stats(mean, imgs)  # (1, 3, 1, 1)
    s = _channel_stats(std, imgs)  # (1, 3, 1, 1)
    original = imgs * s + m  # (N, 3, B, B) in pixel space
    recon = recon * s + m  # (N, 3, B, B)
    masked_input = original * (1 - mask) + _MASK_GREY * mask  # (N, 3, B, B)
    pasted = original * (1 - mask) + recon * mask  # (N, 3, B, B)

    panels = torch.stack([original, masked_input, recon, pasted], dim=1)  # (N, 4, 3, B, B)
    panels = panels.flatten(0, 1).clamp(0.0, 1.0)  # (4N, 3, B, B), row-major: image by image
    grid = make_grid(panels.cpu(), nrow=_PANELS, padding=_PADDING)  # (3, H_grid, W_grid)
    return (grid * 255.0).round().clamp(0, 255).to(torch.uint8)  # (3, H_grid, W_grid)


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
