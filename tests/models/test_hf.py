"""Hugging Face folders both ways: `mae-et export --format hf` loads in transformers as ViTMAEForPreTraining and as
ViTModel with no missing or unexpected key and computes what our model computes; a transformers folder (ours, or
one transformers itself saved) is a model.checkpoint that gives the same encoder back."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import lie_about_a_shape, random_mae, save_as_our_checkpoint
from safetensors.torch import load_file, save_file

from mae_et.checkpoint import list_checkpoints
from mae_et.evaluate.export import main as export_main
from mae_et.evaluate.visualize import load_mae
from mae_et.files import FileError
from mae_et.models.hf import hf_to_encoder, mae_to_hf
from mae_et.models.vit import LoadError, encoder_features, load_encoder_state, load_pretrained_vit

transformers = pytest.importorskip("transformers", reason="the [bench] extra installs transformers")

SIZE, PATCH, IMG = "tiny", 8, 64  # 64 patches: small and fast, every weight random


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our MAE, its run folder, the exported HF folder)."""
    tmp = tmp_path_factory.mktemp("hf")
    mae = random_mae(SIZE, PATCH, IMG, seed=3)
    save_as_our_checkpoint(mae, tmp / "run", SIZE, PATCH, IMG, tmp)
    assert export_main([str(tmp / "run"), str(tmp / "hf"), "--format", "hf"]) == 0
    return mae, tmp / "run", tmp / "hf"


def hf_config_of(folder):
    return json.loads((folder / "config.json").read_text())


