"""train/parallel.py: a frozen model stored in the compute dtype computes what autocast computes."""

import copy

import torch

from model.config import ModelConfig
from model.gpt import GPT
from train.config import ParallelConfig
from train.dist import DistInfo
from train.parallel import autocast, freeze_in_compute_dtype

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _model(preset):
    model = GPT(ModelConfig.preset(preset))
    model.init_weights(seed=0)
    return model


def test_frozen_copy_in_bf16_equals_the_float32_model_under_autocast_bit_for_bit():
    cfg = ParallelConfig(mixed_precision="bf16")
    for preset in ("tiny", "tiny-qwen3"):  # tied and untied output head, qk-norm
        model = _model(preset)
        frozen = freeze_in_compute_dtype(copy.deepcopy(model), cfg, CPU)
        linear = [m.weight for m in frozen.modules() if isinstance(m, torch.nn.Linear)]
        assert linear and all(w.dtype == torch.bfloat16 and not w.requires_grad for w in linear)
        assert frozen.embed_tokens.weight.dtype == torch.float32  # lookups and norms stay float32
        ids = torch.randint(0, model.config.vocab_size, (2, 33))
        targets = torch.randint(0, model.config.vocab_size, (2, 33))
        with torch.no_grad(), autocast(cfg, CPU):
            for kwargs in ({}, {"targets": targets, "logprobs": True}):
                torch.testing.assert_close(frozen(ids, **kwargs), model(ids, **kwargs), rtol=0, atol=0)


def test_frozen_copy_without_mixed_precision_keeps_float32():
    frozen = freeze_in_compute_dtype(_model("tiny"), ParallelConfig(mixed_precision="fp32"), CPU)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in frozen.parameters())
