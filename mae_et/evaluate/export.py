"""Export a pretrained encoder as a timm ViT state dict (safetensors), or a run's whole MAE as a Hugging Face folder.

    mae-et export RUN_OR_CHECKPOINT out.safetensors [--overwrite]
    mae-et export RUN_OR_CHECKPOINT OUT_FOLDER --format hf [--overwrite]

(`python -m mae_et.evaluate.export ...` is the same command.)
The output is checked before anything is read: never the input file, never inside a run's checkpoints
(`RUN/checkpoints/`, a `step_*` folder: replacing a checkpoint's weights with the encoder alone would
break its resume), an existing file only with `--overwrite`; it is written atomically.

The file holds the encoder only (timm names, no head, contiguous tensors) and the spec
(size, patch size, training size) in its safetensors metadata; the command prints the line that
loads it with timm.

`--format hf` writes OUT_FOLDER as `transformers` reads it (`mae_et.models.hf`): the MAE with its decoder
(`ViTMAEForPreTraining.from_pretrained(OUT)`) and, in OUT/encoder/, the encoder alone
(`ViTModel.from_pretrained(OUT/encoder, add_pooling_layer=False)`: MAE trains no pooler), each with no missing or
unexpected key; `push_to_hub` from there shares it. Only our run or checkpoint folders carry the decoder's config;
official MAE weights are on the Hub already (facebook/vit-mae-*). The weights go in before each config.json, so a
killed export leaves no folder that loads half.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mae_et.cli import OneLineParser, run_user_command
from mae_et.evaluate.visualize import load_mae
from mae_et.files import (
    FileError,
    check_output_file,
    check_output_folder,
    save_safetensors,
    write_atomic,
    write_text_atomic,
)
from mae_et.models.hf import HF_CONFIG, HF_MAE_TYPE, HF_VIT_TYPE, HF_WEIGHTS, hf_configs, mae_to_hf
from mae_et.models.mae import MODEL_SIZES
from mae_et.models.vit import (
    META_IMG,
    META_PATCH,
    META_SIZE,
    EncoderSpec,
    _check_against_model,
    build_vit,
    infer_spec,
    load_encoder_state,
    timm_model_name,
)

__all__ = ["export_encoder", "export_hf", "timm_load_line", "main"]


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


def export_hf(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write run or checkpoint folder ``src`` as a transformers folder ``dst`` (MAE + encoder/); returns ``dst``."""
    src, dst = Path(src), Path(dst)
    check_output_folder(dst, reads=[src], flag="output")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileError(f"output '{dst}' is not empty; pass --overwrite to replace its files, or another folder")
    if not src.is_dir():
        raise FileError(
            f"--format hf exports one of our run or checkpoint folders (their config.yaml gives the decoder); '{src}' "
            "is a file (official MAE weights are on the Hub already: facebook/vit-mae-*)"
        )
    model, cfg = load_mae(src)
    if model.hog is not None:
        raise FileError(
            f"'{src}' was trained with model.target=hog, which transformers' ViTMAE cannot hold (it predicts pixels); "
            "export its encoder with the default format (timm .safetensors)"
        )
    spec = EncoderSpec(cfg.model.size, cfg.model.patch_size, cfg.data.crop_size)
    grid = spec.img_size // spec.patch_size
    mae_state = mae_to_hf(model.state_dict(), grid)
    decoder = {
        "embed_dim": cfg.model.decoder_embed_dim,
        "depth": cfg.model.decoder_depth,
        "num_heads": cfg.model.decoder_num_heads,
    }
    configs = hf_configs(spec.size, spec.patch_size, spec.img_size, decoder, cfg.model.norm_pix_loss)
    encoder_state = {k[len("vit.") :]: v for k, v in mae_state.items() if k.startswith("vit.")}
    for folder, state, model_type, architecture in (
        (dst / "encoder", encoder_state, HF_VIT_TYPE, "ViTModel"),
        (dst, mae_state, HF_MAE_TYPE, "ViTMAEForPreTraining"),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / HF_WEIGHTS, lambda tmp, s=state: save_safetensors(s, tmp, metadata={"format": "pt"}))
        config = {"architectures": [architecture], "model_type": model_type, **configs[model_type]}
        write_text_atomic(folder / HF_CONFIG, json.dumps(config, indent=2) + "\n")  # last: the folder is whole
    return dst


def run_export(args: argparse.Namespace) -> None:
    if args.format == "hf":
        out = export_hf(args.src, args.dst, overwrite=args.overwrite)
        print(f"wrote {out} (ViTMAEForPreTraining) and {out / 'encoder'} (ViTModel)")
        print("load them with transformers:")
        print(f'    ViTMAEForPreTraining.from_pretrained("{out.resolve()}")')
        print(f'    ViTModel.from_pretrained("{(out / "encoder").resolve()}", add_pooling_layer=False)')
        return
    out = export_encoder(args.src, args.dst, overwrite=args.overwrite)
    state_spec = load_encoder_state(out)[1]
    assert state_spec is not None  # written by export_encoder just above
    print(f"wrote {out} ({state_spec.size} ViT, patch {state_spec.patch_size}, {state_spec.img_size} px)")
    print("load it with timm:")
    print("    import timm" + (", safetensors.torch" if timm_model_name(state_spec) is None else ""))
    print(f"    {timm_load_line(state_spec, out.resolve())}")


def main(argv: Sequence[str] | None = None, prog: str = "python -m mae_et.evaluate.export") -> int:
    parser = OneLineParser(
        prog=prog,
        description="Export a pretrained encoder (run folder, checkpoint folder, MAE .pth) as a timm ViT .safetensors, "
        "or a run's MAE as a Hugging Face transformers folder",
    )
    parser.add_argument(
        "src", help="run folder (latest checkpoint), checkpoint folder, official MAE .pth or timm state dict"
    )
    parser.add_argument(
        "dst", help="output .safetensors file, or folder with --format hf (not inside a run's checkpoints/)"
    )
    parser.add_argument(
        "--format",
        choices=("timm", "hf"),
        default="timm",
        help="timm: the encoder as a timm ViT .safetensors (default); hf: a transformers folder (MAE + encoder/)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace dst when it exists")
    args = parser.parse_args(argv)
    # OSError: a dst folder that cannot be written is the user's to fix, not a bug
    run_user_command(lambda: run_export(args), also=(OSError,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
