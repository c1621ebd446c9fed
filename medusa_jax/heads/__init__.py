"""Medusa heads: the one Heads interface, V1/V2 modules, routed and sharded variants."""
