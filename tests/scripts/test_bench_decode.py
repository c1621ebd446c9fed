"""scripts/bench_decode.py's stage-by-stage timing: its prefixes run the speculative step's own
pieces, so the last one leaves the cache the step leaves, and every prefix is timed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.decoding import step as step_mod
from medusa_jax.decoding.decoder import Decoder
from medusa_jax.decoding.state import StepConfig
from medusa_jax.decoding.strategies import Greedy
from medusa_jax.decoding.tree import MC_SIM_7B_63, _closed_prefix, build_tree
from script_modules import load_script

bench_decode = load_script("bench_decode")


@pytest.mark.parametrize("compact_kernel", [False, True])
def test_stage_prefixes_leave_the_steps_cache_and_are_all_timed(compact_kernel):
  cfg = bench_decode._smollm2_config(tiny=True)
  llama, medusa = bench_decode._build(cfg, jnp.float32, 3, seed=int(
      np.random.default_rng().integers(1 << 20)), compact_kernel=compact_kernel)
  dec = Decoder(llama, medusa.model)
  config = StepConfig(tree=build_tree(_closed_prefix(MC_SIM_7B_63, 6)), strategy=Greedy(),
                      eos_ids=())
  new = lambda: bench_decode._start_state(dec, cfg, 2, 64, 9, config, jnp.float32, 0)  # noqa: E731
  want, _ = jax.jit(lambda p, s: step_mod.speculative_step(dec.graphs, p, s, config=config))(
      dec.params, new())
  prefix = bench_decode._stage_prefix(dec, config)
  for upto in bench_decode.STAGES:
    cache, acc = jax.jit(prefix, static_argnums=2)(dec.params, new(), upto)
    assert np.isfinite(float(acc))
  for got, ref in zip(jax.tree.leaves(cache), jax.tree.leaves(want.cache)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  times = bench_decode._time_stages(dec, new(), config, steps=2, repeats=1)
  assert list(times) == [*bench_decode.STAGES, "step"]
  assert all(t > 0 for t in times.values())
