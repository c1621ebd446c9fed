"""Head training: learning a synthetic pattern, exact resume, export round trip,
self-distillation against a naive reference (tiny random Llama)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medusa_jax.adapters.weights import load_medusa_adapter
from medusa_jax.decoding.tree import build_tree
from medusa_jax.errors import ConfigError
from medusa_jax.models.llama import KVCache, Llama, LlamaConfig, causal_mask
from medusa_jax.training.config import TrainConfig
from medusa_jax.training.data import Prompt
from medusa_jax.training.distill import greedy_generate, hidden_rows, lm_head_weight, make_examples
from medusa_jax.training.losses import IGNORE, medusa_targets
from medusa_jax.training.pipeline import export
from medusa_jax.training.train import TokenRows, batch_indices, evaluate, fit, head_logits

V, H, N = 48, 32, 3


def _task(seed):
  """Hidden state = a noisy embedding of token t; head k's target is a fixed
  function of token t, so the heads can learn it."""
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(V, H)).astype(np.float32)
  lm_head = (rng.normal(size=(V, H)) / np.sqrt(H)).astype(np.float32)

  def rows(r):
    tok = rng.integers(0, V, r)
    tgt = np.stack([(tok * (2 * k + 3) + k + 1) % V for k in range(N)], 1).astype(np.int32)
    tgt[rng.random((r, N)) < 0.1] = IGNORE
    h = table[tok] + 0.05 * rng.normal(size=(r, H)).astype(np.float32)
    return TokenRows(hidden=h, targets=tgt)

  return rows(2048), rows(256), lm_head


def _cfg(**kw):
  base = {"name": "t", "num_heads": N, "batch_rows": 64, "steps": 60, "warmup_steps": 5,
          "learning_rate": 3e-2, "eval_every": 30, "log_every": 10, "checkpoint_every": 20,
          "max_rank": 5, "tree_nodes": 7}
  base.update(kw)
  return TrainConfig(**base)


def test_fit_learns_pattern_and_logs(tmp_path):
  train, val, lm_head = _task(np.random.default_rng().integers(1 << 30))
  cfg = _cfg()
  res = fit(cfg, train, val, lm_head, tmp_path, progress=False, log=lambda m: None)
  first, last = res.losses[1], res.losses[cfg.steps]
  assert last < 0.3 * first
  top1 = res.accuracy.topk_acc[:, 0]
  assert np.all(top1 > 0.5), top1  # chance is 1/48
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [30, 60]
  assert len(evals[-1]["top1"]) == N and len(evals[-1]["top5"]) == N
  assert [r["step"] for r in records if r["kind"] == "train"] == list(range(10, 61, 10))
  # the final validation numbers agree with a fresh evaluation of the model
  acc, _ = evaluate(res.model, val, lm_head, cfg)
  np.testing.assert_allclose(acc.topk_acc, res.accuracy.topk_acc)


def test_resume_reproduces_uninterrupted_curve(tmp_path):
  train, _, lm_head = _task(np.random.default_rng().integers(1 << 30))
  cfg = _cfg(steps=40, eval_every=40, checkpoint_every=10)
  quiet = {"progress": False, "log": lambda m: None}
  full = fit(cfg, train, None, lm_head, tmp_path / "a", **quiet)
  part = fit(cfg, train, None, lm_head, tmp_path / "b", stop_after=20, **quiet)
  assert sorted(part.losses) == list(range(1, 21))
  rest = fit(cfg, train, None, lm_head, tmp_path / "b", **quiet)
  assert rest.start_step == 20
  assert sorted(rest.losses) == list(range(21, 41))
  for s in range(1, 41):
    got = part.losses.get(s, rest.losses.get(s))
    assert got == full.losses[s], (s, got, full.losses[s])
  a = jax.tree.leaves(nnx.state(full.model, nnx.Param))
  b = jax.tree.leaves(nnx.state(rest.model, nnx.Param))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_batch_indices_deterministic_permutation():
  rows, b = 103, 10
  epoch0 = np.concatenate([batch_indices(s, rows, b, 7) for s in range(10)])
  assert len(set(epoch0.tolist())) == 100  # one permutation, remainder skipped
  np.testing.assert_array_equal(batch_indices(13, rows, b, 7), batch_indices(13, rows, b, 7))
  assert not np.array_equal(batch_indices(3, rows, b, 7), batch_indices(13, rows, b, 7))
  with pytest.raises(ConfigError, match="batch_rows=200"):
    batch_indices(0, rows, 200, 0)


@pytest.mark.parametrize("kind,dtype", [("v2", "bfloat16"), ("v1", "float32")])
def test_export_round_trip_identical_outputs(tmp_path, kind, dtype):
  train, val, lm_head = _task(np.random.default_rng().integers(1 << 30))
  cfg = _cfg(head_kind=kind, compute_dtype=dtype, steps=12, eval_every=12, checkpoint_every=12)
  res = fit(cfg, train, val, lm_head, tmp_path / "w", progress=False, log=lambda m: None)
  assert res.losses[12] < 0.8 * res.losses[1]
  out = export(cfg, res.model, str(tmp_path / "heads"), accuracy=res.accuracy,
               recipe={"note": "test"})
  loaded = load_medusa_adapter(out)
  assert loaded.is_v2 == (kind == "v2")
  x = jnp.asarray(np.random.default_rng().normal(size=(5, H)), jnp.float32)
  lm = lambda h: jnp.einsum("...h,vh->...v", h, jnp.asarray(lm_head))
  want = head_logits(res.model, x, jnp.asarray(lm_head), jnp.float32)
  _, spec = loaded.model(x, lm)
  np.testing.assert_array_equal(np.asarray(spec), np.asarray(want))
  choices = json.loads((tmp_path / "heads" / "medusa_choices.json").read_text())
  tree = build_tree(choices)
  assert tree.num_nodes == cfg.tree_nodes + 1 and tree.depth <= N
  assert json.loads((tmp_path / "heads" / "recipe.json").read_text()) == {"note": "test"}


def test_fit_rejects_bad_shapes(tmp_path):
  train, _, lm_head = _task(0)
  with pytest.raises(ConfigError, match="expected 4 heads"):
    fit(_cfg(num_heads=4), train, None, lm_head, tmp_path, progress=False)
  with pytest.raises(ConfigError, match="lm_head"):
    fit(_cfg(), train, None, lm_head[:, :5], tmp_path, progress=False)
  with pytest.raises(ConfigError, match="multiple of the 8 devices"):
    fit(_cfg(batch_rows=60), train, None, lm_head, tmp_path, progress=False)
  with pytest.raises(ConfigError, match="TokenRows"):
    TokenRows(hidden=np.zeros((3, 2)), targets=np.zeros((4, 1), np.int32))


@nnx.jit
def _forward_padded(model, tokens_1xS):
  length = tokens_1xS.shape[1]
  z = jnp.zeros((1,), jnp.int32)
  h, _ = model(tokens_1xS, jnp.arange(length, dtype=jnp.int32)[None],
               KVCache.init(model.cfg, 1, length), z, causal_mask(z, length, length))
  return h[0], model.lm_head(h[0])


def _full_forward(model, ids, length=16):
  """Hidden states and logits of ``ids`` from one causal forward over a fresh
  cache; padding after the sequence (invisible to it) keeps one shape."""
  s = len(ids)
  h, logits = _forward_padded(model, jnp.asarray([list(ids) + [0] * (length - s)], jnp.int32))
  return np.asarray(h[:s]), np.asarray(logits[:s])


def _ref_greedy(model, prompt, n, eos):
  """Greedy decoding by re-running the whole sequence for every token."""
  seq, out = list(prompt), []
  for _ in range(n):
    _, logits = _full_forward(model, seq)
    nxt = int(np.argmax(logits[-1]))
    out.append(nxt)
    seq.append(nxt)
    if nxt == eos:
      break
  return out


def test_self_distillation_matches_naive_greedy_and_forward():
  rng = np.random.default_rng()
  cfg = LlamaConfig.tiny()
  model = Llama(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  prompts = [[int(t) for t in rng.integers(3, cfg.vocab_size, rng.integers(2, 9))]
             for _ in range(3)]
  answers = greedy_generate(model, prompts, max_new_tokens=5, batch_size=2, eos_ids=[2],
                            length_bucket=8)
  ps = [Prompt(conv_id=str(i), text="", ids=tuple(p), split="train") for i, p in
        enumerate(prompts)]
  examples = make_examples(ps, answers)
  hidden_ref = {}
  for p, a, ex in zip(prompts, answers, examples):
    assert a == _ref_greedy(model, p, 5, 2)
    hidden_ref[ex.ids] = _full_forward(model, ex.ids)[0]
  rows = hidden_rows(model, examples, num_heads=2, batch_size=3, dtype=np.float32,
                     length_bucket=8)
  # every kept row matches the per-example forward and the target rule
  want_h, want_t = [], []
  for ex in sorted(examples, key=lambda e: len(e.ids)):
    tgt = medusa_targets(np.asarray(ex.ids), ex.loss_mask, 2)
    keep = (tgt != IGNORE).any(-1)
    want_h.append(hidden_ref[ex.ids][keep])
    want_t.append(tgt[keep])
  np.testing.assert_allclose(rows.hidden, np.concatenate(want_h), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(rows.targets, np.concatenate(want_t))
  np.testing.assert_array_equal(lm_head_weight(model), np.asarray(model.lm_head_kernel[...]).T)
