"""Where a MAE's weights start: `model.init` (one of our run or checkpoint folders, an official MAE `.pth`, or a
transformers ViTMAE folder) and the official `.pth` files themselves. Only weights come in, strictly, and the fixed
sin-cos position tables are checked and dropped (docs/design.md)."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from mae_et.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    RefusedFileError,
    require_pretraining,
    resolve_checkpoint,
    torch_load_plain,
)
from mae_et.errors import UserError
from mae_et.models.hf import (
    HF_CONFIG,
    HF_MAE_TYPE,
    HF_PICKLED_WEIGHTS,
    HF_VIT_TYPE,
    HF_WEIGHTS,
    hf_to_encoder,
    hf_to_mae,
    read_hf_config,
)
from mae_et.models.keys import compare_state, fmt_shape, is_decoder_key
from mae_et.models.mae import MaskedAutoencoderViT, get_2d_sincos_pos_embed

# ----------------------------------------------------------------------------- the official .pth files


FIXED_POS_KEYS = ("pos_embed", "decoder_pos_embed")
_NO_DECODER_MSG = (
    "this checkpoint has no decoder (encoder-only release); "
    "use the mae_visualize_* checkpoints or pass encoder_only=True"
)


_REFUSED_OFFICIAL_FIX = (
    "the official release files hold only tensors, numbers and an argparse.Namespace; "
    "re-download it, or re-save its state_dict as .safetensors or a plain tensor dict"
)


def _as_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, (str, os.PathLike)):
        # weights_only: nothing in a downloaded file may run; official training files also pickle their Namespace
        try:
            checkpoint = torch_load_plain(
                checkpoint, "cpu", fix=_REFUSED_OFFICIAL_FIX, allowed_globals=(argparse.Namespace,)
            )
        except RefusedFileError as e:
            raise ValueError(str(e)) from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    # Official .pth files wrap the weights as {"model": sd, ...}; accept a bare sd too.
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    return dict(checkpoint)


def check_fixed_pos_embed(name: str, value: torch.Tensor) -> None:
    """The stored table must be the reference sin-cos for its own grid; anything else is rejected."""
    if value.ndim != 3 or value.shape[0] != 1:
        raise ValueError(f"{name}: expected shape (1, 1+L, D), got {fmt_shape(value.shape)}")
    num_patches, dim = value.shape[1] - 1, value.shape[2]
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(f"{name}: {num_patches} patches do not form a square grid")
    expected = get_2d_sincos_pos_embed(dim, g, cls_token=True).unsqueeze(0)  # (1, 1+L, D)
    if not torch.allclose(value.detach().float().cpu(), expected, atol=1e-5, rtol=0.0):
        raise ValueError(
            f"{name} in the checkpoint is not the fixed 2-D sin-cos table for a {g}x{g} grid; "
            "this model only supports fixed sin-cos position embeddings"
        )


def load_official_mae_checkpoint(
    model: MaskedAutoencoderViT,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    encoder_only: bool = False,
) -> None:
    """Load a facebookresearch/mae checkpoint (path, {"model": sd} or bare sd) with strict checks.

    ``pos_embed``/``decoder_pos_embed`` are verified against our sin-cos and dropped. Any key or
    shape mismatch raises a ValueError listing all of them, so a partial load never goes unnoticed.
    With ``encoder_only=True`` only the encoder is loaded (strictly) and the decoder is left as is.
    A file is read with ``weights_only=True``: one holding Python objects other than tensors, plain
    data and an ``argparse.Namespace`` is refused with a one-line ValueError, and nothing in it runs.
    """
    sd = _as_state_dict(checkpoint)
    for name in FIXED_POS_KEYS:
        if name in sd:
            check_fixed_pos_embed(name, sd.pop(name))

    model_sd = model.state_dict()
    if encoder_only:
        sd = {k: v for k, v in sd.items() if not is_decoder_key(k)}
        model_sd = {k: v for k, v in model_sd.items() if not is_decoder_key(k)}

    mismatch = compare_state(sd, model_sd)
    if mismatch:
        lines = ["checkpoint does not match the model:"]
        if not encoder_only and not any(is_decoder_key(k) for k in sd):
            lines.insert(0, _NO_DECODER_MSG)
            # The decoder keys are missing by construction; summarise them, list the rest.
            lines.append(f"missing decoder keys: all {sum(is_decoder_key(k) for k in mismatch.missing)} of them")
            mismatch.missing = [k for k in mismatch.missing if not is_decoder_key(k)]
        raise ValueError("\n".join(lines + mismatch.lines()))

    model.load_state_dict(sd, strict=not encoder_only)  # the comparison above left only decoder keys to skip


# ----------------------------------------------------------------------------- model.init


class StartPointError(UserError, ValueError):
    """A start point that cannot be read or does not fit the run's model; one line."""


