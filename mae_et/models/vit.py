"""The one encoder type of every downstream use (fine-tune, linear probe, kNN, export): timm's ViT, built from a spec,
and any supported checkpoint (our runs, official MAE .pth, timm weights, transformers folders) loaded into it
strictly, so a wrong file never gives a silently half-initialised encoder (docs/design.md)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import LayerNorm, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from mae_et.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    RefusedFileError,
    check_readable,
    is_run_folder,
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
    has_hf_names,
    hf_to_encoder,
    hf_weights_file,
    read_hf_config,
)
from mae_et.models.keys import compare_state, fmt_shape, is_decoder_key
from mae_et.models.mae import MODEL_SIZES, get_2d_sincos_pos_embed

__all__ = [
    "EncoderSpec",
    "LoadError",
    "build_vit",
    "check_against_model",
    "encoder_features",
    "infer_spec",
    "load_encoder_state",
    "load_pretrained_vit",
    "mae_to_timm_state_dict",
    "pool_tokens",
    "timm_model_name",
]

# the classifier's input: avg (mean of the patch tokens + fc_norm, MAE fine-tuning) | token (cls after the final norm)
GlobalPool = Literal["avg", "token"]
FeaturePool = Literal["cls", "mean"]  # encoder_features: the cls token | the mean of the patch tokens (probe, kNN)

# safetensors metadata keys written by mae_et.evaluate.export (values are strings, as safetensors requires).
META_SIZE = "mae_et.size"
META_PATCH = "mae_et.patch_size"
META_IMG = "mae_et.img_size"

# (size, patch) -> the timm architecture with exactly our MODEL_SIZES dims (checked in the tests).
_TIMM_NAMES: dict[tuple[str, int], str] = {
    ("tiny", 16): "vit_tiny_patch16_224",
    ("small", 16): "vit_small_patch16_224",
    ("small", 8): "vit_small_patch8_224",
    ("base", 16): "vit_base_patch16_224",
    ("base", 8): "vit_base_patch8_224",
    ("large", 16): "vit_large_patch16_224",
    ("huge", 14): "vit_huge_patch14_224",
}

# Wrappers that training frameworks put in front of parameter names (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class LoadError(UserError, ValueError):
    """A checkpoint that cannot be loaded into the requested ViT; the message names keys and shapes."""


@dataclass(frozen=True)
class EncoderSpec:
    """What is needed to rebuild the encoder."""

    size: str  # a key of mae_et.models.mae.MODEL_SIZES
    patch_size: int
    img_size: int  # the size it was trained at (pos-embed grid side = img_size // patch_size)


# ----------------------------------------------------------------------------- building


def _check_spec(spec: EncoderSpec) -> None:
    if spec.size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {spec.size!r}; choose one of {', '.join(MODEL_SIZES)}")
    if spec.patch_size < 1 or spec.img_size % spec.patch_size != 0:
        raise ValueError(
            f"img_size {spec.img_size} is not a multiple of patch_size {spec.patch_size}; "
            f"use e.g. {max(1, round(spec.img_size / max(spec.patch_size, 1))) * spec.patch_size}"
        )


def build_vit(
    spec: EncoderSpec,
    num_classes: int = 0,
    img_size: int | None = None,
    global_pool: GlobalPool = "token",
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """A randomly initialised timm ViT with the encoder of ``spec`` (``num_classes=0``: no head). Any input side
    that is a multiple of the patch goes through (``dynamic_img_size``: timm resamples ``pos_embed``)."""
    size = spec.img_size if img_size is None else int(img_size)
    _check_spec(EncoderSpec(spec.size, spec.patch_size, size))
    dims = MODEL_SIZES[spec.size]
    return VisionTransformer(
        img_size=size,
        patch_size=spec.patch_size,
        num_classes=num_classes,
        global_pool=global_pool,
        embed_dim=dims["embed_dim"],
        depth=dims["depth"],
        num_heads=dims["num_heads"],
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=True,
        # timm's default is already eps 1e-6; explicit so that a changed default cannot drift from MAE.
        norm_layer=partial(LayerNorm, eps=1e-6),
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
    )


def timm_model_name(spec: EncoderSpec) -> str | None:
    """The timm registry name of this architecture ("vit_base_patch16_224"), or None when timm has none (the
    name fixes the architecture only: another training size loads with ``img_size=spec.img_size``)."""
    return _TIMM_NAMES.get((spec.size, spec.patch_size))


# ----------------------------------------------------------------------------- state-dict conversion


def mae_to_timm_state_dict(mae_state: Mapping[str, Tensor], spec: EncoderSpec | None) -> dict[str, Tensor]:
    """Our / official MAE names -> timm ViT encoder names: the decoder and ``mask_token`` dropped, the fixed sin-cos
    ``pos_embed`` generated for ``spec`` when the file stores none (ours); ``spec`` may be None only otherwise."""
    out = {k: v for k, v in mae_state.items() if not is_decoder_key(k)}
    if "pos_embed" not in out:
        if spec is None:
            raise LoadError(
                "this MAE state dict has no pos_embed and its training size is unknown; "
                "load its checkpoint folder (with config.yaml) instead of the bare weights"
            )
        _check_spec(spec)
        if "patch_embed.proj.weight" not in out:
            raise LoadError("this state dict holds no ViT encoder (no patch_embed.proj.weight)")
        dim = MODEL_SIZES[spec.size]["embed_dim"]
        grid = spec.img_size // spec.patch_size
        # Match dtype of the weights so a bf16 checkpoint stays homogeneous.
        table = get_2d_sincos_pos_embed(dim, grid, cls_token=True).unsqueeze(0)  # (1, 1+L, D)
        out["pos_embed"] = table.to(out["patch_embed.proj.weight"].dtype)
    return out


def infer_spec(state: Mapping[str, Tensor]) -> EncoderSpec:
    """Spec from the shapes of a timm-named encoder state dict (the embed dim names the size: a block more or less
    than that size has is then named, as extra or missing, by the key comparison)."""
    w = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if w is None or w.ndim != 4 or pos is None or pos.ndim != 3:
        raise LoadError(
            "cannot infer the encoder architecture: patch_embed.proj.weight (D, C, p, p) and "
            "pos_embed (1, 1+L, D) are needed; pass spec=EncoderSpec(size, patch_size, img_size)"
        )
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    matches = [name for name, d in MODEL_SIZES.items() if d["embed_dim"] == dim]
    if not matches:
        known = ", ".join(f"{n}: {d['embed_dim']}x{d['depth']}" for n, d in MODEL_SIZES.items())
        raise LoadError(
            f"embed dim {dim} and depth {depth} match no model size (width x depth: {known}); "
            "pass spec=EncoderSpec(size, patch_size, img_size) if the checkpoint is of a known size"
        )
    num_patches = int(pos.shape[1]) - 1  # minus the cls token
    grid = math.isqrt(max(num_patches, 0))
    if grid * grid != num_patches:
        raise LoadError(f"pos_embed {fmt_shape(pos.shape)} does not hold 1 cls + a square grid of patches")
    return EncoderSpec(size=matches[0], patch_size=patch, img_size=grid * patch)


# ----------------------------------------------------------------------------- reading checkpoints


def _check_readable(*paths: Path) -> None:
    """A file this user may not read is said so (`check_readable`), not called broken and to be deleted."""
    try:
        check_readable(*paths)
    except CheckpointError as e:
        raise LoadError(str(e)) from None


def _unreadable(path: Path, e: BaseException, fix: str) -> LoadError:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return LoadError(f"checkpoint '{path}' is unreadable ({type(e).__name__}: {first_line}); {fix}")


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _load_mae_et_checkpoint(ckpt_dir: Path) -> tuple[dict[str, Tensor], EncoderSpec]:
    model_file = ckpt_dir / MODEL_FILE
    _check_readable(model_file, ckpt_dir / CONFIG_FILE)
    try:
        state = load_file(str(model_file), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors/OS errors all mean "this file is broken"
        raise _unreadable(
            model_file, e, "delete that checkpoint folder to use an earlier one, or pass another checkpoint"
        ) from None
    config_file = ckpt_dir / CONFIG_FILE
    try:
        cfg = yaml.safe_load(config_file.read_text())
        require_pretraining(ckpt_dir, cfg)
        spec = EncoderSpec(
            size=str(cfg["model"]["size"]),
            patch_size=int(cfg["model"]["patch_size"]),
            img_size=int(cfg["data"]["crop_size"]),
        )
    except CheckpointError as e:
        raise LoadError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - missing file, bad YAML, missing keys: one answer
        raise LoadError(
            f"'{config_file}' does not give model.size, model.patch_size and data.crop_size "
            f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); "  # YAML errors run over several lines
            "the checkpoint folder needs the config.yaml it was saved with"
        ) from None
    try:
        _check_spec(spec)
    except ValueError as e:
        raise LoadError(f"'{config_file}': {e}") from None
    return mae_to_timm_state_dict(_strip_wrappers(state), spec), spec


_REFUSED_PICKLE_FIX = (
    "model weights need only tensors (official MAE files add an argparse.Namespace); "
    "re-save its state_dict as .safetensors or a plain tensor dict"
)


def _read_weights_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(state or wrapper dict, safetensors metadata) of a .safetensors or a torch pickle."""
    _check_readable(path)
    fix = "re-download or re-export it"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # noqa: BLE001
            raise _unreadable(path, e, fix) from None
    try:
        # weights_only: never run pickled code from a downloaded file. Official MAE training
        # checkpoints also carry their argparse.Namespace, which is allowed explicitly.
        obj = torch_load_plain(path, "cpu", fix=_REFUSED_PICKLE_FIX, allowed_globals=(argparse.Namespace,))
    except RefusedFileError as e:
        raise LoadError(str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e, fix) from None
    if not isinstance(obj, Mapping):
        raise LoadError(
            f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict; pass a file saved from "
            "model.state_dict()"
        )
    return dict(obj), {}


