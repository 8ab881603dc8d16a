"""Initialisation is a spec choice: the book's PyTorch defaults or GPT-2's scheme."""

import math

import torch

from minigpt_core import build_model, spec_from_preset

CHAR = {"name": "char"}  # a small vocabulary needs a tokenizer that fits it
SHAPE = {"vocab_size": 2000, "context_length": 64, "emb_dim": 256, "n_heads": 4, "n_layers": 8}


def test_gpt2_normal_init_scales_residual_projections():
    model = build_model(spec_from_preset("tiny", model={**SHAPE, "init": {"name": "gpt2.normal"}}, tokenizer=CHAR))
    block = model.trf_blocks[3]
    assert abs(block.att.W_query.weight.std().item() - 0.02) < 1e-3
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 1e-3
    scaled = 0.02 / math.sqrt(2 * SHAPE["n_layers"])
    assert abs(block.att.out_proj.weight.std().item() - scaled) < 5e-4
    assert abs(block.ff.layers[2].weight.std().item() - scaled) < 5e-4
    assert abs(block.ff.layers[0].weight.std().item() - 0.02) < 1e-3
    assert torch.count_nonzero(block.att.out_proj.bias) == 0 and torch.count_nonzero(block.ff.layers[0].bias) == 0
    assert torch.all(block.norm1.scale == 1) and torch.all(block.norm1.shift == 0)


def test_gpt2_normal_params_and_default_differ():
    flat = build_model(spec_from_preset("tiny", model={
        **SHAPE, "init": {"name": "gpt2.normal", "params": {"std": 0.05, "scale_residual": False}}}, tokenizer=CHAR))
    assert abs(flat.trf_blocks[0].att.out_proj.weight.std().item() - 0.05) < 2e-3
    default = build_model(spec_from_preset("gpt2-124m", model=SHAPE, tokenizer=CHAR))
    # PyTorch's Linear default is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std = 1/sqrt(3 * fan_in)
    w = default.trf_blocks[0].att.W_query.weight
    assert abs(w.std().item() - 1 / math.sqrt(3 * 256)) < 2e-3
    assert abs(default.tok_emb.weight.std().item() - 1.0) < 0.02  # nn.Embedding default N(0, 1)
