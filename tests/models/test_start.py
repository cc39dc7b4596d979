"""A pretraining start point (`model.init`): a transformers-written ViTMAE folder, an official-format .pth (with and
without the decoder) and one of our runs load strictly into the MAE, position tables checked and dropped; another
model size, a fine-tuned classifier and files that are no weights are refused in one line. The official loader
(`load_official_mae_checkpoint`) lists every mismatch and loads an encoder alone only when asked."""

from __future__ import annotations

import pytest
import torch
from helpers import official_pth, random_mae, transformers_folder
from safetensors.torch import load_file

from mae_et.models.start import StartPointError, load_official_mae_checkpoint, load_start_point, sha256_of


def fresh():
    return random_mae("micro", 8, 48, seed=7)


def test_a_transformers_folder_gives_its_encoder_and_decoder(tmp_path):
    folder, hf = transformers_folder(tmp_path)
    model = fresh()
    start = load_start_point(model, folder)
    assert (start.kind, start.decoder) == ("hf", True)
    assert start.sha256 == sha256_of(folder / "model.safetensors")
    ours, theirs = model.state_dict(), load_file(folder / "model.safetensors")  # the names transformers wrote
    assert torch.equal(ours["cls_token"], theirs["vit.embeddings.cls_token"])
    assert torch.equal(ours["blocks.1.mlp.fc2.weight"], theirs["vit.encoder.layer.1.output.dense.weight"])
    q = theirs["vit.encoder.layer.0.attention.attention.query.weight"]
    assert torch.equal(ours["blocks.0.attn.qkv.weight"][:64], q)
    assert torch.equal(ours["mask_token"], theirs["decoder.mask_token"])
    assert torch.equal(ours["decoder_pred.weight"], theirs["decoder.decoder_pred.weight"])
    # transformers 4 names the decoder's blocks decoder.decoder_layers.N, transformers 5 decoder.decoder_encoder.layer.N
    norm1 = next(k for k in theirs if k.startswith("decoder.decoder_") and k.endswith("0.layernorm_before.weight"))
    assert torch.equal(ours["decoder_blocks.0.norm1.weight"], theirs[norm1])


@pytest.mark.parametrize("decoder", [True, False])
def test_an_official_pth_with_or_without_its_decoder(tmp_path, decoder):
    path, source = official_pth(tmp_path, decoder)
    model = fresh()
    decoder_before = model.decoder_pred.weight.clone()
    start = load_start_point(model, path)
    assert (start.kind, start.decoder) == ("official", decoder)
    for name, value in source.state_dict().items():
        if decoder or not name.startswith(("decoder_", "mask_token")):
            assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(model.decoder_pred.weight, source.decoder_pred.weight if decoder else decoder_before)


def test_another_model_size_is_refused_in_one_line_and_loads_nothing(tmp_path):
    folder, _ = transformers_folder(tmp_path)
    model = random_mae("tiny", 8, 48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StartPointError) as e:
        load_start_point(model, folder)
    assert "\n" not in str(e.value) and "does not fit this run's model" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_moved_position_table_or_a_foreign_file_is_refused(tmp_path):
    path, _ = official_pth(tmp_path)
    blob = torch.load(path, weights_only=False)
    blob["model"]["pos_embed"] = blob["model"]["pos_embed"] + 0.5  # learned, not the fixed table
    torch.save(blob, tmp_path / "learned.pth")
    with pytest.raises(StartPointError, match="sin-cos"):
        load_start_point(fresh(), tmp_path / "learned.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(StartPointError, match="not a state dict"):
        load_start_point(fresh(), tmp_path / "list.pth")


def official_state(tmp_path) -> dict:
    """An official-style state dict: reference names and the fixed sin-cos tables."""
    path, _ = official_pth(tmp_path)
    return dict(torch.load(path, weights_only=False)["model"])


def test_checkpoint_mismatch_errors(tmp_path):
    model = fresh()
    sd = official_state(tmp_path)
    del sd["blocks.0.norm1.weight"]
    sd["head.weight"] = torch.zeros(3)
    sd["decoder_pred.weight"] = torch.zeros(10, 32)
    with pytest.raises(ValueError) as exc:
        load_official_mae_checkpoint(model, sd)
    msg = str(exc.value)
    assert "blocks.0.norm1.weight" in msg
    assert "head.weight" in msg
    assert "decoder_pred.weight: checkpoint (10, 32) vs model (192, 32)" in msg

    bad_pos = official_state(tmp_path)
    bad_pos["decoder_pos_embed"] = bad_pos["decoder_pos_embed"] + 1e-3
    with pytest.raises(ValueError, match="decoder_pos_embed"):
        load_official_mae_checkpoint(model, bad_pos)


def test_encoder_only_checkpoint(tmp_path):
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = official_state(tmp_path)
    enc = {k: v for k, v in full.items() if not k.startswith("decoder_") and k != "mask_token"}
    with pytest.raises(ValueError, match="no decoder"):
        load_official_mae_checkpoint(model, {"model": enc})
    # the failed call must not have touched the weights
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())

    load_official_mae_checkpoint(model, enc, encoder_only=True)
    after = model.state_dict()
    for k, v in after.items():
        if k.startswith("decoder_") or k == "mask_token":
            assert v.equal(before[k]), k
        else:
            assert v.equal(enc[k]), k

    # encoder_only is still strict on the encoder keys
    broken = dict(enc)
    del broken["norm.bias"]
    with pytest.raises(ValueError, match="norm.bias"):
        load_official_mae_checkpoint(model, broken, encoder_only=True)
