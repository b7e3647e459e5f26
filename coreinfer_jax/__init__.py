"""coreinfer-jax: CoreInfer sentence-level core-neuron sparse decoding in JAX.

Packages, bottom up: `models` (config, param tree, forward, checkpoints, the Flax NNX face),
`sparse` (selection rules and the decoding methods), `runtime` (compiled programs, the
`Generator`, memory-limited mode), `evaluation` (tasks, metrics, eval, sweep, lm-eval),
`calibrate` (fitting calibrations and budgets to data), `tools` (command line, bench, roofline).
"""

from coreinfer_jax.calibrate.similarity import calibrate
from coreinfer_jax.errors import CoreInferError, InputError, MethodError
from coreinfer_jax.models.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from coreinfer_jax.models.config import ModelConfig
from coreinfer_jax.models.nnx import CausalLM, train_step
from coreinfer_jax.runtime.compile_cache import use_compile_cache
from coreinfer_jax.runtime.generator import GenerationResult, Generator
from coreinfer_jax.runtime.sampling import Sampling
from coreinfer_jax.sparse.calibration import Calibration
from coreinfer_jax.sparse.hybrid import Hybrid
from coreinfer_jax.sparse.method import Dense, Method, default_layer_range
from coreinfer_jax.sparse.predictor import Predictor
from coreinfer_jax.sparse.registry import make_method
from coreinfer_jax.sparse.selection import select_core_neurons
from coreinfer_jax.sparse.similarity import Similarity
from coreinfer_jax.sparse.stability import Stability

__all__ = [
    "Calibration", "CausalLM", "CoreInferError", "DEFAULT_CHECKPOINT", "Dense", "GenerationResult", "Generator",
    "Hybrid", "InputError", "Method", "MethodError", "ModelConfig", "Predictor", "Sampling", "Similarity",
    "Stability", "calibrate", "default_layer_range", "load_checkpoint", "make_method", "select_core_neurons",
    "train_step", "use_compile_cache",
]
