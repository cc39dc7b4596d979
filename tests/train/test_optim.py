"""Pretraining's AdamW: its weight-decay groups."""

from __future__ import annotations

from mae_et.models.mae import mae_vit
from mae_et.train.optim import build_adamw


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = mae_vit("micro", patch_size=8, img_size=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    opt = build_adamw(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= plain
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decayed
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"]
