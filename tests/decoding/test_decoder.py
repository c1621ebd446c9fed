"""The Decoder: split once, jitted once per shape and config, state donated, rows routed."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_model
from medusa_files import head_tensors, ref_heads_hidden, random_v2_heads
from step_cases import CACHE, CONFIG, forward_all, prefill
from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter
from medusa_jax.decoding.decoder import Decoder
from medusa_jax.decoding.engine import Engine
from medusa_jax.decoding.state import DecodeState
from medusa_jax.heads.routed import BatchMedusaWeights
from medusa_jax.models.llama_weights import load_llama
from medusa_jax.models.tokenizer import Tokenizer

def _hidden(llama, tokens):
  """Hidden states [T, H] of one row run from scratch."""
  return forward_all(llama, tokens)[0]


def test_no_recompilation_for_the_same_bucket(tiny):
  cfg, _, _, dec = tiny
  rng = np.random.default_rng(6)

  def run(lengths):
    state, _ = prefill(dec, [list(rng.integers(3, cfg.vocab_size, size=n)) for n in lengths])
    for _ in range(2):
      state, _ = dec.step(state, config=CONFIG)

  run([3])
  traced = dict(dec.trace_counts)
  assert traced["prefill"] >= 1 and traced["speculative"] >= 1
  run([9, 2, 5])  # other prompt lengths and batch size, same buckets
  assert dict(dec.trace_counts) == traced




def test_decode_step_routes_rows_through_batch_medusa_weights(tiny):
  cfg, llama, heads, _ = tiny
  other = random_v2_heads(cfg, 3, seed=21)
  weights = {0: MedusaWeights(heads.config, heads), 2: MedusaWeights(other.config, other)}
  adapter_ids = [2, 0, 2]
  batch = BatchMedusaWeights.load(weights, adapter_ids, backend="reference")
  dec = Decoder(llama, batch)
  rng = np.random.default_rng(8)
  rows = len(adapter_ids)
  state = DecodeState(
      cache=dec.init_cache(rows, CACHE, jnp.float32), lengths=jnp.zeros((rows,), jnp.int32),
      tokens=jnp.asarray(rng.integers(3, cfg.vocab_size, size=(rows, 1)), jnp.int32),
      generated=jnp.zeros((rows,), jnp.int32), max_new=jnp.full((rows,), 4, jnp.int32),
      done=jnp.zeros((rows,), bool), rng=jax.random.PRNGKey(0))
  fed = np.asarray(state.tokens[:, 0])
  logits, draft, _ = dec.decode_step(state)
  for b, adapter in enumerate(adapter_ids):
    hidden = _hidden(llama, [int(fed[b])])
    own = other if adapter == 2 else heads
    want_logits, want_draft = own(hidden[-1:], llama.lm_head)
    np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(want_logits[0]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(draft[b]), np.asarray(want_draft[0]),
                               rtol=1e-5, atol=1e-5)


def test_jitted_steps_take_their_arguments_by_name(tiny):
  """The jitted functions' real signatures name ``state``/``cache`` (donated) and ``config``
  (static): no signature rewriting, and the donated state is consumed."""
  cfg, _, _, dec = tiny
  for fn, names in ((dec._plain, ("param_leaves", "state", "config")),
                    (dec._spec, ("param_leaves", "state", "config")),
                    (dec._lorax, ("param_leaves", "state")),
                    (dec._prefill_forward, ("param_leaves", "cache", "prompt", "prompt_lens"))):
    assert tuple(inspect.signature(fn).parameters) == names
    assert not hasattr(fn.__wrapped__ if hasattr(fn, "__wrapped__") else fn, "__signature__")
  rng = np.random.default_rng(9)
  state, _ = prefill(dec, [list(rng.integers(3, cfg.vocab_size, size=5))])
  old_k = state.cache.k[0]
  new_state, _ = dec.step(state, config=CONFIG)
  assert old_k.is_deleted()  # DONATES state: the cache was updated in place
  assert not new_state.cache.k[0].is_deleted()


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
  """A tiny Llama directory, two adapters of random heads, and their float64 tensors."""
  root = tmp_path_factory.mktemp("two_adapters")
  cfg = tiny_model.make_tiny_llama_dir(root / "model", seed=12)
  hidden = cfg["hidden_size"]
  dirs, tensors = [], []
  for seed in (13, 14):
    d = tiny_model.make_tiny_adapter_dir(root / f"adapter{seed}", hidden=hidden, num_heads=2,
                                         seed=seed)
    dirs.append(d)
    tensors.append(head_tensors(np.random.default_rng(seed), n=2, hidden=hidden))
  llama = load_llama(root / "model", dtype=jnp.float32)
  tok = Tokenizer.from_file(root / "model")
  weights = [load_medusa_adapter(d) for d in dirs]
  return llama, tok, weights, tensors


def _lorax_state(dec, tokens_B, slot_B=None):
  rows = len(tokens_B)
  return DecodeState(
      cache=dec.init_cache(rows, CACHE, jnp.float32), lengths=jnp.zeros((rows,), jnp.int32),
      tokens=jnp.asarray(np.asarray(tokens_B, np.int32)[:, None]),
      generated=jnp.zeros((rows,), jnp.int32), max_new=jnp.full((rows,), 4, jnp.int32),
      done=jnp.zeros((rows,), bool), rng=jax.random.PRNGKey(0),
      adapter_slot=None if slot_B is None else jnp.asarray(slot_B, jnp.int32))


def test_decode_step_on_an_engine_with_several_adapters_equals_each_row_alone(two_adapters):
  """Two rows, two adapters, one LoRAX step: each row's drafts are its own adapter's (float64
  reference), equal to the row run alone, and the mix swaps with the slots."""
  llama, tok, (w0, w1), tensors = two_adapters
  eng = Engine(llama, tok, {0: w0, 1: w1}, max_cache_len=CACHE)
  rng = np.random.default_rng(15)
  fed = rng.integers(3, llama.cfg.vocab_size, size=2)
  slots = [eng.adapter_slots[0], eng.adapter_slots[1]]
  assert slots[0] != slots[1]
  logits, draft, new_state = eng.decoder.decode_step(_lorax_state(eng.decoder, fed, slots))
  assert draft is not None and draft.shape == (2, 2, llama.cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(new_state.lengths), [1, 1])
  embed = np.asarray(llama.embed_tokens[...], np.float64)  # tied LM head [V, H]
  for b, adapter in enumerate((0, 1)):
    x = np.asarray(_hidden(llama, [int(fed[b])])[-1:], np.float64)
    want = ref_heads_hidden(x, tensors[adapter], 2) @ embed.T  # [1, n, V]
    np.testing.assert_allclose(np.asarray(draft[b]), want[0], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(logits[b]), (x @ embed.T)[0], rtol=2e-4, atol=2e-4)
    alone = Engine(llama, tok, (w0, w1)[adapter], max_cache_len=CACHE)
    a_logits, a_draft, _ = alone.decoder.decode_step(_lorax_state(alone.decoder, fed[b:b + 1]))
    np.testing.assert_allclose(np.asarray(draft[b]), np.asarray(a_draft[0]), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(a_logits[0]), rtol=1e-5,
                               atol=1e-5)
    row, row_draft, _ = eng.decoder.decode_step(
        _lorax_state(eng.decoder, fed[b:b + 1], slots[b:b + 1]))
    np.testing.assert_allclose(np.asarray(row_draft[0]), np.asarray(draft[b]), rtol=1e-5,
                               atol=1e-5)
  swapped = eng.decoder.decode_step(_lorax_state(eng.decoder, fed, slots[::-1]))[1]
  assert not np.allclose(np.asarray(swapped), np.asarray(draft), atol=1e-3)
  np.testing.assert_allclose(np.asarray(swapped[0]), np.asarray(
      eng.decoder.decode_step(_lorax_state(eng.decoder, fed[:1], slots[1:]))[1][0]),
      rtol=1e-5, atol=1e-5)
