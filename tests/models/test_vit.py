"""mae_et.models.vit: encoder loading into timm's ViT from every checkpoint kind (our runs, official MAE .pth, timm
state dicts), bad and missing files, position embeddings at another size."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import lie_about_a_shape, random_mae
from safetensors.torch import load_file, save_file

from mae_et.checkpoint import CONFIG_FILE, MODEL_FILE, list_checkpoints
from mae_et.models.mae import MODEL_SIZES, get_2d_sincos_pos_embed, mae_vit
from mae_et.models.vit import (
    EncoderSpec,
    LoadError,
    build_vit,
    encoder_features,
    load_encoder_state,
    load_pretrained_vit,
    mae_to_timm_state_dict,
    timm_model_name,
)

MICRO = EncoderSpec(size="micro", patch_size=8, img_size=48)  # the CPU recipe's encoder


# ----------------------------------------------------------------------------- fixtures


def micro_mae_from_run(run: Path) -> torch.nn.Module:
    """Our MAE with the run's latest weights, built from the run's own config."""
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    cfg = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
    m = cfg["model"]
    mae = mae_vit(
        m["size"],
        patch_size=m["patch_size"],
        img_size=cfg["data"]["crop_size"],
        decoder_embed_dim=m["decoder_embed_dim"],
        decoder_depth=m["decoder_depth"],
        decoder_num_heads=m["decoder_num_heads"],
    )
    mae.load_state_dict(load_file(str(ckpt / MODEL_FILE)), strict=True)
    return mae.eval()


def micro_encoder_state(embed_dim: int = 64, depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm-named encoder state dict of a micro-like ViT (48 px, patch 8) with the given dims."""
    torch.manual_seed(seed)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=48, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=2, num_classes=10
    )
    return vit.state_dict()


# ----------------------------------------------------------------------------- (1) export -> timm


def test_timm_names_have_our_architectures():
    for (size, patch), name in [
        ((s, p), timm_model_name(EncoderSpec(s, p, 224))) for s in MODEL_SIZES for p in (8, 14, 16)
    ]:
        if name is None:
            continue
        ref = timm.create_model(name, device="meta")  # no memory, no init cost
        dims = MODEL_SIZES[size]
        assert (ref.embed_dim, len(ref.blocks), ref.blocks[0].attn.num_heads) == (
            dims["embed_dim"],
            dims["depth"],
            dims["num_heads"],
        ), name
        assert ref.patch_embed.patch_size == (patch, patch) and ref.global_pool == "token" and ref.has_class_token
    assert timm_model_name(EncoderSpec("base", 16, 224)) == "vit_base_patch16_224"
    assert timm_model_name(EncoderSpec("huge", 14, 224)) == "vit_huge_patch14_224"
    assert timm_model_name(MICRO) is None


def test_build_vit_matches_mae_encoder_settings():
    vit = build_vit(MICRO, num_classes=3)
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert vit.blocks[0].attn.qkv.bias is not None and vit.has_class_token
    assert vit(torch.randn(1, 3, 64, 64)).shape == (1, 3)  # dynamic size: any multiple of the patch
    avg = build_vit(MICRO, global_pool="avg")
    assert isinstance(avg.norm, torch.nn.Identity) and isinstance(avg.fc_norm, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_vit(MICRO, img_size=50)
    # an unknown global_pool or feature pool: the schema refuses it (tests/evaluate: model.global_pool, linprobe.pool)


# ----------------------------------------------------------------------------- (2) our real run


def test_micro_run_loads_with_equal_features(micro_run):
    vit, spec = load_pretrained_vit(micro_run)
    assert spec == MICRO
    mae = micro_mae_from_run(micro_run)
    vit.eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        tokens = mae.forward_features(x)  # (3, 37, 64)
        torch.testing.assert_close(encoder_features(vit, x, "cls"), tokens[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(encoder_features(vit, x, "mean"), tokens[:, 1:].mean(1), atol=1e-5, rtol=0)
        # Our MAE is accepted too (the pretraining loop monitors with it directly).
        torch.testing.assert_close(encoder_features(mae, x, "cls"), tokens[:, 0])
    # A checkpoint folder, and its model.safetensors file, load the same weights.
    ckpt = list_checkpoints(micro_run / "checkpoints")[-1]
    for src in (ckpt, ckpt / MODEL_FILE):
        state, found, kind = load_encoder_state(src)
        assert (found, kind) == (MICRO, "mae_et")
        torch.testing.assert_close(state["pos_embed"], get_2d_sincos_pos_embed(64, 6).unsqueeze(0))


# ----------------------------------------------------------------------------- (3) official names


def test_official_checkpoint_loads(tmp_path):
    mae = random_mae("micro", 8, 48, seed=1)
    sd = dict(mae.state_dict())
    sd["pos_embed"] = get_2d_sincos_pos_embed(64, 6).unsqueeze(0)  # (1, 37, 64) as official files have it
    sd["decoder_pos_embed"] = get_2d_sincos_pos_embed(32, 6).unsqueeze(0)
    path = tmp_path / "mae_pretrain_vit_micro.pth"
    # The reference's training checkpoints also pickle their argparse.Namespace.
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(model="mae_vit_micro")}, path)
    state, spec, kind = load_encoder_state(path)
    assert (spec, kind) == (None, "official")
    assert not any(k.startswith(("decoder", "mask_token")) for k in state)
    vit, spec = load_pretrained_vit(path, num_classes=4)
    assert spec == MICRO  # inferred from the shapes
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(x), mae.forward_features(x), atol=1e-5, rtol=0)


