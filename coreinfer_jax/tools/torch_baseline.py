"""The benchmark's baselines: Transformers `generate` (greedy; eager-mode PyTorch, or its static
cache with `torch.compile`), and the same model decoding as the paper's PyTorch code does
(`paper_decoding`), timed per token."""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from coreinfer_jax.sparse.hybrid import Hybrid
from coreinfer_jax.sparse.method import Method
from coreinfer_jax.sparse.similarity import Similarity
from coreinfer_jax.sparse.stability import Stability


def baseline_name(attention: str, device: str) -> str:
    """"transformers-pytorch-eager", "transformers-pytorch-sdpa-cuda"."""
    return f"transformers-pytorch-{attention}" + ("" if device == "cpu" else f"-{device}")


def paper_decodes(m: Method) -> bool:
    """Whether the paper's code decodes as `m` does: each prompt's core neurons alone, copied
    once per generation (stability by any rule or budget, similarity), not the hybrid's
    per-token neurons, compensation's bias or a set shared by a batch."""
    return (isinstance(m, (Stability, Similarity)) and not isinstance(m, Hybrid)
            and not getattr(m, "compensate", False) and m.share == "row")


def device_beside_jax() -> str:
    """Where Transformers runs beside this project: "cuda" where JAX runs on a GPU and PyTorch
    has CUDA, else "cpu" (a GPU row against a CPU baseline would compare the machines)."""
    import jax
    import torch

    return "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"


def max_rss() -> tuple[int, str]:
    """`(bytes, "process max RSS")`: this process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"  # Linux reports KiB


class TorchRunner:
    """Transformers `generate` (greedy, eager-mode PyTorch) on a model: the checkpoint's exact
    weights (`from_checkpoint`), or a config's random initialisation (`from_hf_config`, where
    only speed is compared); with `core`, decoding as the paper's code does
    (`decoding_core_neurons`)."""

    def __init__(self, model: Any, core: Mapping[int, Sequence[int]] | None = None):
        import torch

        self.torch, self.model, self.core = torch, model, core

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, dtype: str | None, attention: str, device: str = "cpu") -> TorchRunner:
        from convert import torch_model_from_checkpoint

        model = torch_model_from_checkpoint(checkpoint, dtype, attention).to(device)
        if device == "cuda":
            cls._reset_peak()
        return cls(model)

    @staticmethod
    def _reset_peak() -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()  # the peak this model reaches, not an earlier one's

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], dtype: str, attention: str, device: str = "cpu") -> TorchRunner:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device(device):  # initialised where it runs: an 8B model never crosses the bus
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf), dtype=getattr(torch, dtype),
                                                     attn_implementation=attention)
        if device == "cuda":
            cls._reset_peak()
        return cls(model.eval())

    @classmethod
    def static_compiled(cls, hf: dict[str, Any], dtype: str, device: str = "cuda") -> TorchRunner:
        """Transformers' fastest documented decode setting (its torch.compile and KV-cache
        guides): a static KV cache, and `forward` compiled whole ("fullgraph") in
        "reduce-overhead" mode, which replays CUDA graphs. Compiles during the first `run`."""
        runner = cls.from_hf_config(hf, dtype, "sdpa", device)
        model = runner.model
        model.generation_config.cache_implementation = "static"
        model.forward = runner.torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        return runner

    @classmethod
    def offloaded(cls, hf: dict[str, Any], dtype: str, gpu_bytes: int) -> TorchRunner:
        """Transformers + accelerate CPU offload of the config's random model: at most `gpu_bytes`
        of weights on GPU 0 (accelerate's `device_map` under a `max_memory` limit), the rest in
        CPU memory and copied to the GPU module by module at every forward pass."""
        import torch
        from accelerate import dispatch_model, infer_auto_device_map

        model = cls.from_hf_config(hf, dtype, "sdpa", "cuda").model.to("cpu")  # initialised on the GPU: fast
        torch.cuda.empty_cache()
        device_map = infer_auto_device_map(model, max_memory={0: gpu_bytes, "cpu": 1 << 40},
                                           no_split_module_classes=model._no_split_modules)
        model = dispatch_model(model, device_map)
        torch.cuda.reset_peak_memory_stats()
        return cls(model)

    def decoding_core_neurons(self, core: Mapping[int, Sequence[int]]) -> TorchRunner:
        """This runner's model decoding as the paper's code does, with `core` (layer -> core
        neuron ids) in its sparse layers (`paper_decoding`); the model itself is shared, and
        left as it was after each run."""
        return TorchRunner(self.model, core)

    def peak_memory(self) -> tuple[int, str]:
        """Like `peak_memory`, for PyTorch: its CUDA allocator's peak on a GPU."""
        if self.model.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.model.device), "torch CUDA peak"
        return max_rss()

    def run(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
        """(pre-fill seconds, decode tokens/s), from timestamps Transformers' own loop gives us
        after each generated token (a stopping criterion that never stops): pre-fill ends with
        the first token, decode covers the remaining `new_tokens - 1`."""
        torch = self.torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []
        cuda = self.model.device.type == "cuda"

        class Clock(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if cuda:  # the token's kernels have finished, not merely been queued
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        x = torch.tensor([prompt_ids], device=self.model.device)
        if self.core is None:
            decoding = contextlib.nullcontext()
        else:
            from coreinfer_jax.tools.paper_decoding import core_neuron_linears

            decoding = core_neuron_linears(self.model, self.core)
        with decoding, torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=0, eos_token_id=None, stopping_criteria=StoppingCriteriaList([Clock()]))
        assert len(stamps) == new_tokens, (len(stamps), new_tokens)
        return stamps[0] - t0, (new_tokens - 1) / (stamps[-1] - stamps[0])
