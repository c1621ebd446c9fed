"""Shared fixtures of the decoding tests."""

import pytest
from flax import nnx

from medusa_files import random_v2_heads
from medusa_jax.decoding.decoder import Decoder
from medusa_jax.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tiny():
  """(config, a tiny random Llama, random V2 heads with 3 heads, their Decoder)."""
  cfg = LlamaConfig.tiny(eos_token_ids=())
  llama = Llama(cfg, rngs=nnx.Rngs(11))
  heads = random_v2_heads(cfg, 3, seed=5)
  return cfg, llama, heads, Decoder(llama, heads)
