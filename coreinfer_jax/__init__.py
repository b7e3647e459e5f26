"""coreinfer-jax: CoreInfer sentence-level core-neuron sparse decoding in JAX."""

from coreinfer_jax.calibration import Calibration, calibrate
from coreinfer_jax.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from coreinfer_jax.config import ModelConfig
from coreinfer_jax.generator import GenerationResult, Generator, InputError
from coreinfer_jax.methods import Dense, Similarity, Stability, default_layer_range, make_method
from coreinfer_jax.sampling import Sampling
from coreinfer_jax.selection import select_core_neurons

__all__ = [
    "Calibration", "DEFAULT_CHECKPOINT", "Dense", "GenerationResult", "Generator", "InputError", "ModelConfig",
    "Sampling", "Similarity", "Stability", "calibrate", "default_layer_range", "load_checkpoint", "make_method",
    "select_core_neurons",
]
