"""Files shipped inside the package (imports nothing, so the CLI can name them without JAX)."""

import os

SMOLLM2_HEADS = os.path.join(os.path.dirname(__file__), "heads", "smollm2-135m-instruct")
"""The V2 heads trained for SmolLM2-135M-Instruct, with their ``medusa_choices.json`` tree."""
