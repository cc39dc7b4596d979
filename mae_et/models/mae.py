"""Masked-autoencoder ViT (He et al. 2021) built from timm blocks, with the reference's parameter names (official
checkpoints load strictly) and sin-cos positions generated per input grid, so one model trains at every curriculum
size (docs/design.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mae_et.models.hog import HOG_BINS, HOG_CELL_SIZE, HOGTarget

__all__ = [
    "MODEL_SIZES",
    "ModelSize",
    "PosEmbed",
    "Target",
    "DecodeFractionOf",
    "MAEOutput",
    "MAESpec",
    "MaskedAutoencoderViT",
    "build_mae",
    "decoded_count",
    "get_2d_sincos_pos_embed",
    "mae_vit",
]

# Encoder sizes; the decoder defaults (512 wide, 8 deep, 16 heads) are those of the paper.
MODEL_SIZES: dict[str, dict] = {
    "micro": dict(embed_dim=64, depth=2, num_heads=2),  # CPU tests only
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}

ModelSize = Literal["micro", "tiny", "small", "base", "large", "huge"]  # the keys of MODEL_SIZES (tested)
# sin-cos positions at a reduced input size: the reduced grid's own | spread over the full crop's grid
PosEmbed = Literal["grid", "extent"]
# what the decoder predicts per patch: its pixels (MAE) or its histograms of oriented gradients (MaskFeat)
Target = Literal["pixel", "hog"]
# which patches the decoded share is a share of: each input size's own (stage) | the full crop's (full_size)
DecodeFractionOf = Literal["stage", "full_size"]


def decoded_count(
    num_patches: int, mask_ratio: float, decode_fraction: float = 1.0, of_patches: int | None = None
) -> tuple[int, int]:
    """(visible, reconstructed masked) patch counts of one image with L = num_patches.

    visible = int(L * (1 - mask_ratio)), as the reference's len_keep. decode_fraction is the share of *all*
    patches the decoder reconstructs (CrossMAE's "kept mask ratio"): int(L' * decode_fraction) of the masked
    ones, at least one and at most all of them, so 1.0 (or any share >= mask_ratio) reconstructs every masked
    patch, as MAE does. L' = of_patches, the patch count the share is taken of: None is L itself (the share of
    each input size's patches); the full crop's count (model.decode_fraction_of=full_size) keeps the decoded
    count per image that of the full size at every curriculum stage, capped at the stage's masked patches.
    The model, the FLOP count and the study all take their token counts from here.
    """
    len_keep = int(num_patches * (1 - mask_ratio))
    masked = num_patches - len_keep
    share_of = num_patches if of_patches is None else of_patches
    return len_keep, min(masked, max(1, int(share_of * decode_fraction)))


# Reference eps for the norm-pix target; visualize.py reuses it to invert the normalisation.
NORM_PIX_EPS = 1e-6


# --------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding
# --------------------------------------------------------------------------------------
def _1d_sincos(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) float64 -> (M, embed_dim) float64: [sin(pos*omega), cos(pos*omega)]."""
    if embed_dim % 2 != 0:
        raise ValueError(f"1-D sin-cos needs an even dim, got {embed_dim}")
    half = embed_dim // 2
    omega = torch.arange(half, dtype=torch.float64) / (embed_dim / 2.0)  # (D/2,)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = torch.outer(pos.reshape(-1), omega)  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int, cls_token: bool = True, extent: int | None = None
) -> torch.Tensor:
    """Reference MAE 2-D sin-cos table, returned as float32 of shape (1 + g*g, D) (or (g*g, D)).

    Computed in float64 with the reference's quirks (meshgrid with w first, the first half of
    the dims from grid[0]) so it matches the ``pos_embed`` buffers stored in official checkpoints.

    Positions are 0..g-1 (the reference). With ``extent`` = G, the g positions span the same image
    extent as a G-patch grid instead: patch i's centre sits at (i + 0.5) * G / g - 0.5 in full-grid
    units, so an image location keeps (nearly) its code when the input shrinks to g < G patches per
    side (what resizing the table does in EfficientTrain's ViT code and in MAE's interpolate_pos_embed).
    At g == G both are the same table.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos needs embed_dim divisible by 4, got {embed_dim}")
    g = int(grid_size)
    grid_h = torch.arange(g, dtype=torch.float64)  # (g,)
    if extent is not None and extent != g:
        grid_h = (grid_h + 0.5) * (extent / g) - 0.5  # (g,) fractional positions on the full grid
    grid_w = grid_h.clone()  # (g,)
    # numpy's meshgrid(grid_w, grid_h) ('xy' indexing) puts w first: grid[0][i, j] = w_j.
    gw, gh = torch.meshgrid(grid_w, grid_h, indexing="xy")  # (g, g) each
    grid = torch.stack([gw, gh], dim=0).reshape(2, 1, g, g)  # (2, 1, g, g)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])  # (g*g, D/2)
    emb_w = _1d_sincos(embed_dim // 2, grid[1])  # (g*g, D/2)
    emb = torch.cat([emb_h, emb_w], dim=1)  # (g*g, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)  # (1+g*g, D)
    return emb.to(torch.float32)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
@dataclass
class MAEOutput:
    loss: torch.Tensor  # () scalar
    # (N, L, T), T = target_dim (pixels or HOG); under partial reconstruction, zero rows where the decoder did not run
    pred: torch.Tensor
    mask: torch.Tensor  # (N, L), 1 = masked/removed, 0 = kept
    ids_restore: torch.Tensor  # (N, L)
    scored: torch.Tensor | None = None  # (N, L), 1 = reconstructed and in the loss; None = every masked patch


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder and a light ViT decoder; works at any square size divisible by p."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        pos_embed: str = "grid",
        target: str = "pixel",
        hog_cell_size: int = HOG_CELL_SIZE,
        hog_bins: int = HOG_BINS,
    ) -> None:
        super().__init__()
        # the schema's rules hold (mae_et.train.config): img_size a multiple of patch_size, no norm_pix_loss with hog
        # grid: positions 0..g-1 at every input size (the reference); extent: positions spread over the
        # img_size grid, so a smaller input B (g < G patches) keeps each location's code (fractional positions)
        self.pos_embed_mode = pos_embed
        self.target = target
        # the fixed HOG filters (no parameters, nothing in the state dict); None for the pixel target
        self.hog = HOGTarget(patch_size, hog_cell_size, hog_bins, in_chans) if target == "hog" else None
        # values the decoder predicts per patch: p*p*C pixels, or (p/cell)^2 * C * bins HOG values
        self.target_dim = patch_size * patch_size * in_chans if self.hog is None else self.hog.dim
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.decoder_embed_dim = decoder_embed_dim
        self.norm_pix_loss = norm_pix_loss
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        # ---- encoder ----
        # strict_img_size=False: img_size is only the default, any multiple of p is accepted.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # (1, 1, D)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # ---- decoder ----
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))  # (1, 1, Dd)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.target_dim, bias=True)

        # Plain dict, not buffers: the tables are derived data and must stay out of the state dict.
        self._pos_cache: dict[tuple, torch.Tensor] = {}

        self.initialize_weights()

    # ---------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        # Conv weight treated like a Linear over the flattened patch, as in the reference.
        w = self.patch_embed.proj.weight.data  # (D, C, p, p)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token"}

    # ---------------------------------------------------------------- helpers
    def _pos_embed(self, which: str, grid: int) -> torch.Tensor:
        """Cached sin-cos table (1, 1+g*g, D or Dd) on the parameters' device and dtype.

        The parameters' dtype (not the activations') is used so that under autocast the
        addition promotes like the reference's float32 ``pos_embed`` parameter does.
        """
        dim = self.embed_dim if which == "enc" else self.decoder_embed_dim
        device, dtype = self.cls_token.device, self.cls_token.dtype
        key = (which, grid, device, dtype)
        table = self._pos_cache.get(key)
        if table is None:
            extent = self.img_size // self.patch_size if self.pos_embed_mode == "extent" else None
            table = get_2d_sincos_pos_embed(dim, grid, cls_token=True, extent=extent).to(device=device, dtype=dtype)
            table = table.unsqueeze(0)  # (1, 1+g*g, dim)
            self._pos_cache[key] = table
        return table

    def cache_pos_embed(self, img_sizes) -> None:
        """Fill the sin-cos cache for these input sizes before `torch.compile` traces the model.

        A graph traced on a cache miss differs from one traced on a hit, so a size first met
        inside a compiled step would compile twice; filling the cache first gives one graph per size.
        """
        for size in img_sizes:
            self._pos_embed("enc", size // self.patch_size)
            self._pos_embed("dec", size // self.patch_size)

    def _check_imgs(self, imgs: torch.Tensor) -> int:
        """Validate (N, C, B, B) and return the grid side B // p (shape-only, no host sync)."""
        if imgs.ndim != 4:
            raise ValueError(f"expected imgs of shape (N, C, H, W), got {tuple(imgs.shape)}")
        h, w = imgs.shape[2], imgs.shape[3]
        p = self.patch_size
        if h != w or h % p != 0:
            raise ValueError(f"input size {h}x{w} is not square with a side that is a multiple of patch_size {p}")
        return h // p

    # ---------------------------------------------------------------- patchify
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), reference ordering (row-major patches, channels last)."""
        p = self.patch_size
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)  # (N, L, p*p*C)

    def unpatchify(self, x: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, g*p, g*p); the grid side is inferred from L when not given."""
        p = self.patch_size
        num_patches = x.shape[1]
        g = math.isqrt(num_patches) if grid is None else grid
        if g * g != num_patches:
            raise ValueError(f"cannot unpatchify L={num_patches} into a square grid of side {g}")
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=g, w=g, p=p, q=p)  # (N, C, H, W)

    # ---------------------------------------------------------------- masking
    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample shuffle by argsort of noise; the len_keep lowest-noise tokens are kept."""
        n, num_patches, d = x.shape  # (N, L, D)
        len_keep = int(num_patches * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, num_patches, device=x.device)  # (N, L) in [0, 1)
        ids_shuffle = torch.argsort(noise, dim=1)  # (N, L) ascending: small noise first = kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
        ids_keep = ids_shuffle[:, :len_keep]  # (N, len_keep)
        x_kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (N, len_keep, D)
        # Mask in shuffled order (0 for the kept prefix), then put it back in patch order.
        mask = torch.ones(n, num_patches, device=x.device)  # (N, L)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # (N, L)
        return x_kept, mask, ids_restore

    # ---------------------------------------------------------------- encoder / decoder
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = self._check_imgs(imgs)
        pos = self._pos_embed("enc", grid)  # (1, 1+L, D)
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + pos[:, 1:, :]  # (N, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, len_keep, D)
        cls = self.cls_token + pos[:, :1, :]  # (1, 1, D)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1+len_keep, D)
        for blk in self.blocks:
            x = blk(x)  # (N, 1+len_keep, D)
        x = self.norm(x)  # (N, 1+len_keep, D)
        return x, mask, ids_restore

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, ids_decode: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode the visible tokens plus mask tokens; (N, L, T) in patch order, or (N, K, T), T = target_dim
        (p*p*C pixels, or the HOG vector).

        ids_decode (N, K): the patches to decode, ascending patch indices, the visible ones among them
        (`decode_ids`). None decodes all L patches, as the reference does.
        """
        num_patches = ids_restore.shape[1]
        grid = math.isqrt(num_patches)
        pos = self._pos_embed("dec", grid)  # (1, 1+L, Dd)
        x = self.decoder_embed(latent)  # (N, 1+len_keep, Dd)
        n, _, dd = x.shape
        tokens = num_patches if ids_decode is None else ids_decode.shape[1]  # K: decoder patch tokens
        mask_tokens = self.mask_token.expand(n, tokens + 1 - x.shape[1], -1)  # (N, K-len_keep, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, K, Dd), shuffled order (lowest noise first)
        if ids_decode is None:
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # (N, L, Dd)
            x = torch.cat([x[:, :1, :], x_], dim=1)  # (N, 1+L, Dd)
            x = x + pos  # (N, 1+L, Dd)
        else:
            # The first K of the shuffle, put in patch order: the argsort of their patch indices. With K = L
            # this is ids_restore itself, so the full share gives the reference's tokens in the same order.
            order = torch.argsort(ids_restore.argsort(dim=1)[:, :tokens], dim=1)  # (N, K)
            x_ = torch.gather(x_, dim=1, index=order.unsqueeze(-1).expand(-1, -1, dd))  # (N, K, Dd), patch order
            x_ = x_ + torch.gather(pos[:, 1:, :].expand(n, -1, -1), 1, ids_decode.unsqueeze(-1).expand(-1, -1, dd))
            x = torch.cat([x[:, :1, :] + pos[:, :1, :], x_], dim=1)  # (N, 1+K, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)  # (N, 1+K, Dd)
        x = self.decoder_norm(x)  # (N, 1+K, Dd)
        x = self.decoder_pred(x)  # (N, 1+K, T)
        return x[:, 1:, :]  # (N, K, T)

    @staticmethod
    def decode_ids(ids_restore: torch.Tensor, len_keep: int, len_decode: int) -> torch.Tensor:
        """(N, K = len_keep + len_decode) ascending patch indices: the visible patches and the len_decode
        masked ones of lowest noise (the next in the shuffle), so the choice is made by the mask's own noise."""
        ids_shuffle = torch.argsort(ids_restore, dim=1)  # (N, L), the inverse permutation
        return ids_shuffle[:, : len_keep + len_decode].sort(dim=1).values  # (N, K)

    def target_of(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder is asked for, per patch, in float32: pixels (N, L, p*p*C) or HOG (N, L, hog dim).
        norm_pix_loss's per-patch normalisation is applied in the loss, not here."""
        if self.hog is not None:
            return self.hog(imgs)  # (N, L, T), computed on the image the model sees
        return self.patchify(imgs.float())  # (N, L, p*p*C)

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, ids_decode: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error over the masked patches the decoder reconstructed, always in float32.

        pred (N, L, T), or (N, K, T) at the patches ids_decode (N, K) names; T = target_dim.
        """
        # Autocast off so sub/pow/mean/var are not run in half precision.
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            target = self.target_of(imgs)  # (N, L, T)
            mask = mask.float()  # (N, L)
            if ids_decode is not None:
                target = torch.gather(target, 1, ids_decode.unsqueeze(-1).expand(-1, -1, target.shape[-1]))  # (N, K, T)
                mask = torch.gather(mask, 1, ids_decode)  # (N, K): 0 for the visible patches among them
            if self.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)  # (N, L|K, 1)
                var = target.var(dim=-1, keepdim=True)  # (N, L|K, 1), unbiased like the reference
                target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5  # (N, L|K, p*p*C)
            loss = (pred.float() - target) ** 2  # (N, L|K, T)
            loss = loss.mean(dim=-1)  # (N, L|K)
            return (loss * mask).sum() / mask.sum()  # ()

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        noise: torch.Tensor | None = None,
        decode_fraction: float = 1.0,
        decode_of_patches: int | None = None,
    ) -> MAEOutput:
        """decode_fraction: the share of all patches reconstructed (`decoded_count`); 1.0 = every masked one.
        decode_of_patches: the patch count that share is of (None: this input's own L; `decoded_count`).

        Training passes the run's share; reconstructions for people (monitor, visualize, notebooks) call
        with the default, so they show every masked patch whatever share the run trained with.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)  # (N, 1+len_keep, D)
        num_patches = ids_restore.shape[1]
        len_keep, len_decode = decoded_count(num_patches, mask_ratio, decode_fraction, decode_of_patches)
        if len_keep + len_decode == num_patches:  # every masked patch: the reference decoder, bit for bit
            pred = self.forward_decoder(latent, ids_restore)  # (N, L, T)
            loss = self.forward_loss(imgs, pred, mask)  # ()
            return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore)
        ids_decode = self.decode_ids(ids_restore, len_keep, len_decode)  # (N, K)
        pred = self.forward_decoder(latent, ids_restore, ids_decode)  # (N, K, T)
        loss = self.forward_loss(imgs, pred, mask, ids_decode)  # ()
        index = ids_decode.unsqueeze(-1).expand(-1, -1, pred.shape[-1])  # (N, K, T)
        pred_full = pred.new_zeros(pred.shape[0], num_patches, pred.shape[-1]).scatter(1, index, pred)  # (N, L, T)
        scored = torch.zeros_like(mask).scatter(1, ids_decode, 1.0) * mask  # (N, L)
        return MAEOutput(loss=loss, pred=pred_full, mask=mask, ids_restore=ids_restore, scored=scored)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder on all patches in patch order (never masked): (N, 1+L, D) after the final norm."""
        grid = self._check_imgs(imgs)
        pos = self._pos_embed("enc", grid)  # (1, 1+L, D)
        x = self.patch_embed(imgs) + pos[:, 1:, :]  # (N, L, D)
        cls = self.cls_token + pos[:, :1, :]  # (1, 1, D)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1+L, D)
        for blk in self.blocks:
            x = blk(x)  # (N, 1+L, D)
        return self.norm(x)  # (N, 1+L, D)


def mae_vit(size: str, patch_size: int | None = None, **kwargs: Any) -> MaskedAutoencoderViT:
    """Build a MAE from ``MODEL_SIZES[size]``; ``patch_size`` and kwargs override the preset."""
    cfg = dict(MODEL_SIZES[size])
    if patch_size is not None:
        cfg["patch_size"] = patch_size
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)


@dataclass(frozen=True)
class MAESpec:
    """What a recipe says about the MAE it trains (`mae_et.train.config.mae_spec`), checked by its schema."""

    size: ModelSize
    patch_size: int
    img_size: int  # the full crop size
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    norm_pix_loss: bool
    pos_embed: PosEmbed
    target: Target
    hog_cell_size: int
    hog_bins: int


def build_mae(spec: MAESpec) -> MaskedAutoencoderViT:
    """The MAE of a spec: the training loop, the reconstruction figures, the study and the benchmarks build it here."""
    return mae_vit(
        spec.size,
        patch_size=spec.patch_size,
        img_size=spec.img_size,
        decoder_embed_dim=spec.decoder_embed_dim,
        decoder_depth=spec.decoder_depth,
        decoder_num_heads=spec.decoder_num_heads,
        norm_pix_loss=spec.norm_pix_loss,
        pos_embed=spec.pos_embed,
        target=spec.target,
        hog_cell_size=spec.hog_cell_size,
        hog_bins=spec.hog_bins,
    )
