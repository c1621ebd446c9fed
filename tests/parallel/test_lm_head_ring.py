"""The RING collective matmul of V2 heads + a vocabulary-split LM head (heads/sharded.py).

Every case compares with a float64 NumPy forward of LoRAX's MedusaV2 and with
the all-gather path. CPU collectives are synchronous, so the overlap itself is
not observable here: the HLO test checks the pattern that lets a GPU backend
overlap (no all-gather; product k waits for k ring transfers only), and
``scripts/bench_sharded.py`` measures it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import ShardingError
from medusa_jax.heads.modules import MedusaModel
from medusa_jax.heads.protocol import LinearLMHead
from medusa_jax.heads.sharded import (HeadsSharding, LMHeadCollective, ring_applies,
                                      v2_heads_logits, vocab_parallel_lm_head)
from medusa_jax.parallel.mesh import make_mesh, place

RING_MESHES = [(1, 2), (1, 4), (1, 8), (2, 4)]


def _mesh(data, model):
  return make_mesh(data, model, devices=jax.devices()[:data * model])


def _heads(rng, hidden, n, dtype=jnp.float32):
  cfg = MedusaConfig(base_model_name_or_path="test", medusa_num_heads=n, medusa_num_layers=1,
                     version=2.0)
  model = MedusaModel(cfg, hidden, rngs=nnx.Rngs(0), param_dtype=dtype)
  model.medusa.kernel[...] = jnp.asarray(rng.standard_normal((hidden, n, hidden)) * 0.3, dtype)
  model.medusa.bias[...] = jnp.asarray(rng.standard_normal((n, hidden)), dtype)
  return model


def _reference(x, kernel_hnh, bias_nh, lm_hv, drafts):
  """float64 LoRAX MedusaV2: (logits [N, V], drafts [N, D, V])."""
  x, k, b, lm = (np.asarray(a, np.float64) for a in (x, kernel_hnh, bias_nh, lm_hv))
  y = np.einsum("rh,hkm->rkm", x, k) + b[None]
  h = x[:, None, :] + y / (1.0 + np.exp(-y))
  logits = np.concatenate([x[:, None, :], h[:, :drafts]], axis=1) @ lm
  return logits[:, 0], logits[:, 1:]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _jitted(model, drafts):
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, lm_head, x):
    return nnx.merge(graphdef, state).logits_and_drafts(x, lm_head, drafts)

  return fwd, state


@pytest.mark.parametrize("data,model", RING_MESHES)
def test_ring_matches_float64_and_the_all_gather_path(data, model):
  rng = np.random.default_rng(100 + 10 * data + model)
  hidden, vocab, n, rows = 16, 64, 3, 4 * data
  mesh = _mesh(data, model)
  heads = _heads(rng, hidden, n)
  lm = rng.standard_normal((hidden, vocab)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32)
  lm_head = vocab_parallel_lm_head(place(lm, P(None, "model"), mesh))
  assert isinstance(lm_head, LinearLMHead) and ring_applies(lm_head, hidden, mesh)
  ring = heads.shard(mesh)
  assert ring.medusa.shd.lm_head_collective is LMHeadCollective.RING  # the default
  gather = heads.shard(mesh, lm_head_collective="all_gather")
  drafts = 2 if model == 4 else n  # heads past D skip the LM head
  want = _reference(x, heads.medusa.kernel[...], heads.medusa.bias[...], lm, drafts)
  fwd, state = _jitted(ring, drafts)
  got = fwd(state, lm_head, x)
  fwd_g, state_g = _jitted(gather, drafts)
  ref = fwd_g(state_g, lm_head, x)
  for g, r, w in zip(got, ref, want):
    assert g.shape == w.shape
    assert _rel(g, w) < 1e-5
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
  assert got[1].sharding.spec[-1] == "model"  # logits stay split over V
  if model == 2:  # unjitted too (an eager shard_map)
    eager = ring.logits_and_drafts(x, lm_head, drafts)
    assert _rel(eager[0], want[0]) < 1e-5 and _rel(eager[1], want[1]) < 1e-5


@settings(max_examples=4, deadline=None)
@given(width=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), n=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_ring_property_random_shapes(width, rows, n, seed):
  rng = np.random.default_rng(seed)
  hidden, vocab = 2 * width, 3 * width
  mesh = _mesh(1, width)
  kernel = rng.standard_normal((hidden, n, hidden)).astype(np.float32) * 0.3
  bias = rng.standard_normal((n, hidden)).astype(np.float32)
  lm = rng.standard_normal((hidden, vocab)).astype(np.float32)
  x = rng.standard_normal((rows, hidden)).astype(np.float32)
  fwd = jax.jit(lambda x, k, b, w: v2_heads_logits(x, k, b, w, mesh=mesh))
  got = fwd(jnp.asarray(x), place(kernel, P(None, None, "model"), mesh),
            place(bias, P(None, "model"), mesh),
            LinearLMHead(weight=place(lm, P(None, "model"), mesh)))
  for g, w in zip(got, _reference(x, kernel, bias, lm, n)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_ring_bf16_and_tied_embedding():
  rng = np.random.default_rng(120)
  hidden, vocab, n = 32, 64, 4
  mesh = _mesh(2, 4)
  heads = _heads(rng, hidden, n, dtype=jnp.bfloat16)
  emb = rng.standard_normal((vocab, hidden)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((6, hidden)), jnp.bfloat16)
  lm_head = vocab_parallel_lm_head(place(emb, P("model", None), mesh, dtype=jnp.bfloat16),
                                   transposed=True)
  fwd, state = _jitted(heads.shard(mesh), n)
  logits, drafts = fwd(state, lm_head, x)
  assert logits.dtype == drafts.dtype == jnp.float32
  as_f32 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32))  # noqa: E731
  want = _reference(as_f32(x), as_f32(heads.medusa.kernel[...]), as_f32(heads.medusa.bias[...]),
                    as_f32(jnp.asarray(emb, jnp.bfloat16)).T, n)
  assert _rel(logits, want[0]) < 1e-2 and _rel(drafts, want[1]) < 1e-2
  fwd_g, state_g = _jitted(heads.shard(mesh, lm_head_collective="all_gather"), n)
  ref = fwd_g(state_g, lm_head, x)
  # Same bf16 inputs to every product; only the f32 summation order differs.
  assert _rel(drafts, ref[1]) < 1e-5 and _rel(logits, ref[0]) < 1e-5


def _instructions(hlo_text, holding="collective-permute"):
  """name -> (opcode, operand names, op_name) for the instructions of the HLO
  computation holding a ``holding`` op (the entry when none does)."""
  pattern = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\((.*)$")
  computations, current = [], None
  for line in hlo_text.splitlines():
    if line.rstrip().endswith("{") and " = " not in line:  # a computation starts
      current = {}
      computations.append((line.startswith("ENTRY"), current))
      continue
    m = pattern.match(line)
    if m and current is not None:
      name, opcode, rest = m.groups()
      op_name = re.search(r'op_name="([^"]*)"', rest)
      operands = re.findall(r"%([\w.\-]+)", rest.split("calls=")[0].split("metadata=")[0])
      current[name] = (opcode, operands, op_name.group(1) if op_name else "")
  for _, comp in computations:
    if any(g[0] == holding for g in comp.values()):
      return comp
  return next(comp for entry, comp in computations if entry)


def _ancestors(graph, name, seen=None):
  seen = set() if seen is None else seen
  for operand in graph.get(name, ((), ()))[1]:
    if operand not in seen:
      seen.add(operand)
      _ancestors(graph, operand, seen)
  return seen


def test_ring_hlo_has_no_all_gather_and_product_k_waits_for_k_transfers():
  rng = np.random.default_rng(130)
  width, hidden, vocab, n, rows = 4, 16, 64, 3, 4
  mesh = _mesh(1, width)
  heads = _heads(rng, hidden, n).shard(mesh)
  lm_head = vocab_parallel_lm_head(
      place(rng.standard_normal((hidden, vocab)).astype(np.float32), P(None, "model"), mesh))
  x = jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32)
  fwd, state = _jitted(heads, n)
  text = fwd.lower(state, lm_head, x).compile().as_text()
  graph = _instructions(text)
  ops = [g[0] for g in graph.values()]
  assert "all-gather" not in ops and "all-reduce" not in ops
  permutes = {k for k, g in graph.items() if g[0] == "collective-permute"}
  assert len(permutes) == width - 1
  for k in permutes:  # what travels is a block of the heads' hidden [N, n, H/W], not logits
    assert f"f32[{rows},{n},{hidden // width}]" in text.split(f"%{k} = ")[1].split(" ")[0]
  # The LM head runs as W block products ("rkh,hv->rkv"), whatever fusion holds them.
  products = [k for k, g in graph.items() if "rkh,hv->rkv/dot_general" in g[2]]
  waits = sorted(len(_ancestors(graph, k) & permutes) for k in products)
  assert waits == list(range(width))  # the first needs no transfer, the last needs all


def test_all_gather_option_keeps_one_all_gather():
  rng = np.random.default_rng(131)
  mesh = _mesh(1, 8)
  heads = _heads(rng, 16, 4).shard(mesh, lm_head_collective=LMHeadCollective.ALL_GATHER)
  lm_head = vocab_parallel_lm_head(
      place(rng.standard_normal((16, 64)).astype(np.float32), P(None, "model"), mesh))
  x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
  fwd, state = _jitted(heads, 4)
  text = fwd.lower(state, lm_head, x).compile().as_text()
  ops = [g[0] for g in _instructions(text, holding="all-gather").values()]
  assert ops.count("all-gather") == 1 and "collective-permute" not in ops


def test_ring_falls_back_where_it_cannot_apply():
  rng = np.random.default_rng(132)
  hidden, n = 16, 2
  mesh = _mesh(1, 4)
  heads = _heads(rng, hidden, n)
  ring = heads.shard(mesh)
  x = jnp.asarray(rng.standard_normal((3, hidden)), jnp.float32)
  odd = rng.standard_normal((hidden, 30)).astype(np.float32)  # V = 30 does not divide 4
  lm = rng.standard_normal((hidden, 32)).astype(np.float32)
  closure = lambda h: jnp.einsum("...h,hv->...v", h, lm)  # noqa: E731  (no weight in sight)
  assert not ring_applies(LinearLMHead(weight=jnp.asarray(odd)), hidden, mesh)
  assert not ring_applies(closure, hidden, mesh)
  assert not ring_applies(LinearLMHead(weight=jnp.asarray(lm)), hidden, _mesh(4, 1))
  for lm_head, w in ((LinearLMHead(weight=jnp.asarray(odd)), odd), (closure, lm)):
    got = ring.logits_and_drafts(x, lm_head)
    want = _reference(x, heads.medusa.kernel[...], heads.medusa.bias[...], w, n)
    assert _rel(got[0], want[0]) < 1e-5 and _rel(got[1], want[1]) < 1e-5
  with pytest.raises(ShardingError, match="lm_head_collective='ring2'; expected one of "
                                          "all_gather, ring"):
    heads.shard(mesh, lm_head_collective="ring2")
  with pytest.raises(ShardingError, match=r"LM head \[H, V\]: dim 1 of size 30 is not divisible"):
    v2_heads_logits(x, ring.medusa.kernel[...], ring.medusa.bias[...],
                    LinearLMHead(weight=jnp.asarray(odd)), mesh=mesh)
  assert not HeadsSharding(lm_head_collective="all_gather").is_sharded
