"""nagjax: JAX/Flax NNX pretraining built around depth."""

__version__ = "0.1.0"
