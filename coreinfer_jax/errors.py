"""The project's own error types: bad input a user can fix, reported as one line.

Every error a user's input can cause (a prompt, a setting, a path, a file) is a
`CoreInferError`; the command line prints those as one `error:` line and lets anything else
(a bug, here or in JAX) show its traceback. They subclass ValueError, so callers that catch
ValueError keep working.
"""


class CoreInferError(ValueError):
    """Input this project cannot serve, with a message that names the problem."""


class InputError(CoreInferError):
    """A prompt, token ids or a generation setting this model cannot serve."""


class MethodError(CoreInferError):
    """A decoding method's settings that are out of range or do not fit the model."""