def _is_hf_folder(folder: Path) -> bool:
    """A transformers folder, or one that lost its config.json: none of our config.yaml or checkpoints/, and
    transformers' weights (with config.json, a pytorch_model.bin, which we never write, or transformers' names)."""
    if not folder.is_dir() or (folder / CONFIG_FILE).is_file() or is_run_folder(folder):
        return False
    weights = hf_weights_file(folder)
    if weights is None:
        return False
    if (folder / HF_CONFIG).is_file() or weights.name == HF_PICKLED_WEIGHTS:
        return True
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            return has_hf_names(f.keys())
    except Exception:  # noqa: BLE001 - an unreadable file: our loader names it
        return False


def _load_hf_folder(folder: Path) -> tuple[dict[str, Tensor], EncoderSpec]:
    """A transformers ViTMAE or ViT folder (config.json + model.safetensors or pytorch_model.bin) -> timm-named
    encoder and its spec."""
    weights = hf_weights_file(folder)
    if not (folder / HF_CONFIG).is_file():
        raise LoadError(
            f"'{folder}' holds transformers weights ({weights.name}) but no config.json; copy the config.json saved "
            "with them beside them (it gives the model's size, patch and image size)"
        )
    try:
        config = read_hf_config(folder)
        model_type = config["model_type"]
        dims = (int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"]))
        patch, img = int(config["patch_size"]), int(config["image_size"])
    except Exception as e:  # noqa: BLE001 - unreadable JSON, missing keys: one answer
        raise LoadError(f"'{folder / HF_CONFIG}' is not a transformers ViT config ({type(e).__name__}: {e})") from None
    if model_type not in (HF_MAE_TYPE, HF_VIT_TYPE):
        raise LoadError(f"'{folder}' holds a transformers '{model_type}' model; pass a ViTMAE or ViT folder")
    sizes = [n for n, d in MODEL_SIZES.items() if (d["embed_dim"], d["depth"], d["num_heads"]) == dims]
    if not sizes or int(config.get("intermediate_size", 4 * dims[0])) != 4 * dims[0]:
        raise LoadError(f"'{folder}': a ViT of width {dims[0]}, depth {dims[1]}, {dims[2]} heads is none of our sizes")
    raw, _ = _read_weights_file(weights)
    try:
        state = hf_to_encoder(raw)
    except KeyError as e:
        raise LoadError(f"'{weights}' lacks the ViT weight {e}; is it a whole ViTMAE / ViT folder?") from None
    except ValueError as e:
        width = dims[0]
        raise LoadError(
            f"'{weights}': {e}; a ViT of width {width} has ({width}, {width}) weights and ({width},) biases there"
        ) from None
    return state, EncoderSpec(sizes[0], patch, img)


def load_encoder_state(path: str | Path) -> tuple[dict[str, Tensor], EncoderSpec | None, str]:
    """Any supported checkpoint -> (timm-named encoder state dict without head, spec when known, kind: "mae_et",
    "official", "hf" or "timm"). Every failure is a one-line ``LoadError``."""
    path = Path(path)
    if not path.exists():
        raise LoadError(
            f"checkpoint '{path}' does not exist; pass a run folder, a checkpoint folder (step_*), "
            "an official MAE .pth, a timm .safetensors/.pth or a transformers ViTMAE / ViT folder"
        )
    if _is_hf_folder(path):
        state, spec = _load_hf_folder(path)
        kind = "hf"
    elif path.is_dir() or (
        path.name == MODEL_FILE and (path.parent / CONFIG_FILE).is_file() and not is_run_folder(path.parent)
    ):
        try:
            ckpt_dir = resolve_checkpoint(path)
        except CheckpointError as e:
            raise LoadError(str(e)) from None
        state, spec = _load_mae_et_checkpoint(ckpt_dir)
        kind = "mae_et"
    else:
        raw, meta = _read_weights_file(path)
        wrapped = isinstance(raw.get("model"), Mapping)
        # Official files wrap the weights as {"model": sd, ...}; other trainers use "state_dict".
        if wrapped:
            raw = dict(raw["model"])
        elif isinstance(raw.get("state_dict"), Mapping):
            raw = dict(raw["state_dict"])
        raw = _strip_wrappers(raw)
        not_tensors = sorted(k for k, v in raw.items() if not isinstance(v, Tensor))
        if not_tensors:
            raise LoadError(
                f"checkpoint '{path}' is not a plain state dict (non-tensor entries: {', '.join(not_tensors[:8])}); "
                "pass a file of model weights"
            )
        spec = None
        if META_SIZE in meta:  # our own export
            try:
                spec = EncoderSpec(meta[META_SIZE], int(meta[META_PATCH]), int(meta[META_IMG]))
            except (KeyError, ValueError) as e:
                raise LoadError(f"checkpoint '{path}' has broken mae_et metadata ({e}); re-export it") from None
        kind = "official" if wrapped or any(is_decoder_key(k) for k in raw) else "timm"
        try:
            state = mae_to_timm_state_dict(raw, spec) if kind == "official" else raw
        except LoadError as e:
            raise LoadError(f"checkpoint '{path}': {e}") from None
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "patch_embed.proj.weight" not in state:
        sample = ", ".join(sorted(state)[:6]) or "none"
        raise LoadError(
            f"checkpoint '{path}' holds no ViT encoder (no patch_embed.proj.weight; keys start with: {sample}); "
            "pass a pretraining run, an MAE .pth or a timm ViT state dict"
        )
    return state, spec, kind


# ----------------------------------------------------------------------------- loading into a timm ViT


def _grid_of(pos_embed: Tensor) -> int | None:
    """Grid side of a (1, 1+g*g, D) table, None when it is not one."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        return None
    g = math.isqrt(max(int(pos_embed.shape[1]) - 1, 0))
    return g if g * g == pos_embed.shape[1] - 1 else None


def check_against_model(state: Mapping[str, Tensor], model: VisionTransformer, where: str) -> None:
    """Raise LoadError unless every encoder key matches; only new-head keys may be missing."""
    model_state = model.state_dict()
    may_be_missing = {k for k in model_state if k.startswith("head.") or k.startswith("fc_norm.")}
    # With global_pool="avg" timm swaps the final norm for fc_norm (MAE fine-tune recipe): the
    # pretrained norm.* has no place in the model and is dropped, as the reference does.
    may_be_unexpected = {"norm.weight", "norm.bias"} if isinstance(model.norm, nn.Identity) else set()
    mismatch = compare_state(state, model_state, may_be_missing, may_be_unexpected)
    if mismatch:
        raise LoadError(
            f"checkpoint '{where}' does not match the ViT it is loaded into ({'; '.join(mismatch.lines())}); "
            "pass the matching spec=EncoderSpec(size, patch_size, img_size) or the right checkpoint"
        )


def load_pretrained_vit(
    path: str | Path,
    num_classes: int = 0,
    img_size: int | None = None,
    global_pool: GlobalPool = "token",
    drop_path_rate: float = 0.0,
    spec: EncoderSpec | None = None,
) -> tuple[VisionTransformer, EncoderSpec]:
    """A timm ViT with the checkpoint's encoder loaded strictly (only the new head and ``fc_norm`` may be missing;
    another ``img_size`` resamples ``pos_embed``), and the CHECKPOINT's spec (the size it was pretrained at)."""
    state, found_spec, _ = load_encoder_state(path)
    spec = spec or found_spec or infer_spec(state)
    try:
        model = build_vit(
            spec, num_classes=num_classes, img_size=img_size, global_pool=global_pool, drop_path_rate=drop_path_rate
        )
    except ValueError as e:
        raise LoadError(f"cannot build the ViT for '{path}': {e}") from None

    pos = state.get("pos_embed")
    target = model.pos_embed  # (1, 1+G*G, D)
    if pos is not None and tuple(pos.shape) != tuple(target.shape):
        old_grid, new_grid = _grid_of(pos), _grid_of(target)
        # Only the token count may differ; another width is a real mismatch reported below.
        if old_grid is not None and new_grid is not None and pos.shape[2] == target.shape[2]:
            state = dict(state)
            state["pos_embed"] = resample_abs_pos_embed(
                pos.float(), new_size=[new_grid, new_grid], old_size=[old_grid, old_grid], num_prefix_tokens=1
            ).to(pos.dtype)  # (1, 1+G*G, D)

    check_against_model(state, model, str(path))
    if isinstance(model.norm, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    model.load_state_dict(state, strict=False)  # the comparison above left only the new head to skip
    return model, spec


def pool_tokens(model: nn.Module, tokens: Tensor, pool: FeaturePool = "cls") -> Tensor:
    """(N, 1+L, D) tokens of ``model.forward_features`` -> (N, D) features, as ``encoder_features`` (apart, so that
    one encoder pass can be pooled several ways)."""
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))  # our MAE has the cls token only
    if pool == "cls":
        feats = tokens[:, 0]  # (N, D)
    else:
        feats = tokens[:, num_prefix:].mean(dim=1)  # (N, D)
    if isinstance(model, VisionTransformer) and isinstance(model.norm, nn.Identity):
        feats = model.fc_norm(feats)  # (N, D)
    return feats


def encoder_features(model: nn.Module, images: Tensor, pool: FeaturePool = "cls") -> Tensor:
    """Unmasked, normalised encoder features (N, D) of a timm ViT or our MAE: the cls token or the mean of the patch
    tokens (a timm ViT with ``global_pool="avg"`` normalises with its ``fc_norm`` after pooling)."""
    tokens = model.forward_features(images)  # (N, 1+L, D)
    return pool_tokens(model, tokens, pool)  # (N, D)
