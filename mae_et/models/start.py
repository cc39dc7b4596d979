"""Where a pretraining run's weights start (`model.init`): one of our run or checkpoint folders, an official MAE
`.pth` (the `_full` files carry the decoder), or a transformers ViTMAE folder (ours or the Hub's layout).

Only weights come in, strictly: every key and shape must be the model's (another size is refused in one line,
naming what differs), the fixed sin-cos position tables are checked and dropped (the run generates its own grid's),
and a start point without a decoder (an encoder-only `.pth`, a ViT folder) leaves the model's fresh decoder, which
the run says. Files are read as every weights file is, tensors only (`mae_et.checkpoint.torch_load_plain`)."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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
from mae_et.models.keys import compare_state, is_decoder_key
from mae_et.models.mae import FIXED_POS_KEYS, MaskedAutoencoderViT, check_fixed_pos_embed


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
    path = Path(source)
    if not path.exists():
        raise StartPointError(
            f"model.init '{path}' does not exist; pass a run or checkpoint folder, an official MAE .pth or a "
            "transformers ViTMAE folder"
        )
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
