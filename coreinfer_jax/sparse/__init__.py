"""Core-neuron selection and the decoding methods (the method protocol, dense, stability, similarity)."""
