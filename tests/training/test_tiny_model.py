"""The tiny model every training test starts from."""

import torch


def test_tiny_model_loads(tiny_model_dir):
    from phitune.config import ModelConfig
    from phitune.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)), device="cpu")
    assert model.config.use_cache is False
    assert tok.pad_token == "<unk>" and tok.padding_side == "right"
    assert model.dtype == torch.float32
