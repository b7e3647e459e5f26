"""The model: configuration, parameter tree, forward pass, checkpoints, and the Flax NNX face."""
