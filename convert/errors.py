"""The one exception type the converter raises for bad input."""


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file or tensor."""
