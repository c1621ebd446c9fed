"""Shared cases of the decode-step tests: one tree and batch bucket, the prefill of a few
prompts, and a plain causal forward of one row as the reference."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.decoding.state import StepConfig
from medusa_jax.decoding.strategies import Greedy
from medusa_jax.decoding.tree import build_tree
from medusa_jax.models.llama import KVCache, causal_mask

CACHE = 32
# One tree and one batch bucket for every test, so the steps compile once.
# Nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (1,0).
TREE = build_tree([[0], [1], [0, 0], [1, 0]])
CONFIG = StepConfig(tree=TREE, strategy=Greedy())
ROWS = 4
REF_WIDTH = 16


def prefill(dec, prompts, config=CONFIG, max_new=20, rows=ROWS):
  """``dec.prefill`` of ``prompts`` (token lists) in a batch of ``rows``; the rest pad."""
  width = 16
  prompt = np.zeros((rows, width), np.int32)
  lens = np.ones((rows,), np.int32)
  done = np.ones((rows,), bool)
  for b, p in enumerate(prompts):
    prompt[b, :len(p)], lens[b], done[b] = p, len(p), False
  cache = dec.init_cache(rows, CACHE, jnp.float32)
  return dec.prefill(cache, jnp.asarray(prompt), jnp.asarray(lens),
                     jnp.full((rows,), max_new, jnp.int32), jnp.asarray(done),
                     jax.random.PRNGKey(0), config=config)


@jax.jit
def _reference_forward(graphdef, state, tokens_1xW):
  """Causal forward of one padded row from an empty cache (padding sits after the tokens)."""
  llama = nnx.merge(graphdef, state)
  cache = KVCache.init(llama.cfg, 1, CACHE, jnp.float32)
  idx = jnp.zeros((1,), jnp.int32)
  pos = jnp.arange(REF_WIDTH, dtype=jnp.int32)[None, :]
  hidden, cache = llama(tokens_1xW, pos, cache, idx, causal_mask(idx, REF_WIDTH, CACHE))
  return hidden[0], llama.lm_head(hidden[0]), cache


def forward_all(llama, tokens):
  """Hidden states [T, H], logits [T, V] and the cache of one row run from scratch."""
  padded = np.zeros((1, REF_WIDTH), np.int32)
  padded[0, :len(tokens)] = tokens
  graphdef, state = nnx.split(llama)
  hidden, logits, cache = _reference_forward(graphdef, state, jnp.asarray(padded))
  t = len(tokens)
  return hidden[:t], logits[:t], cache
