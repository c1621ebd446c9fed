"""The medusa-jax command line: one parser, one module per command."""