def test_mae_state_without_pos_embed_needs_a_spec():
    sd = random_mae("micro", 8, 48).state_dict()
    with pytest.raises(LoadError, match="no pos_embed"):
        mae_to_timm_state_dict(sd, None)
    out = mae_to_timm_state_dict(sd, MICRO)
    assert out["pos_embed"].shape == (1, 37, 64) and "mask_token" not in out


# ----------------------------------------------------------------------------- (4) timm names


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_timm_state_dict_loads(tmp_path, suffix):
    sd = micro_encoder_state()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"module." + k: v for k, v in sd.items()}, path)  # a DDP-wrapped save
    vit, spec = load_pretrained_vit(path, num_classes=7)
    assert spec == MICRO
    for k, v in vit.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, sd[k]), k
    assert vit.head.out_features == 7  # the source's 10-way head was not transferred


# ----------------------------------------------------------------------------- (5) mismatches


def test_wrong_width_and_depth_list_keys_and_shapes(tmp_path):
    narrow = tmp_path / "narrow.pth"
    torch.save(micro_encoder_state(embed_dim=32), narrow)
    with pytest.raises(LoadError) as e:
        load_pretrained_vit(narrow, spec=MICRO)
    msg = str(e.value)
    assert "blocks.0.attn.qkv.weight: checkpoint (96, 32) vs model (192, 64)" in msg
    assert "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 64)" in msg
    with pytest.raises(LoadError, match="match no model size"):
        load_pretrained_vit(narrow)  # without a spec the shapes name no known size

    deep = tmp_path / "deep.pth"
    torch.save(micro_encoder_state(depth=3), deep)
    with pytest.raises(LoadError) as e:
        load_pretrained_vit(deep, spec=MICRO)
    assert "unexpected keys: blocks.2.attn.proj.bias" in str(e.value)

    shallow = tmp_path / "shallow.pth"
    sd = {k: v for k, v in micro_encoder_state().items() if not k.startswith("blocks.1.")}
    torch.save(sd, shallow)
    with pytest.raises(LoadError, match="missing keys: blocks.1.attn.proj.bias"):
        load_pretrained_vit(shallow, spec=MICRO)


