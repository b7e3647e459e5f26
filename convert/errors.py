"""The one exception type the converter raises for bad input."""

from coreinfer_jax.errors import CoreInferError


class ConversionError(CoreInferError):
    """A source checkpoint that cannot be converted; the message names the file or tensor."""
