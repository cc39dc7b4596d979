"""The model card `mae-et export --format hf` writes: the Hub's front matter, parsed back, and every figure of its
text checked against the run's own files (config, checkpoint meta, metrics.jsonl, a fine-tune's result.json)."""

from __future__ import annotations

import json

import pytest
from helpers import CPU_RECIPE, MINI, REPO

from mae_et.evaluate.config import load_finetune_config
from mae_et.evaluate.export import main as export_main
from mae_et.evaluate.finetune import finetune
from mae_et.evaluate.model_card import read_card
from mae_et.train.config import load_pretrain_config
from mae_et.train.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")


def test_the_card_reports_what_the_run_folder_and_the_named_results_hold(tmp_path, capsys):
    cfg = load_pretrain_config(
        CPU_RECIPE,
        [
            f"data.root={MINI}",
            f"output_dir={tmp_path}",
            "train.max_steps=15",
            "tracking.knn_every_epochs=1",
            "model.decode_fraction=0.5",
            "model.decode_fraction_of=full_size",
            'tracking.wandb="off"',
        ],
    )
    run = pretrain(cfg).run_dir
    ft = finetune(
        load_finetune_config(
            REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml",
            [f"model.checkpoint={run}", f"data.root={MINI}", f"output_dir={tmp_path / 'ft'}", "train.epochs=1"],
        )
    )
    result_file = ft.run_dir / "result.json"
    export_main([str(run), str(tmp_path / "hf"), "--format", "hf", "--results", str(result_file)])
    matter, text = read_card((tmp_path / "hf" / "README.md").read_text())

    assert matter["library_name"] == "transformers" and matter["pipeline_tag"] == "image-feature-extraction"
    assert {"masked-autoencoder", "curriculum-et", "target-pixel"} <= set(matter["tags"])
    assert matter["datasets"] == ["imagenette-mini"] and "license" in matter and matter["license"] is None
    meta = json.loads(sorted((run / "checkpoints").glob("step_*/meta.json"))[-1].read_text())
    assert meta["step"] == 15
    assert f"{meta['step']} optimizer steps of {meta['total_steps']} planned" in text
    assert f"{meta['step'] * meta['global_batch']:,} images seen" in text
    assert "0.5 of the full crop's patches" in text and "Curriculum: et (fft)" in text
    knn = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [row for row in knn if "knn_top1_cls" in row][-1]
    assert (
        f"cls {knn['knn_top1_cls']:.1f}% (untrained {knn['untrained_knn_top1_cls']:.1f}%), "
        f"mean {knn['knn_top1_mean']:.1f}% (untrained {knn['untrained_knn_top1_mean']:.1f}%)"
    ) in text
    result = json.loads(result_file.read_text())
    assert f"finetune: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%" in text
    assert 'ViTModel.from_pretrained("' in text and 'subfolder="encoder"' in text
    assert "README.md" in capsys.readouterr().out


def test_a_result_that_is_no_result_json_is_one_line_and_nothing_is_written(micro_run, tmp_path, capsys):
    bad = tmp_path / "result.json"
    bad.write_text('{"top1": 3}')
    with pytest.raises(SystemExit) as e:
        export_main([str(micro_run), str(tmp_path / "hf"), "--format", "hf", "--results", str(bad)])
    assert e.value.code == 2 and "--results" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_continued_run_names_its_start_point_and_hash():
    from mae_et.evaluate.model_card import training_lines
    from mae_et.train.config import PretrainConfig

    cfg = PretrainConfig()
    cfg.model.init, cfg.model.init_sha256 = "/data/weights/mae_pretrain_vit_base_full.pth", "ab12"
    lines = training_lines(cfg, {"step": 10, "total_steps": 20, "global_batch": 8})
    assert (
        lines[0]
        == "- Start: continued from `mae_pretrain_vit_base_full.pth` (sha256 ab12), not a random initialisation."
    )
    assert "80 images seen" in lines[4]