def images(n=3, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def test_the_mae_loads_as_vitmae_for_pretraining_with_every_key_and_predicts_what_ours_does(exported):
    """Same noise, same mask: HF's reconstruction of every patch and its loss (norm-pix as the run) equal ours."""
    _, run, folder = exported
    mae, cfg = load_mae(run)
    assert hf_config_of(folder)["norm_pix_loss"] == cfg.model.norm_pix_loss
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    imgs = images()
    noise = torch.rand(imgs.shape[0], (IMG // PATCH) ** 2, generator=torch.Generator().manual_seed(1))  # (N, L)
    with torch.no_grad():
        ours = mae(imgs, mask_ratio=0.75, noise=noise)
        theirs = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(ours.mask, theirs.mask)
    torch.testing.assert_close(theirs.logits, ours.pred, atol=2e-5, rtol=1e-4)  # (N, L, p*p*3) every patch
    torch.testing.assert_close(theirs.loss, ours.loss, atol=1e-6, rtol=1e-5)


def test_the_encoder_folder_loads_as_vitmodel_with_every_key_and_equal_features(exported):
    mae, run, folder = exported
    vit, info = transformers.ViTModel.from_pretrained(
        folder / "encoder", add_pooling_layer=False, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = load_pretrained_vit(run, num_classes=0)[0].eval()
    imgs = images()
    with torch.no_grad():
        hidden = vit.eval()(pixel_values=imgs).last_hidden_state  # (N, 1+L, D), after the final LayerNorm
        tokens = ours.forward_features(imgs)  # (N, 1+L, D)
    torch.testing.assert_close(hidden, tokens, atol=2e-5, rtol=1e-4)


def test_the_hf_folders_are_a_model_checkpoint_that_gives_the_same_encoder(exported):
    """Both folders read back (no transformers needed for it) to the encoder the run holds, weight for weight."""
    _, run, folder = exported
    ours, spec, _ = load_encoder_state(run)
    for path in (folder, folder / "encoder"):
        state, hf_spec, kind = load_encoder_state(path)
        assert kind == "hf" and hf_spec == spec
        assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)
    model, _ = load_pretrained_vit(folder, num_classes=0)
    reference, _ = load_pretrained_vit(run, num_classes=0)
    imgs = images(seed=2)
    with torch.no_grad():
        assert torch.equal(encoder_features(model.eval(), imgs), encoder_features(reference.eval(), imgs))


def test_a_folder_saved_by_transformers_itself_reads_back(exported, tmp_path):
    """transformers 5 saves its own names (layers.N.attention.q_proj ...): read as the same encoder."""
    _, run, folder = exported
    hf = transformers.ViTMAEForPreTraining.from_pretrained(folder)
    hf.save_pretrained(tmp_path / "resaved")
    state, _, kind = load_encoder_state(tmp_path / "resaved")
    ours = load_encoder_state(run)[0]
    assert kind == "hf" and all(torch.equal(state[k], ours[k]) for k in ours)


def test_the_key_tables_are_inverse_and_split_qkv_in_query_key_value_order():
    mae = random_mae(SIZE, PATCH, IMG, seed=4)
    sd = mae.state_dict()
    hf = mae_to_hf(sd, IMG // PATCH)
    dim = sd["cls_token"].shape[-1]
    qkv = sd["blocks.1.attn.qkv.weight"]  # (3D, D): rows q, then k, then v (timm's layout)
    assert torch.equal(hf["vit.encoder.layer.1.attention.attention.key.weight"], qkv[dim : 2 * dim])
    assert torch.equal(hf["decoder.decoder_layers.0.intermediate.dense.bias"], sd["decoder_blocks.0.mlp.fc1.bias"])
    back = hf_to_encoder(hf)
    encoder = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    assert set(back) == set(encoder) | {"pos_embed"}
    assert all(torch.equal(back[k], encoder[k]) for k in encoder)


def test_export_hf_refuses_a_non_empty_folder_a_file_source_and_a_hog_run(exported, tmp_path, capsys):
    mae, run, folder = exported
    with pytest.raises(SystemExit) as e:
        export_main([str(run), str(folder), "--format", "hf"])
    assert e.value.code == 2 and "is not empty; pass --overwrite" in capsys.readouterr().err
    assert export_main([str(run), str(folder), "--format", "hf", "--overwrite"]) == 0
    assert hf_config_of(folder)["model_type"] == "vit_mae"
    weights = tmp_path / "enc.safetensors"
    assert export_main([str(run), str(weights)]) == 0
    with pytest.raises(SystemExit) as e:
        export_main([str(weights), str(tmp_path / "out"), "--format", "hf"])
    assert e.value.code == 2 and "exports one of our run or checkpoint folders" in capsys.readouterr().err
    with pytest.raises(FileError, match="overlaps"):
        from mae_et.evaluate.export import export_hf

        export_hf(run, run / "hf")


def test_the_mae_config_holds_the_runs_own_mask_ratio(exported, tmp_path):
    _, run, _ = exported
    other = tmp_path / "run"
    shutil.copytree(run, other)
    config = list_checkpoints(other / "checkpoints")[-1] / "config.yaml"
    config.write_text(config.read_text().replace("mask_ratio: 0.75", "mask_ratio: 0.6"))
    assert export_main([str(other), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert transformers.ViTMAEConfig.from_pretrained(tmp_path / "hf").mask_ratio == 0.6


def test_a_folder_without_config_json_is_told_so_and_pytorch_model_bin_is_read_weights_only(exported, tmp_path):
    """config.json is what such a folder lacks (not our config.yaml); the Hub's older pytorch_model.bin is read as
    every torch file is, weights only: a pickled object in it is refused, never run."""
    _, run, folder = exported
    ours = load_encoder_state(run)[0]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "encoder" / "model.safetensors", bare)
    with pytest.raises(LoadError) as e:
        load_encoder_state(bare)
    assert "no config.json" in str(e.value) and "config.yaml" not in str(e.value), str(e.value)

    binned = tmp_path / "binned"
    binned.mkdir()
    torch.save(load_file(str(folder / "encoder" / "model.safetensors")), binned / "pytorch_model.bin")
    with pytest.raises(LoadError) as e:  # only the .bin: what is missing is still config.json
        load_encoder_state(binned)
    assert "no config.json" in str(e.value) and "pytorch_model.bin" in str(e.value), str(e.value)
    shutil.copy(folder / "encoder" / "config.json", binned)
    state, _, kind = load_encoder_state(binned)
    assert kind == "hf" and state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)

    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(1), "payload": MakesADir(marker)}, binned / "pytorch_model.bin")
    with pytest.raises(LoadError, match="refused"):
        load_encoder_state(binned)
    assert not marker.exists()


class MakesADir:
    """Unpickled in full, it creates a folder: the sign that a load ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("index", [12, 13])
def test_an_extra_layer_is_reported_as_extra(exported, tmp_path, index):
    """A 13th layer, next to the last one or after a gap, is named as unexpected; it was a missing 'layer.12'."""
    _, _, folder = exported
    shutil.copytree(folder / "encoder", tmp_path / "enc")
    weights = tmp_path / "enc" / "model.safetensors"
    state = load_file(str(weights))
    last = "encoder.layer.11."
    state.update({k.replace(last, f"encoder.layer.{index}."): v.clone() for k, v in state.items() if last in k})
    save_file(state, str(weights))
    with pytest.raises(LoadError) as e:
        load_pretrained_vit(tmp_path / "enc")
    message = str(e.value)
    assert f"unexpected keys: blocks.{index}.attn.proj.bias" in message and "missing" not in message, message


def test_a_header_that_lies_about_a_shape_names_the_tensor_and_the_shape_expected(exported, tmp_path):
    _, _, folder = exported
    shutil.copytree(folder / "encoder", tmp_path / "enc")
    query = "encoder.layer.0.attention.attention.query.weight"
    lie_about_a_shape(tmp_path / "enc" / "model.safetensors", query, [96, 384])  # (192, 192) in truth
    with pytest.raises(LoadError) as e:
        load_encoder_state(tmp_path / "enc")
    message = str(e.value)
    assert f"{query} (96, 384)" in message and "(192, 192) weights" in message and "\n" not in message, message