@dataclass
class StartPoint:
    source: str  # as given
    kind: str  # "mae_et" (our run or checkpoint), "official" (a facebookresearch/mae .pth), "hf" (transformers)
    weights_file: Path  # the file read
    sha256: str  # of that file's bytes: which weights a run started from, recorded in its config
    decoder: bool  # False: the start point held the encoder only and the decoder is the model's fresh one


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: Path) -> tuple[dict[str, Tensor], str, Path]:
    """(state dict in the reference MAE's names, kind, the weights file) of any start point."""
    if path.is_dir() and (path / HF_CONFIG).is_file() and not (path / CONFIG_FILE).is_file():
        weights = next((path / n for n in (HF_WEIGHTS, HF_PICKLED_WEIGHTS) if (path / n).is_file()), None)
        model_type = read_hf_config(path).get("model_type")
        if weights is None or model_type not in (HF_MAE_TYPE, HF_VIT_TYPE):
            raise StartPointError(
                f"model.init '{path}' is a transformers folder without ViTMAE / ViT weights (model_type "
                f"{model_type!r}, {HF_WEIGHTS} or {HF_PICKLED_WEIGHTS}); pass a ViTMAE folder such as "
                "facebook/vit-mae-base downloaded"
            )
        raw = load_file(str(weights)) if weights.suffix == ".safetensors" else _torch_file(weights)
        return (hf_to_mae(raw) if model_type == HF_MAE_TYPE else hf_to_encoder(raw)), "hf", weights
    if path.is_dir() or path.name == MODEL_FILE:
        folder = resolve_checkpoint(path)
        require_pretraining(folder, yaml.safe_load((folder / CONFIG_FILE).read_text()) or {})
        return load_file(str(folder / MODEL_FILE)), "mae_et", folder / MODEL_FILE
    raw = load_file(str(path)) if path.suffix == ".safetensors" else _torch_file(path)
    if isinstance(raw.get("model"), Mapping):  # the official files: {"model": state_dict, ...}
        raw = dict(raw["model"])
    return raw, "official", path


def _torch_file(path: Path) -> dict[str, Tensor]:
    try:  # official training files also pickle their argparse.Namespace; nothing else is allowed, nothing runs
        obj = torch_load_plain(path, "cpu", fix="pass a file of tensors", allowed_globals=(argparse.Namespace,))
    except RefusedFileError as e:
        raise StartPointError(f"model.init: {e}") from None
    if not isinstance(obj, Mapping):
        raise StartPointError(f"model.init '{path}' holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def load_start_point(model: MaskedAutoencoderViT, source: str | Path) -> StartPoint:
    """Load the start point `source` into `model` (strict; a fresh decoder kept when it has none)."""
    path = Path(source)  # its existence is checked on load (mae_et.train.config)
    try:
        state, kind, weights = _read(path)
    except (CheckpointError, StartPointError):
        raise
    except KeyError as e:
        raise StartPointError(f"model.init '{path}' lacks the weight {e}; is it a whole MAE?") from None
    except Exception as e:  # noqa: BLE001 - unreadable or foreign files all mean "not a start point"
        raise StartPointError(f"model.init '{path}' cannot be read as weights ({type(e).__name__}: {e})") from None
    for name in FIXED_POS_KEYS:  # generated for the run's own grid: checked to be the fixed table, then dropped
        if name in state:
            try:
                check_fixed_pos_embed(name, state.pop(name))
            except ValueError as e:
                raise StartPointError(f"model.init '{path}': {e}") from None
    decoder = any(is_decoder_key(k) for k in state)
    wanted = {k: v for k, v in model.state_dict().items() if decoder or not is_decoder_key(k)}
    mismatch = compare_state(state, wanted)
    if mismatch:
        raise StartPointError(
            f"model.init '{path}' does not fit this run's model ({mismatch.summary(shown=2)}); pass weights of the "
            "same model size, patch and decoder, or set model.size / model.patch_size / the decoder keys to the "
            "start point's"
        )
    model.load_state_dict(state, strict=decoder)
    return StartPoint(str(source), kind, weights, sha256_of(weights), decoder)
