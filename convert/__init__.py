"""`python -m convert`: Hugging Face / GGUF checkpoints -> this project's Orbax checkpoints."""

from convert.core import DTYPES, convert_checkpoint, convert_tensors
from convert.errors import ConversionError
from convert.export import torch_model_from_checkpoint, torch_state_dict
from convert.sources import BUNDLED, GEMMA3

__all__ = ["BUNDLED", "DTYPES", "GEMMA3", "ConversionError", "convert_checkpoint", "convert_tensors",
           "torch_model_from_checkpoint", "torch_state_dict"]
