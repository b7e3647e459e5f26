"""The Flax NNX face of a converted checkpoint: the param tree as a module, for inspection and fine-tuning.

`CausalLM` holds the param tree itself, each array an `nnx.Param` under the same names
(`model.embed`, `model.layers[i]["ffn"]["w_up"]`, ...), so `nnx.display`, `nnx.split` /
`nnx.merge`, `nnx.state` and `nnx.Optimizer` all work on a converted checkpoint. Its
`__call__` is no second model: it recovers the plain tree (`params()`) and runs
`forward.forward` and `forward.logits` over a fresh cache, as the engine's pre-fill does.
`params()` also hands a fine-tuned model back to `Generator(cfg, params, tokenizer)`.

    model = CausalLM.from_checkpoint(path)
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
    loss = train_step(model, optimizer, tokens, mask)   # tokens, mask [B, T]
    Generator(model.cfg, model.params(), tokenizer)
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from coreinfer_jax.errors import InputError
from coreinfer_jax.models.checkpoint import load_checkpoint
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.forward import forward, init_cache, logits
from coreinfer_jax.models.params import Params


def _is_param(x: object) -> bool:
    return isinstance(x, nnx.Param)


class CausalLM(nnx.Module):
    """A decoder-only language model whose `nnx.Param`s are the param tree (see `models.params`).

    Each top-level entry of the tree is an attribute of the same name; `cfg` is static.
    """

    def __init__(self, cfg: ModelConfig, params: Params):
        self.cfg = cfg
        self.names = tuple(params)
        for name, tree in params.items():
            setattr(self, name, nnx.data(jax.tree.map(nnx.Param, tree)))

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: Params) -> CausalLM:
        return cls(cfg, params)

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: str | None = None) -> CausalLM:
        """The model of a directory written by `python -m convert` (its tokenizer: `load_checkpoint`)."""
        cfg, params, _ = load_checkpoint(path, dtype)
        return cls(cfg, params)

    def params(self) -> Params:
        """The plain nested-dict param tree, for `forward`, the engine or `Generator`."""
        return {name: jax.tree.map(lambda p: p.get_value(), getattr(self, name), is_leaf=_is_param)
                for name in self.names}

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Logits `[B, T, V]` (float32) of `tokens` `[B, T]` at positions 0..T-1, causally."""
        if tokens.ndim != 2:
            raise InputError(f"tokens must be [B, T] (a batch of rows), got shape {tuple(tokens.shape)}")
        params = self.params()
        B, T = tokens.shape
        cache = init_cache(self.cfg, B, T, params["embed"].dtype)  # [B, Hkv, hd, T] per layer, never read
        h, _, _ = forward(params, self.cfg, tokens, jnp.zeros((B,), jnp.int32), cache, prefix=False)  # [B, T, D]
        return logits(params, self.cfg, h)


def next_token_loss(model: CausalLM, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean cross-entropy of each real token given the ones before it.

    `tokens` `[B, T]` are right-padded and `mask` `[B, T]` marks the real ones; position t's
    logits score token t + 1 wherever that token is real.
    """
    logprobs = jax.nn.log_softmax(model(tokens)[:, :-1], axis=-1)  # [B, T-1, V]
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    weight = mask[:, 1:].astype(jnp.float32)  # [B, T-1]
    return -(picked * weight).sum() / weight.sum()


@nnx.jit
def train_step(model: CausalLM, optimizer: nnx.Optimizer, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """One optimizer step on `next_token_loss` (updates `model` in place); returns the loss before it.

    `optimizer` is `nnx.Optimizer(model, tx, wrt=nnx.Param)` for any optax `tx`.
    """
    loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens, mask)
    optimizer.update(model, grads)
    return loss
