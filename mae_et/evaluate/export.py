"""Export a pretrained encoder as a timm ViT state dict (safetensors), or a run's whole MAE as a Hugging Face folder.

    mae-et export RUN_OR_CHECKPOINT out.safetensors [--overwrite]
    mae-et export RUN_OR_CHECKPOINT OUT_FOLDER --format hf [--overwrite]

The timm file holds the encoder (no head) and its spec in the safetensors metadata; the hf folder holds the MAE, the
encoder alone in OUT/encoder/ and a model card. The output is checked before anything is read and written
atomically. docs/design.md, "Export".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from mae_et import checkpoint as ckpt_lib
from mae_et.cli import OneLineParser, run_user_command
from mae_et.evaluate.model_card import last_knn, model_card
from mae_et.evaluate.visualize import load_mae
from mae_et.files import (
    FileError,
    check_output_file,
    check_output_folder,
    one_line_on_full_disk,
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
    build_vit,
    check_against_model,
    infer_spec,
    load_encoder_state,
    timm_model_name,
)
from mae_et.run.tracking import METRICS_FILE

CARD_FILE = "README.md"  # the Hub shows a model through it

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
    """Write the encoder of checkpoint ``src`` to ``dst`` (.safetensors); returns ``dst``. A ``dst`` that may not
    be written is a `FileError` before ``src`` is read."""
    src = Path(src)
    dst = check_output_file(dst, reads=[src], overwrite=overwrite, flag="output", suffix=".safetensors")
    state, spec, kind = load_encoder_state(src)
    spec = spec or infer_spec(state)
    # Prove the file will load strictly into the timm model we advertise before writing it.
    # (num_classes=0, token pool: no head, no fc_norm, so the check is an exact key/shape match.)
    check_against_model(state, build_vit(spec, num_classes=0), str(src))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}  # safetensors needs contiguous
    metadata = {
        "format": "pt",
        META_SIZE: spec.size,
        META_PATCH: str(spec.patch_size),
        META_IMG: str(spec.img_size),
        "mae_et.source": kind,
    }
    # a killed export never leaves a half-written file under the real name
    with one_line_on_full_disk(dst, sum(t.numel() * t.element_size() for t in tensors.values())):
        write_atomic(dst, lambda tmp: save_safetensors(tensors, tmp, metadata=metadata))
    return dst


def export_hf(src: str | Path, dst: str | Path, overwrite: bool = False, results: Sequence[str | Path] = ()) -> Path:
    """Write run or checkpoint folder ``src`` as a transformers folder ``dst`` (MAE + encoder/, and the model card
    README.md, which also reports the fine-tune / probe `results` named); returns ``dst``."""
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
    configs = hf_configs(
        spec.size, spec.patch_size, spec.img_size, decoder, cfg.model.norm_pix_loss, cfg.model.mask_ratio
    )
    encoder_state = {k[len("vit.") :]: v for k, v in mae_state.items() if k.startswith("vit.")}
    folders = [
        (dst / "encoder", encoder_state, {"architectures": ["ViTModel"], "model_type": HF_VIT_TYPE}),
        (dst, mae_state, {"architectures": ["ViTMAEForPreTraining"], "model_type": HF_MAE_TYPE}),
    ]
    card = card_of(src, cfg, results)
    with one_line_on_full_disk(dst, 2 * sum(t.numel() * t.element_size() for t in mae_state.values())):
        _write_folders(
            [(folder, state, {**head, **configs[head["model_type"]]}) for folder, state, head in folders], card
        )
    return dst


def card_of(src: Path, cfg, results: Sequence[str | Path]) -> str:
    """The model card of the checkpoint `src` resolves to: its meta.json, its run's metrics.jsonl (the kNN monitor
    up to that step), and the result.json files named."""
    folder = ckpt_lib.resolve_checkpoint(src)
    meta = json.loads((folder / ckpt_lib.META_FILE).read_text())
    knn = last_knn(folder.parent.parent / METRICS_FILE, int(meta["step"]))
    named = []
    for path in map(Path, results):
        try:
            r = json.loads(path.read_text())
            named.append((path, {k: r[k] for k in ("task", "top1", "top5", "epochs", "best")}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FileError(
                f"--results '{path}' is not a fine-tune or probe result.json ({type(e).__name__}: {e}); pass the "
                "RUN/result.json a finished fine-tune or probe wrote"
            ) from None
    return model_card(cfg, meta, knn, named)


def _write_folders(folders: list[tuple[Path, dict, dict]], card: str) -> None:
    """Each (folder, weights, config): the weights, then config.json (last: the folder is whole); the first folder
    (the MAE's) also gets the model card, README.md. A failure removes what this call wrote, so that no folder is
    left half of this export and half of an earlier one."""
    created = sorted((f for f, _, _ in folders if not f.exists()), key=lambda f: len(f.parts), reverse=True)
    written: list[Path] = []
    try:
        for folder, state, config in folders:
            folder.mkdir(parents=True, exist_ok=True)
            written.append(
                write_atomic(folder / HF_WEIGHTS, partial(save_safetensors, state, metadata={"format": "pt"}))
            )
            written.append(write_text_atomic(folder / HF_CONFIG, json.dumps(config, indent=2) + "\n"))
        written.append(write_text_atomic(folders[-1][0] / CARD_FILE, card))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in created:  # the deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def run_export(args: argparse.Namespace) -> None:
    if args.format == "hf":
        out = export_hf(args.src, args.dst, overwrite=args.overwrite, results=args.results)
        print(f"wrote {out} (ViTMAEForPreTraining, its model card README.md) and {out / 'encoder'} (ViTModel)")
        print("load them with transformers:")
        print(f'    ViTMAEForPreTraining.from_pretrained("{out.resolve()}")')
        print(f'    ViTModel.from_pretrained("{(out / "encoder").resolve()}", add_pooling_layer=False)')
        return
    out = export_encoder(args.src, args.dst, overwrite=args.overwrite)
    state_spec = load_encoder_state(out)[1]  # the spec export_encoder wrote into the file
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
    parser.add_argument(
        "--results",
        nargs="+",
        default=[],
        metavar="RESULT_JSON",
        help="with --format hf: fine-tune / probe RUN/result.json files whose figures the model card reports",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace dst when it exists")
    args = parser.parse_args(argv)
    # OSError: a dst folder that cannot be written is the user's to fix, not a bug
    run_user_command(lambda: run_export(args), also=(OSError,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
