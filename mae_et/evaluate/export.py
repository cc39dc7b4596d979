"""Export a pretrained encoder as a timm ViT state dict (safetensors).

    python -m mae_et.evaluate.export RUN_OR_CHECKPOINT out.safetensors [--overwrite]

The output is checked before anything is read: never the input file, never inside a run's checkpoints
(`RUN/checkpoints/`, a `step_*` folder: replacing a checkpoint's weights with the encoder alone would
break its resume), an existing file only with `--overwrite`; it is written atomically.

The file holds the encoder only (timm names, no head, contiguous tensors) and the spec
(size, patch size, training size) in its safetensors metadata; the command prints the line that
loads it with timm.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mae_et.files import FileError, check_output_file, save_safetensors, write_atomic
from mae_et.models.mae import MODEL_SIZES
from mae_et.models.vit import (
    META_IMG,
    META_PATCH,
    META_SIZE,
    EncoderSpec,
    LoadError,
    _check_against_model,
    build_vit,
    infer_spec,
    load_encoder_state,
    timm_model_name,
)

__all__ = ["export_encoder", "timm_load_line", "main"]


def timm_load_line(spec: EncoderSpec, file: str | Path) -> str:
    """The Python line that builds a timm ViT from an exported file."""
    file = str(file)
    name = timm_model_name(spec)
    if name is not None:
        # The registry names say 224; another training size is passed so pos_embed matches exactly
        # (timm would otherwise resample it silently).
        img = "" if spec.img_size == 224 else f", img_size={spec.img_size}"
        return (
            f'timm.create_model("{name}", pretrained=True{img}, '
            f'pretrained_cfg_overlay=dict(file="{file}", num_classes=0))'
        )
    dims = MODEL_SIZES[spec.size]
    return (
        f"model = timm.models.vision_transformer.VisionTransformer(img_size={spec.img_size}, "
        f"patch_size={spec.patch_size}, embed_dim={dims['embed_dim']}, depth={dims['depth']}, "
        f"num_heads={dims['num_heads']}, num_classes=0); "
        f'model.load_state_dict(safetensors.torch.load_file("{file}"))'
    )


def export_encoder(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write the encoder of checkpoint ``src`` to ``dst`` (.safetensors); returns ``dst``.

    Raises `FileError` (before reading ``src``) when ``dst`` may not be written: see the module docstring."""
    src = Path(src)
    dst = check_output_file(
        dst, reads=[src] if src.is_file() else [], overwrite=overwrite, flag="output", suffix=".safetensors"
    )
    state, spec, kind = load_encoder_state(src)
    spec = spec or infer_spec(state)
    # Prove the file will load strictly into the timm model we advertise before writing it.
    # (num_classes=0, token pool: no head, no fc_norm, so the check is an exact key/shape match.)
    _check_against_model(state, build_vit(spec, num_classes=0), str(src))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}  # safetensors needs contiguous
    metadata = {
        "format": "pt",
        META_SIZE: spec.size,
        META_PATCH: str(spec.patch_size),
        META_IMG: str(spec.img_size),
        "mae_et.source": kind,
    }
    # a killed export never leaves a half-written file under the real name
    write_atomic(dst, lambda tmp: save_safetensors(tensors, tmp, metadata=metadata))
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mae_et.evaluate.export",
        description="Export a pretrained encoder (run folder, checkpoint folder, MAE .pth) as a timm ViT .safetensors",
    )
    parser.add_argument(
        "src", help="run folder (latest checkpoint), checkpoint folder, official MAE .pth or timm state dict"
    )
    parser.add_argument("dst", help="output .safetensors file (not inside a run's checkpoints/)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst when it exists")
    args = parser.parse_args(argv)
    try:
        out = export_encoder(args.src, args.dst, overwrite=args.overwrite)
        state_spec = load_encoder_state(out)[1]
    except (LoadError, FileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    assert state_spec is not None  # written by export_encoder just above
    print(f"wrote {out} ({state_spec.size} ViT, patch {state_spec.patch_size}, {state_spec.img_size} px)")
    print("load it with timm:")
    print("    import timm" + (", safetensors.torch" if timm_model_name(state_spec) is None else ""))
    print(f"    {timm_load_line(state_spec, out.resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
