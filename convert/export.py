"""The way back: a converted checkpoint as a Transformers PyTorch model with the same weights.

The benchmark's baseline and the parity tests run Transformers on exactly the weights this
project decodes with (e.g. the dequantised GGUF), whatever the original source was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convert import keymap
from convert.errors import ConversionError
from coreinfer_jax.models.checkpoint import check_checkpoint_dir, load_params
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.params import path_str


def torch_state_dict(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Our param tree as HF-named float32 NumPy arrays (the key table, run backwards)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return keymap.hf_tensors(cfg, {path_str(path): np.asarray(leaf, np.float32) for path, leaf in leaves})


def torch_model_from_checkpoint(checkpoint: str | Path, dtype: str | None = None,
                                attn_implementation: str | None = None) -> Any:
    """A Transformers `AutoModelForCausalLM` (eval mode) holding the checkpoint's weights;
    `attn_implementation` as Transformers names them ("eager", "sdpa"; None: its default)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_checkpoint_dir(checkpoint)
    cfg = ModelConfig.load(path / "config.json")
    params = load_params(path, cfg)
    hf = json.loads((path / "hf_config.json").read_text())
    hf.pop("quantization_config", None)  # GGUF sources: the weights are already dequantised
    config = AutoConfig.for_model(**hf)
    torch_dtype = getattr(torch, dtype or str(params["embed"].dtype))
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn_implementation)
    state = {k: torch.tensor(v, dtype=torch_dtype) for k, v in torch_state_dict(cfg, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ConversionError(f"checkpoint does not fit {config.architectures}: "
                              f"missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
