"""Medusa adapters on disk: key layout, files, I/O, MedusaWeights, the registry, segments, conversion."""
