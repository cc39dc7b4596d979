"""Histogram-of-oriented-gradients targets per patch, as MaskFeat (Wei et al., arXiv 2112.09133) defines them, on
the image the model sees; batched tensor algebra, deterministic on every device (the recipe: docs/design.md)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = ["HOG_BINS", "HOG_CELL_SIZE", "HOGTarget", "hog_dim", "hog_glyphs"]

HOG_BINS = 9  # MaskFeat: 9 unsigned orientation bins
HOG_CELL_SIZE = 8  # MaskFeat: 8-px cells


def hog_dim(patch_size: int, cell_size: int = HOG_CELL_SIZE, bins: int = HOG_BINS, in_chans: int = 3) -> int:
    """Length of one patch's HOG target: (p / cell)^2 cells x channels x bins (cell divides p: the schema's rule)."""
    return (patch_size // cell_size) ** 2 * in_chans * bins


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """(size, size) separable Gaussian centred on the window, summing to 1 (MaskFeat's `get_gkern`)."""
    offsets = torch.arange(size, dtype=torch.float64)
    offsets = (offsets - offsets.mean()) / sigma  # (size,)
    line = torch.exp(-0.5 * offsets**2)  # (size,)
    window = line[:, None] * line[None, :]  # (size, size)
    return (window / window.sum()).float()


class HOGTarget(nn.Module):
    """imgs (N, C, B, B) -> HOG targets (N, L, hog_dim) in patch order, float32 (float64 for float64 input),
    without gradients.

    Its one tensor (the Gaussian window) is a non-persistent buffer: it follows the model to its device but stays
    out of the state dict, so checkpoints and strict key matching are those of the pixel-target MAE.
    """

    def __init__(
        self, patch_size: int, cell_size: int = HOG_CELL_SIZE, bins: int = HOG_BINS, in_chans: int = 3
    ) -> None:
        super().__init__()
        self.dim = hog_dim(patch_size, cell_size, bins, in_chans)
        self.patch_size, self.cell_size, self.bins, self.in_chans = patch_size, cell_size, bins, in_chans
        self.register_buffer("window", _gaussian_window(patch_size, patch_size / 2), persistent=False)  # (p, p)

    def histogram(self, magnitude: torch.Tensor, bin_index: torch.Tensor, scatter: bool) -> torch.Tensor:
        """(..., P) weights and bins of each cell's P pixels -> (..., bins) sums. scatter: one scatter_add_, 6x
        faster on the CPU (where it is deterministic); otherwise a masked sum per bin, as on CUDA, where scatter_add_
        accumulates with atomics in no fixed order and a resumed run would no longer end bit-identical."""
        if scatter:
            out = magnitude.new_zeros(*magnitude.shape[:-1], self.bins)  # (..., bins)
            return out.scatter_add_(-1, bin_index, magnitude)
        return torch.stack([torch.where(bin_index == k, magnitude, 0).sum(dim=-1) for k in range(self.bins)], dim=-1)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        n, c, h, w = imgs.shape  # (N, C, B, B)
        p, cell = self.patch_size, self.cell_size
        if c != self.in_chans or h % p or w % p:
            raise ValueError(
                f"HOG target expects (N, {self.in_chans}, H, W) with H, W multiples of {p}; got {tuple(imgs.shape)}"
            )
        # float32 (float64 stays float64, which the reference test uses: there the filter sums are exact)
        dtype = torch.float64 if imgs.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            x = F.pad(imgs.to(dtype), (1, 1, 1, 1), mode="reflect")  # (N, C, B+2, B+2)
            # Sobel, separably: the [1, 0, -1] difference first, then the [1, 2, 1] smoothing across it, so that
            # two equal neighbours give an exact 0 (one 3 x 3 filter sums six terms and leaves a rounding residue,
            # whose random sign sends a flat-in-x pixel to bin 0 or bin 8: 29% of 16-px cells of real images
            # differed from exact arithmetic that way in float32)
            dx = x[:, :, :, :-2] - x[:, :, :, 2:]  # (N, C, B+2, B): left - right
            gx = dx[:, :, :-2] + 2 * dx[:, :, 1:-1] + dx[:, :, 2:]  # (N, C, B, B)
            dy = x[:, :, :-2, :] - x[:, :, 2:, :]  # (N, C, B, B+2): top - bottom
            gy = dy[..., :-2] + 2 * dy[..., 1:-1] + dy[..., 2:]  # (N, C, B, B)
            magnitude = torch.hypot(gx, gy).mul_(
                self.window.to(dtype).repeat(h // p, w // p)
            )  # (N, C, B, B), Gaussian per patch
            # floor(atan2(gx, gy) / pi * bins) mod bins, in place: the unsigned orientation bin
            bin_index = (
                torch.atan2(gx, gy).div_(math.pi).mul_(self.bins).floor_().remainder_(self.bins).long()
            )  # (N, C, B, B)
            # each cell's pixels on the last axis: (N, C, B/cell, B/cell, cell*cell)
            magnitude = rearrange(magnitude, "n c (h a) (w b) -> n c h w (a b)", a=cell, b=cell)
            bin_index = rearrange(bin_index, "n c (h a) (w b) -> n c h w (a b)", a=cell, b=cell)
            hist = self.histogram(
                magnitude, bin_index, scatter=imgs.device.type == "cpu"
            )  # (N, C, B/cell, B/cell, bins)
            hist = F.normalize(hist, p=2, dim=-1)  # each cell's histogram per channel, unit L2 norm over the bins
            per_side = p // cell
            hist = rearrange(hist, "n c (h u) (w v) k -> n (h w) (u v c k)", u=per_side, v=per_side)  # (N, L, dim)
            return hist.float() if imgs.dtype != torch.float64 else hist


def hog_glyphs(
    features: torch.Tensor, grid: int, patch_size: int, cell_size: int = HOG_CELL_SIZE, bins: int = HOG_BINS
) -> torch.Tensor:
    """HOG vectors (N, L, dim) -> (N, 1, B, B) images in [0, 1], B = grid * patch_size: in each cell, one line per bin
    along the edge direction that bin stands for (perpendicular to its gradient), as bright as the bin's value
    averaged over the channels, the whole batch scaled by its largest value. Negative values (a prediction may
    have them) show as 0.

    Bin k holds atan2(gx, gy) in [k, k+1) * pi / bins with gx = left - right and gy = top - bottom, so the gradient
    is along -(sin t, cos t) in (x right, y down) and the edge along (cos t, -sin t): bin 0 is a horizontal edge,
    the middle bin a vertical one.
    """
    n, num_patches, dim = features.shape
    per_side = patch_size // cell_size
    if num_patches != grid * grid or dim % (per_side**2 * bins) != 0:
        raise ValueError(
            f"HOG features {tuple(features.shape)} do not fit a {grid} x {grid} grid of {patch_size}-px patches"
        )
    cells = rearrange(
        features.float().clamp(min=0), "n (h w) (u v c k) -> n c (h u) (w v) k", h=grid, u=per_side, v=per_side, k=bins
    ).mean(dim=1)  # (N, G*u, G*v, bins), channel mean
    # one (cell, cell) stencil per bin: an anti-aliased line through the cell centre
    centre = (cell_size - 1) / 2
    coords = torch.arange(cell_size, dtype=torch.float32, device=features.device) - centre  # (cell,)
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (cell, cell) each
    theta = (torch.arange(bins, dtype=torch.float32, device=features.device) + 0.5) * math.pi / bins  # (bins,)
    dx, dy = torch.cos(theta), -torch.sin(theta)  # (bins,) edge directions
    off_line = (x[None] * dy[:, None, None] - y[None] * dx[:, None, None]).abs()  # (bins, cell, cell)
    along = (x[None] * dx[:, None, None] + y[None] * dy[:, None, None]).abs()  # (bins, cell, cell)
    stencil = (1 - off_line).clamp(min=0) * (along <= cell_size / 2).float()  # (bins, cell, cell)
    img = torch.einsum("nhwk,kab->nhawb", cells, stencil)  # (N, G*u, cell, G*v, cell)
    img = img.reshape(n, 1, grid * patch_size, grid * patch_size)  # (N, 1, B, B)
    return img / img.amax().clamp(min=1e-12)
