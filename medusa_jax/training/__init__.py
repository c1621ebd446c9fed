"""Medusa head training: data (ShareGPT, self-distillation) and the optax/orbax loop."""
