"""Decoding: tree buffers, acceptance rules, the jitted decode step and the engine."""
