"""The benchmark's baseline: Transformers `generate` (greedy; eager-mode PyTorch, or its static
cache with `torch.compile`), timed per token."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any


def max_rss() -> tuple[int, str]:
    """`(bytes, "process max RSS")`: this process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"  # Linux reports KiB


class TorchRunner:
    """Transformers `generate` (greedy, eager-mode PyTorch) on a model: the checkpoint's exact
    weights (`from_checkpoint`), or a config's random initialisation (`from_hf_config`, where
    only speed is compared)."""

    def __init__(self, model: Any):
        import torch

        self.torch, self.model = torch, model

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, dtype: str | None, attention: str) -> TorchRunner:
        from convert import torch_model_from_checkpoint

        return cls(torch_model_from_checkpoint(checkpoint, dtype, attention))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], dtype: str, attention: str, device: str = "cpu") -> TorchRunner:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device(device):  # initialised where it runs: an 8B model never crosses the bus
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf), dtype=getattr(torch, dtype),
                                                     attn_implementation=attention)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the peak this model reaches, not an earlier one's
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
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=0, eos_token_id=None, stopping_criteria=StoppingCriteriaList([Clock()]))
        assert len(stamps) == new_tokens, (len(stamps), new_tokens)
        return stamps[0] - t0, (new_tokens - 1) / (stamps[-1] - stamps[0])
