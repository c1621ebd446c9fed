"""scripts/kernel_trace.py: the per-kernel sums of a trace, on synthetic events and on a real
CPU trace of a jitted loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from script_modules import load_script

kernel_trace = load_script("kernel_trace")


def test_summarize_sums_per_op_kind_and_name_and_counts_overlaps_once():
  rng = np.random.default_rng()
  per = int(rng.integers(1, 5))
  events = [  # (line, op, kernel name, start ns, duration ns)
      ("s1", "loop_add_fusion.3", "loop_add_fusion_3", 0, 2000),
      ("s1", "loop_add_fusion.7", "loop_add_fusion_7", 1000, 2000),   # overlaps the first
      ("s2", "command_buffer_5", "decode_attention", 10_000, 4000),
      ("s2", "command_buffer_5", "gemm_fusion_dot.2", 20_000, 1000),
  ]
  got = kernel_trace.summarize(events, per=per)
  assert got["kernels"] == round(4 / per, 2)
  assert got["busy_us"] == round((3000 + 4000 + 1000) / 1e3 / per, 3)   # union: 0-3 us once
  assert got["span_us"] == round(21.0 / per, 3)
  assert got["kinds"]["loop_add_fusion"] == [round(2 / per, 2), round(4.0 / per, 3)]
  assert got["kinds"]["command_buffer_5"] == [round(2 / per, 2), round(5.0 / per, 3)]
  assert got["names"]["loop_add_fusion"] == [round(2 / per, 2), round(4.0 / per, 3)]
  assert got["names"]["decode_attention"] == [round(1 / per, 2), round(4.0 / per, 3)]
  assert got["names"]["gemm_fusion_dot"] == [round(1 / per, 2), round(1.0 / per, 3)]
  assert list(got["names"])[0] == "loop_add_fusion"  # largest first
  assert got["lines"] == ["s1", "s2"]
  assert kernel_trace.summarize([], per=per)["kernels"] == 0


def test_op_kind_strips_only_numeric_suffixes():
  assert kernel_trace.op_kind("loop_add_fusion.12") == "loop_add_fusion"
  assert kernel_trace.op_kind("custom-call.3.1") == "custom-call"
  assert kernel_trace.op_kind("gemm_fusion") == "gemm_fusion"


def test_trace_of_a_cpu_loop_finds_its_ops_without_the_loop_itself():
  steps = 3

  @jax.jit
  def many(x):
    return jax.lax.fori_loop(0, steps, lambda i, x: jnp.tanh(x @ x.T) + 1.0, x)

  x = jnp.asarray(np.random.default_rng().standard_normal((64, 64)), jnp.float32)
  many(x).block_until_ready()
  got = kernel_trace.trace(lambda: many(x).block_until_ready(), per=steps)
  assert got["kernels"] > 0 and got["busy_us"] > 0 and got["span_us"] >= got["busy_us"]
  assert not set(got["kinds"]) & kernel_trace.CONTAINERS
