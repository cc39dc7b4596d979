"""The model card (README.md, the Hub's form) `mae-et export --format hf` writes beside the weights: how the model
was trained and evaluated, every figure read from the run's own files, and the lines that load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mae_et.models.mae import MODEL_SIZES
from mae_et.train.config import PretrainConfig, curriculum_stages

TAGS = ["masked-autoencoder", "mae", "vision-transformer", "self-supervised-learning", "mae_et"]


def last_knn(metrics_file: Path, up_to_step: int) -> dict[str, float]:
    """The last kNN the run's monitor logged at or before the exported step (and the untrained encoder's beside
    it), from metrics.jsonl; {} when it logged none."""
    found: dict[str, float] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("step", up_to_step + 1) <= up_to_step and any(k.startswith("knn_top1_") for k in row):
                found = {k: v for k, v in row.items() if "knn_top1_" in k or k == "step"}
    return found


def dataset_name(cfg: PretrainConfig) -> str:
    """What the Hub's `datasets` field can say: the data folder's name (fractals when the run made its own)."""
    if cfg.data.root is None:
        return "fractal-ifs (generated on the fly)"
    root = Path(cfg.data.root)
    return root.name if root.name not in ("train", "") else root.parent.name


def front_matter(cfg: PretrainConfig) -> dict[str, Any]:
    tags = [*TAGS, f"curriculum-{cfg.curriculum.schedule}", f"target-{cfg.model.target}"]
    return {
        "library_name": "transformers",
        "pipeline_tag": "image-feature-extraction",
        "tags": tags,
        "datasets": [dataset_name(cfg)],
        "license": None,  # the user's to choose: the weights inherit the terms of the data they were trained on
    }


def training_lines(cfg: PretrainConfig, meta: dict[str, Any]) -> list[str]:
    m, c = cfg.model, cfg.curriculum
    dims = MODEL_SIZES[m.size]
    stages, budget = curriculum_stages(cfg)
    schedule = ", ".join(f"{s.size} px for {100 * s.fraction:.0f}%" for s in stages)
    steps, batch = int(meta["step"]), int(meta["global_batch"])
    of = "each stage's" if m.decode_fraction_of == "stage" else "the full crop's"
    share = f"{m.decode_fraction:g} of {of} patches"
    start = (
        [f"- Start: continued from `{Path(m.init).name}` (sha256 {m.init_sha256}), not a random initialisation."]
        if m.init
        else []
    )
    return [
        *start,
        f"- Model: MAE ViT-{m.size}/{m.patch_size} (width {dims['embed_dim']}, depth {dims['depth']}, "
        f"{dims['num_heads']} heads) at {cfg.data.crop_size} px; decoder {m.decoder_embed_dim} x {m.decoder_depth}.",
        f"- Objective: mask ratio {m.mask_ratio:g}, target {m.target}"
        + (" (per-patch normalised pixels)" if m.target == "pixel" and m.norm_pix_loss else "")
        + f", decoder reconstructing {share if m.decode_fraction < 1 else 'every masked patch'}.",
        f"- Curriculum: {c.schedule} ({c.mode}), budget in {budget}: {schedule}.",
        f"- Budget: {steps} optimizer steps of {meta['total_steps']} planned ({cfg.train.epochs:g} "
        f"{'full-size-epoch compute' if budget == 'compute' else 'epochs'}), {steps * batch:,} images seen "
        f"(global batch {batch}), seed {cfg.train.seed}.",
        f"- Optimizer: AdamW, blr {cfg.optim.blr:g}, weight decay {cfg.optim.weight_decay:g}, "
        f"{cfg.optim.warmup_epochs:g} warmup epochs, cosine.",
        f"- Data: `{dataset_name(cfg)}`"
        + (f" ({cfg.data.split}/ split)" if cfg.data.root is not None and cfg.data.split else "")
        + ".",
    ]


def evaluation_lines(knn: dict[str, float], results: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    lines = []
    if knn:
        pairs = [
            f"{pool} {knn[f'knn_top1_{pool}']:.1f}%"
            + (f" (untrained {knn[f'untrained_knn_top1_{pool}']:.1f}%)" if f"untrained_knn_top1_{pool}" in knn else "")
            for pool in ("cls", "mean")
            if f"knn_top1_{pool}" in knn
        ]
        lines.append(f"- kNN top-1 (k = 20, the run's monitor at step {knn['step']}): {', '.join(pairs)}.")
    for path, r in results:
        best = (r.get("best") or {}).get("top1")
        lines.append(
            f"- {r['task']}: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}% after {r['epochs']} epochs"
            + (f" (best epoch {best:.2f}%)" if best is not None else "")
            + f" (`{path.name}` of `{path.parent.name}`)."
        )
    return lines or ["- No evaluation in the run folder (its kNN monitor was off and no result.json was given)."]


def model_card(
    cfg: PretrainConfig, meta: dict[str, Any], knn: dict[str, float], results: list[tuple[Path, dict[str, Any]]]
) -> str:
    """README.md for the exported folder."""
    name = cfg.name
    body = [
        f"# {name}",
        "",
        "A masked autoencoder (MAE) pretrained with mae_et and the EfficientTrain "
        f"'{cfg.curriculum.schedule}' curriculum. This folder holds the whole MAE (encoder and decoder) as "
        "`ViTMAEForPreTraining`; `encoder/` holds the encoder alone as `ViTModel` (MAE trains no pooler).",
        "",
        "## Training",
        "",
        *training_lines(cfg, meta),
        "",
        "## Evaluation",
        "",
        *evaluation_lines(knn, results),
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import ViTMAEForPreTraining, ViTModel",
        f'mae = ViTMAEForPreTraining.from_pretrained("{name}")',
        f'encoder = ViTModel.from_pretrained("{name}", subfolder="encoder", add_pooling_layer=False)',
        "```",
        "",
        "Replace the name by this folder's path or its Hub id. Set `license` above before sharing.",
    ]
    matter = yaml.safe_dump(front_matter(cfg), sort_keys=False).strip()
    return f"---\n{matter}\n---\n\n" + "\n".join(body) + "\n"


def read_card(text: str) -> tuple[dict[str, Any], str]:
    """A card's front matter (parsed) and its text: the way the Hub reads it."""
    _, matter, body = text.split("---\n", 2)
    return yaml.safe_load(matter), body
