"""Hugging Face `transformers` names for our MAE, both ways: `ViTMAEForPreTraining` (encoder + decoder) and `ViTModel`
(the encoder), written by `mae-et export --format hf` and read back as a start point or checkpoint. A key table by
hand, so a load needs no transformers installed (docs/design.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mae_et.models.mae import MODEL_SIZES, get_2d_sincos_pos_embed

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
# the Hub's older weights file (a torch pickle): read as every torch file is, weights only (mae_et.checkpoint)
HF_PICKLED_WEIGHTS = "pytorch_model.bin"
HF_MAE_TYPE = "vit_mae"  # config.json model_type of ViTMAEForPreTraining / ViTMAEModel
HF_VIT_TYPE = "vit"  # ... of ViTModel
LAYER_NORM_EPS = 1e-6  # MAE's (HF's default is 1e-12)

# One block, our (timm) names -> transformers 4 names; the attention's fused qkv is split in three (q, k, v).
_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")
# transformers 5 renames (its conversion mapping for ViT / ViTMAE), undone on read: new -> old
_V5_TO_V4 = (
    (r"decoder\.decoder_encoder\.layer\.(\d+)\.", r"decoder.decoder_layers.\1."),  # the decoder's blocks
    (r"\.layers\.(\d+)\.", r".encoder.layer.\1."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
)


def _v4_names(key: str) -> str:
    """A transformers 5 key as transformers 4 (and the Hub's MAE folders) name it; a v4 key is left as is."""
    for pattern, old in _V5_TO_V4:
        key = re.sub(pattern, old, key)  # (the decoder's `decoder_layers.N` has no `.layers.`: it keeps its name)
    return key


def _block_indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    """The N of every `prefix.N.*` present, in order: an extra or missing block keeps its own number (and is then
    named as extra or missing by the key comparison), never renumbered into another."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _blocks_to_hf(state: Mapping[str, Tensor], ours: str, theirs: str) -> dict[str, Tensor]:
    """Every block `ours.N.*` -> `theirs.N.*` (transformers 4 names)."""
    out = {}
    for i in _block_indices(state, ours):
        src, dst = f"{ours}.{i}.", f"{theirs}.{i}."
        for kind in ("weight", "bias"):
            for q, part in zip(_QKV, state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0), strict=True):
                out[f"{dst}attention.attention.{q}.{kind}"] = part.contiguous()
            for a, b in _BLOCK.items():
                out[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
    return out


def _blocks_from_hf(state: Mapping[str, Tensor], theirs: str, ours: str) -> dict[str, Tensor]:
    out = {}
    for i in _block_indices(state, theirs):
        src, dst = f"{theirs}.{i}.", f"{ours}.{i}."
        for kind in ("weight", "bias"):
            names = [f"{src}attention.attention.{q}.{kind}" for q in _QKV]
            if len({tuple(state[n].shape) for n in names}) > 1:  # (a header that says another shape for one)
                shapes = ", ".join(f"{n} {tuple(state[n].shape)}" for n in names)
                raise ValueError(f"query, key and value differ in shape ({shapes})")
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([state[n] for n in names])
            for a, b in _BLOCK.items():
                out[f"{dst}{a}.{kind}"] = state[f"{src}{b}.{kind}"]
    return out


def encoder_to_hf(encoder: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A timm-named encoder (with its pos_embed table) -> HF names under `prefix` ("vit." in ViTMAEForPreTraining,
    "" in ViTModel)."""
    out = {
        f"{prefix}embeddings.cls_token": encoder["cls_token"],
        f"{prefix}embeddings.position_embeddings": encoder["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": encoder["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": encoder["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": encoder["norm.weight"],
        f"{prefix}layernorm.bias": encoder["norm.bias"],
    }
    out.update(_blocks_to_hf(encoder, "blocks", f"{prefix}encoder.layer"))
    return out


def mae_to_hf(mae: Mapping[str, Tensor], grid: int) -> dict[str, Tensor]:
    """Our MAE state dict (no position tables: they are generated) -> `ViTMAEForPreTraining` names, with the sin-cos
    tables of a `grid` x `grid` training grid."""
    dim, ddim = mae["patch_embed.proj.weight"].shape[0], mae["decoder_embed.weight"].shape[0]
    dtype = mae["patch_embed.proj.weight"].dtype
    encoder = {k: v for k, v in mae.items() if not k.startswith(("decoder_", "mask_token"))}
    encoder["pos_embed"] = get_2d_sincos_pos_embed(dim, grid, cls_token=True).unsqueeze(0).to(dtype)  # (1, 1+L, D)
    out = encoder_to_hf(encoder, "vit.")
    out.update(
        {
            "decoder.mask_token": mae["mask_token"],
            # (1, 1+L, Dd)
            "decoder.decoder_pos_embed": get_2d_sincos_pos_embed(ddim, grid, cls_token=True).unsqueeze(0).to(dtype),
            "decoder.decoder_embed.weight": mae["decoder_embed.weight"],
            "decoder.decoder_embed.bias": mae["decoder_embed.bias"],
            "decoder.decoder_norm.weight": mae["decoder_norm.weight"],
            "decoder.decoder_norm.bias": mae["decoder_norm.bias"],
            "decoder.decoder_pred.weight": mae["decoder_pred.weight"],
            "decoder.decoder_pred.bias": mae["decoder_pred.bias"],
        }
    )
    out.update(_blocks_to_hf(mae, "decoder_blocks", "decoder.decoder_layers"))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def hf_to_encoder(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An HF ViTMAE or ViT state dict (transformers 4 or 5 names, with or without the `vit.` prefix) -> the timm-named
    encoder, its position table included; the decoder and a ViT pooler are left out (not part of the encoder)."""
    state = {_v4_names(k): v for k, v in state.items()}
    prefix = "vit." if "vit.embeddings.cls_token" in state else ""
    enc = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith("decoder.")}
    out = {
        "cls_token": enc["embeddings.cls_token"],
        "pos_embed": enc["embeddings.position_embeddings"],
        "patch_embed.proj.weight": enc["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": enc["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": enc["layernorm.weight"],
        "norm.bias": enc["layernorm.bias"],
    }
    out.update(_blocks_from_hf(enc, "encoder.layer", "blocks"))
    return out


def hf_to_mae(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An HF ViTMAEForPreTraining state dict (transformers 4 or 5 names) -> our MAE's names, the encoder's and the
    decoder's position tables included (the caller checks them: they are generated, not learned)."""
    state = {_v4_names(k): v for k, v in state.items()}
    out = hf_to_encoder(state)
    dec = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    out.update(
        {
            "mask_token": dec["mask_token"],
            "decoder_pos_embed": dec["decoder_pos_embed"],
            **{f"{name}.{kind}": dec[f"{name}.{kind}"] for name in _DECODER for kind in ("weight", "bias")},
        }
    )
    out.update(_blocks_from_hf(dec, "decoder_layers", "decoder_blocks"))
    return out


_DECODER = ("decoder_embed", "decoder_norm", "decoder_pred")  # the same names on both sides, under `decoder.`


def hf_configs(
    size: str, patch_size: int, img_size: int, decoder: Mapping[str, int], norm_pix_loss: bool, mask_ratio: float
) -> dict:
    """config.json fields of the two folders: {"vit_mae": ..., "vit": ...}. `decoder`: embed_dim, depth, num_heads;
    `norm_pix_loss` and `mask_ratio`: the run's (transformers masks and scores with them)."""
    dims = MODEL_SIZES[size]
    common = {
        "hidden_size": dims["embed_dim"],
        "num_hidden_layers": dims["depth"],
        "num_attention_heads": dims["num_heads"],
        "intermediate_size": 4 * dims["embed_dim"],  # mlp_ratio 4
        "hidden_act": "gelu",
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": img_size,
        "patch_size": patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    mae = {
        **common,
        "decoder_hidden_size": decoder["embed_dim"],
        "decoder_num_hidden_layers": decoder["depth"],
        "decoder_num_attention_heads": decoder["num_heads"],
        "decoder_intermediate_size": 4 * decoder["embed_dim"],
        "mask_ratio": float(mask_ratio),
        "norm_pix_loss": bool(norm_pix_loss),
    }
    return {HF_MAE_TYPE: mae, HF_VIT_TYPE: common}


def hf_weights_file(folder: Path) -> Path | None:
    """A transformers folder's weights: model.safetensors, else pytorch_model.bin; None when it holds neither."""
    return next((folder / n for n in (HF_WEIGHTS, HF_PICKLED_WEIGHTS) if (folder / n).is_file()), None)


def has_hf_names(keys: Iterable[str]) -> bool:
    """Weights named as transformers names a ViT (ViTMAE or ViT, any prefix), not as timm or the MAE reference."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys)


def read_hf_config(path: Path) -> dict[str, Any]:
    return json.loads((path / HF_CONFIG).read_text())
