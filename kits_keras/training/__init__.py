"""Training: ``fit`` and its callbacks, the jitted JAX step, validation."""
