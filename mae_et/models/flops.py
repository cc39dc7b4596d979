"""Analytic FLOP count of one MAE training step, for MFU and for the curriculum's compute accounting.

Counts matrix multiplies only (2 FLOPs per multiply-add), as is usual for MFU; layer norms,
softmax, GELU and the optimizer are left out. A training step costs 3x the forward pass
(forward + backward through activations and weights).
"""

from __future__ import annotations

from mae_et.models.hog import HOG_BINS, HOG_CELL_SIZE, hog_dim
from mae_et.models.mae import MODEL_SIZES, decoded_count


def transformer_block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one pre-norm ViT block on `tokens` tokens of width `dim`."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    return linear + attention


def mae_forward_flops(
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    decoder_embed_dim: int,
    decoder_depth: int,
    mask_ratio: float = 0.75,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    decode_fraction: float = 1.0,
    target_dim: int | None = None,
    decode_of_size: int | None = None,
) -> float:
    """decode_fraction: the share of all patches the decoder reconstructs (the model's own `decoded_count`);
    decode_of_size: the input size whose patches that share is of (model.decode_fraction_of=full_size: the crop
    size; None: img_size's own); target_dim: values predicted per patch (the model's `target_dim`; default p*p*C
    pixels)."""
    num_patches = (img_size // patch_size) ** 2
    of_patches = None if decode_of_size is None else (decode_of_size // patch_size) ** 2
    kept, decoded = decoded_count(num_patches, mask_ratio, decode_fraction, of_patches)
    patch_dim = patch_size * patch_size * in_chans
    target_dim = patch_dim if target_dim is None else target_dim
    enc_tokens, dec_tokens = 1 + kept, 1 + kept + decoded  # the decoder runs on cls + visible + reconstructed
    flops = 2 * num_patches * patch_dim * embed_dim  # patch embedding runs on every patch, before masking
    flops += depth * transformer_block_flops(enc_tokens, embed_dim, mlp_ratio)
    flops += 2 * enc_tokens * embed_dim * decoder_embed_dim  # decoder_embed
    flops += decoder_depth * transformer_block_flops(dec_tokens, decoder_embed_dim, mlp_ratio)
    flops += 2 * dec_tokens * decoder_embed_dim * target_dim  # decoder_pred (cls row included, then dropped)
    return flops


def mae_train_flops_per_image(
    size: str,
    img_size: int,
    patch_size: int | None = None,
    decoder_embed_dim: int = 512,
    decoder_depth: int = 8,
    mask_ratio: float = 0.75,
    decode_fraction: float = 1.0,
    target: str = "pixel",
    hog_cell_size: int = HOG_CELL_SIZE,
    hog_bins: int = HOG_BINS,
    decode_of_size: int | None = None,
) -> float:
    """target: pixel | hog; the HOG filters themselves are not matrix multiplies and are left out (they are
    timed instead: benchmarks/hog_cost.py)."""
    spec = MODEL_SIZES[size]
    patch = patch_size or spec.get("patch_size", 16)
    target_dim = hog_dim(patch, hog_cell_size, hog_bins) if target == "hog" else None
    return 3 * mae_forward_flops(
        img_size,
        patch,
        spec["embed_dim"],
        spec["depth"],
        decoder_embed_dim,
        decoder_depth,
        mask_ratio,
        decode_fraction=decode_fraction,
        target_dim=target_dim,
        decode_of_size=decode_of_size,
    )
