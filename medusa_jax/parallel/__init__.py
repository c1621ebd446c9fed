"""Mesh primitives: make_mesh, partition rules, placement."""