def test_unreadable_and_missing_files(tmp_path, micro_run):
    good = tmp_path / "good.pth"
    torch.save(micro_encoder_state(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"checkpoint '.*truncated.pth' is unreadable"):
        load_pretrained_vit(truncated)

    st = tmp_path / "truncated.safetensors"
    save_file({k: v.contiguous() for k, v in micro_encoder_state().items()}, str(st))
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(LoadError, match="unreadable"):
        load_encoder_state(st)

    # A damaged checkpoint inside a run folder names that file.
    ckpt = list_checkpoints(micro_run / "checkpoints")[-1]
    broken = tmp_path / "run" / "checkpoints" / ckpt.name
    broken.mkdir(parents=True)
    (broken / MODEL_FILE).write_bytes((ckpt / MODEL_FILE).read_bytes()[:500])
    (broken / CONFIG_FILE).write_text((ckpt / CONFIG_FILE).read_text())
    (broken / "meta.json").write_text("{}")
    with pytest.raises(LoadError, match=r"model.safetensors' is unreadable"):
        load_pretrained_vit(tmp_path / "run")

    with pytest.raises(LoadError, match="does not exist"):
        load_pretrained_vit(tmp_path / "nope.pth")
    not_weights = tmp_path / "state.pt"
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, not_weights)
    with pytest.raises(LoadError, match="not a plain state dict"):
        load_encoder_state(not_weights)
    torch.save({"fc.weight": torch.ones(2, 2)}, not_weights)
    with pytest.raises(LoadError, match="no ViT encoder"):
        load_encoder_state(not_weights)
    (tmp_path / "plain").mkdir()
    with pytest.raises(LoadError, match="is not a checkpoint"):
        load_encoder_state(tmp_path / "plain")  # a folder, but no run
    with pytest.raises(LoadError, match="holds run folders, not one run; pass one of: .*run"):
        load_encoder_state(tmp_path)


# ----------------------------------------------------------------------------- (6) pos-embed resampling


def test_other_img_size_resamples_pos_embed(micro_run):
    vit, spec = load_pretrained_vit(micro_run, img_size=64, num_classes=5, global_pool="avg")
    assert spec == MICRO  # the checkpoint's own spec
    assert vit.pos_embed.shape == (1, 1 + 8 * 8, 64)
    same, _ = load_pretrained_vit(micro_run)
    torch.testing.assert_close(vit.pos_embed[:, :1], same.pos_embed[:, :1])  # the cls entry is kept
    assert isinstance(vit.norm, torch.nn.Identity)  # avg pool: fc_norm (new) instead of the final norm
    with torch.no_grad():
        assert vit.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 5)
        assert encoder_features(vit, torch.randn(2, 3, 64, 64), "mean").shape == (2, 64)


# ----------------------------------------------------------------------------- errors that name the real problem


def test_an_extra_block_is_named_as_extra_without_a_spec_too(tmp_path):
    """The width names the size; a third block of a micro ViT is then an unexpected key, not 'no model size'."""
    deep = tmp_path / "deep.safetensors"
    save_file(micro_encoder_state(depth=3), str(deep))
    with pytest.raises(LoadError) as e:
        load_pretrained_vit(deep)
    message = str(e.value)
    assert "unexpected keys: blocks.2.attn.proj.bias" in message and "missing" not in message, message
    assert "\n" not in message


def test_a_fine_tuning_run_given_as_the_pretrained_encoder_is_told_so(tmp_path):
    from mae_et.checkpoint import save_checkpoint
    from mae_et.evaluate.config import FinetuneConfig
    from mae_et.recipes import save_config

    cfg = FinetuneConfig()
    cfg.model.checkpoint = "runs/the_pretraining"
    save_config(cfg, tmp_path / "config.yaml")
    classifier = build_vit(MICRO, num_classes=3, global_pool="avg").state_dict()
    run = tmp_path / "finetune_run"
    save_checkpoint(
        run / "checkpoints", 5, classifier, {"step": 5}, (tmp_path / "config.yaml").read_text(), {"step": 5}, 1
    )
    with pytest.raises(LoadError) as e:
        load_pretrained_vit(run, num_classes=3)
    message = str(e.value)
    assert "is a fine-tuned classifier, not a pretrained encoder" in message and "runs/the_pretraining" in message
    assert "size" not in message and "\n" not in message, message


def test_a_header_that_lies_about_a_shape_names_the_tensor_and_the_shape_expected(tmp_path, micro_run):
    """The sin-cos table was built from the lying width: a ValueError from the table, naming nothing."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    weights = list_checkpoints(run / "checkpoints")[-1] / MODEL_FILE
    lie_about_a_shape(weights, "patch_embed.proj.weight", [3, 64, 8, 8])  # (64, 3, 8, 8) in truth
    with pytest.raises(LoadError) as e:
        load_pretrained_vit(run)
    message = str(e.value)
    assert "patch_embed.proj.weight: checkpoint (3, 64, 8, 8) vs model (64, 3, 8, 8)" in message, message
    assert "\n" not in message
