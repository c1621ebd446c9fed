"""Medusa-2 self-distillation: the KL loss against float64 NumPy, the teacher top-K
storage (shift rule, one-pass rows equal to a second forward, save/load, a full disk)."""

import errno
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medusa_jax import _atomic
from medusa_jax.errors import ConfigError, WriteError
from medusa_jax.models.llama import Llama, LlamaConfig
from medusa_jax.training.config import LossKind, PromptTurns, TrainConfig
from medusa_jax.training.data import Prompt
from medusa_jax.training.distill import (
  generate_rows,
  hidden_rows,
  make_examples,
)
from medusa_jax.training.losses import (
  IGNORE,
  medusa_kl_loss,
  medusa_targets,
  per_head_kl,
  teacher_targets,
)
from medusa_jax.training.train import TokenRows, fit


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _ref_kl(logits, t_ids, t_logp, targets, decay):
  """Loop reference in float64: KL(renormalised teacher top-K || head softmax)."""
  r, n, _ = logits.shape
  logq = _log_softmax64(logits)
  head = np.zeros(n)
  for k in range(n):
    total, count = 0.0, 0
    for i in range(r):
      if targets[i, k] == IGNORE:
        continue
      logp = _log_softmax64(t_logp[i, k])
      total += float(np.sum(np.exp(logp) * (logp - logq[i, k, t_ids[i, k]])))
      count += 1
    head[k] = total / max(count, 1)
  return float(np.sum(decay ** np.arange(n) * head)), head


def _random_teacher(rng, r, n, k, v):
  ids = np.stack([[rng.choice(v, k, replace=False) for _ in range(n)] for _ in range(r)])
  logp = np.sort(_log_softmax64(rng.normal(size=(r, n, v)) * 3)[..., :k], -1)[..., ::-1]
  return ids.astype(np.int32), logp.astype(np.float16)


def test_kl_loss_matches_float64_reference():
  rng = np.random.default_rng()
  for _ in range(2):
    r, n, k, v = rng.integers(3, 12), rng.integers(1, 5), rng.integers(1, 9), 40
    logits = rng.normal(size=(r, n, v)).astype(np.float32) * 2
    t_ids, t_logp = _random_teacher(rng, r, n, k, v)
    targets = rng.integers(0, v, (r, n)).astype(np.int32)
    targets[rng.random((r, n)) < 0.3] = IGNORE
    decay = float(rng.uniform(0.5, 1.0))
    loss, head = medusa_kl_loss(jnp.asarray(logits), jnp.asarray(t_ids), jnp.asarray(t_logp),
                                jnp.asarray(targets), decay)
    want_loss, want_head = _ref_kl(logits, t_ids, t_logp.astype(np.float64), targets, decay)
    np.testing.assert_allclose(np.asarray(head), want_head, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    _, count = per_head_kl(jnp.asarray(logits), jnp.asarray(t_ids), jnp.asarray(t_logp),
                           jnp.asarray(targets))
    np.testing.assert_array_equal(np.asarray(count), (targets != IGNORE).sum(0))


def test_kl_is_zero_at_the_teacher_and_positive_elsewhere():
  rng = np.random.default_rng()
  r, n, v = 6, 3, 30
  logits = rng.normal(size=(r, n, v)).astype(np.float32)
  # the teacher's full distribution (K = V) equals the heads': KL 0
  logp = _log_softmax64(logits)
  order = np.argsort(-logp, -1)
  t_ids = order.astype(np.int32)
  t_logp = np.take_along_axis(logp, order, -1).astype(np.float32)
  targets = np.zeros((r, n), np.int32)
  _, head = medusa_kl_loss(jnp.asarray(logits), jnp.asarray(t_ids), jnp.asarray(t_logp),
                           jnp.asarray(targets), 0.8)
  np.testing.assert_allclose(np.asarray(head), 0.0, atol=1e-5)
  _, head = medusa_kl_loss(jnp.asarray(-logits), jnp.asarray(t_ids), jnp.asarray(t_logp),
                           jnp.asarray(targets), 0.8)
  assert np.all(np.asarray(head) > 0.1)


def test_teacher_targets_shift_rule():
  rng = np.random.default_rng()
  b, s, k, n = 2, 7, 3, 3
  ids = rng.integers(0, 50, (b, s, k))
  logp = rng.normal(size=(b, s, k)).astype(np.float16)
  t_ids, t_logp = teacher_targets(ids, logp, n)
  assert t_ids.shape == (b, s, n, k) and t_ids.dtype == np.int32
  assert t_logp.dtype == np.float16
  for t in range(s):
    for h in range(n):
      j = t + h + 1  # position j's distribution is that of token j + 1 = t + h + 2
      if j < s:
        np.testing.assert_array_equal(t_ids[:, t, h], ids[:, j])
        np.testing.assert_array_equal(t_logp[:, t, h], logp[:, j])
      else:
        assert not t_ids[:, t, h].any() and not t_logp[:, t, h].any()


def _prompts(rng, vocab, count):
  return [Prompt(conv_id=f"c{i}", text="", split="val" if i % 3 == 0 else "train",
                 ids=tuple(int(t) for t in rng.integers(3, vocab, rng.integers(1, 9))))
          for i in range(count)]


def _matched(got, want):
  """Both row sets in one order: each of ``got``'s rows next to ``want``'s nearest unused row.

  (Sorting by hidden values would let two close rows swap over rounding.)
  """
  d = ((got.hidden[:, None, :].astype(np.float64) - want.hidden[None].astype(np.float64)) ** 2
       ).sum(-1)
  free, pair = np.ones(want.num_rows, bool), []
  for i in range(got.num_rows):
    j = int(np.argmin(np.where(free, d[i], np.inf)))
    free[j] = False
    pair.append(j)
  keys = ("hidden", "targets", "teacher_ids", "teacher_logp")
  return ({k: getattr(got, k) for k in keys},
          {k: getattr(want, k)[np.asarray(pair)] for k in keys})


def test_one_pass_rows_equal_a_second_forward():
  rng = np.random.default_rng()
  cfg = LlamaConfig.tiny()
  model = Llama(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  prompts = _prompts(rng, cfg.vocab_size, 5)
  n, k = 3, 4
  kw = {"max_new_tokens": 6, "batch_size": 4, "eos_ids": [2], "length_bucket": 8}
  answers, rows = generate_rows(model, prompts, num_heads=n, teacher_topk=k, dtype=np.float32,
                                **kw)
  assert all(len(a) for a in answers)
  examples = make_examples(prompts, answers)
  for split in ("train", "val"):
    want = hidden_rows(model, [e for e in examples if e.split == split], num_heads=n,
                       batch_size=4, dtype=np.float32, length_bucket=16, teacher_topk=k)
    got = rows[split]
    assert got.num_rows == want.num_rows > 0
    g, w = _matched(got, want)
    np.testing.assert_allclose(g["hidden"], w["hidden"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(g["targets"], w["targets"])
    valid = g["targets"] != IGNORE
    np.testing.assert_array_equal(g["teacher_ids"][valid], w["teacher_ids"][valid])
    np.testing.assert_allclose(g["teacher_logp"][valid].astype(np.float64),
                               w["teacher_logp"][valid].astype(np.float64), atol=2e-3)
    # the teacher's top-1 for a head is the greedy token that head must predict (so the
    # answers are greedy)
    np.testing.assert_array_equal(w["teacher_ids"][..., 0][valid], w["targets"][valid])
  # without a teacher: the same rows, float16 hidden states, no teacher arrays
  _, plain = generate_rows(model, prompts, num_heads=n, **kw)
  for split in ("train", "val"):
    assert not plain[split].has_teacher and plain[split].hidden.dtype == np.float16
    np.testing.assert_array_equal(plain[split].targets, rows[split].targets)
    np.testing.assert_allclose(plain[split].hidden.astype(np.float32), rows[split].hidden,
                               rtol=2e-3, atol=2e-3)


def test_generation_budget_keeps_whole_batches_of_a_seeded_order():
  rng = np.random.default_rng()
  cfg = LlamaConfig.tiny()
  model = Llama(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  prompts = _prompts(rng, cfg.vocab_size, 8)
  kw = {"max_new_tokens": 3, "batch_size": 2, "eos_ids": [2], "length_bucket": 8,
        "num_heads": 2}
  full, _ = generate_rows(model, prompts, **kw)
  runs = [generate_rows(model, prompts, time_budget_s=0.0, seed=s, **kw) for s in (5, 5, 6)]
  for answers, rows in runs:
    done = [i for i, a in enumerate(answers) if a]
    assert len(done) == 2  # the first batch only, whole
    assert all(answers[i] == full[i] for i in done)
    want = 0
    for i in done:
      ids = np.asarray(prompts[i].ids + tuple(answers[i]))
      tgt = medusa_targets(ids, np.arange(len(ids)) >= len(prompts[i].ids), 2)
      want += int((tgt != IGNORE).any(-1).sum())
    assert sum(r.num_rows for r in rows.values()) == want
  assert runs[0][0] == runs[1][0]  # the order is a function of the seed


def _rows(rng, r=20, n=3, k=4, h=8):
  t_ids, t_logp = _random_teacher(rng, r, n, k, 40)
  return TokenRows(hidden=rng.normal(size=(r, h)).astype(np.float16),
                   targets=rng.integers(0, 40, (r, n)).astype(np.int32),
                   teacher_ids=t_ids, teacher_logp=t_logp)


def test_rows_with_teacher_round_trip_and_full_disk(tmp_path, monkeypatch):
  rng = np.random.default_rng()
  rows = _rows(rng)
  path = tmp_path / "rows_train.npz"
  rows.save(path)
  back = TokenRows.load(path)
  for name in ("hidden", "targets", "teacher_ids", "teacher_logp"):
    np.testing.assert_array_equal(getattr(back, name), getattr(rows, name))
    assert getattr(back, name).dtype == getattr(rows, name).dtype
  old = path.read_bytes()

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(_atomic, "_fsync", full)
  with pytest.raises(WriteError, match="No space left"):
    _rows(rng).save(path)
  monkeypatch.undo()
  assert path.read_bytes() == old  # the old cache, whole
  assert sorted(os.listdir(tmp_path)) == ["rows_train.npz"]


def test_teacher_shapes_and_config_are_checked(tmp_path):
  rng = np.random.default_rng()
  good = _rows(rng)
  with pytest.raises(ConfigError, match="both teacher_ids and teacher_logp"):
    TokenRows(hidden=good.hidden, targets=good.targets, teacher_ids=good.teacher_ids)
  with pytest.raises(ConfigError, match=r"teacher_ids \[R, n, K\]"):
    TokenRows(hidden=good.hidden, targets=good.targets, teacher_ids=good.teacher_ids[:, :2],
              teacher_logp=good.teacher_logp[:, :2])
  with pytest.raises(ConfigError, match="the same shape"):
    TokenRows(hidden=good.hidden, targets=good.targets, teacher_ids=good.teacher_ids,
              teacher_logp=good.teacher_logp[..., :2])
  cfg = TrainConfig(num_heads=3, loss="kl", batch_rows=8, steps=2, warmup_steps=0)
  assert cfg.loss is LossKind.KL and cfg.prompt_turns is PromptTurns.FIRST
  assert cfg.to_dict()["loss"] == "kl" and TrainConfig.load(cfg.to_dict()) == cfg
  plain = TokenRows(hidden=good.hidden, targets=good.targets)
  with pytest.raises(ConfigError, match="teacher top-K"):
    fit(cfg, plain, None, rng.normal(size=(40, 8)).astype(np.float32), tmp_path,
        progress=False)
  with pytest.raises(ConfigError, match="loss='mse'; expected one of ce, kl"):
    TrainConfig(loss="mse")
  with pytest.raises(ConfigError, match="prompt_turns='last'"):
    TrainConfig(prompt_turns="last")
  with pytest.raises(ConfigError, match="teacher_topk"):
    TrainConfig(teacher_topk=0)


def test_kl_training_learns_the_teacher(tmp_path):
  """Soft targets concentrated on a learnable token: the kl loss drives the heads' top-1
  to it, as the ce loss does with hard targets."""
  rng = np.random.default_rng()
  v, h, n, k, r = 48, 32, 3, 4, 2048
  table = rng.normal(size=(v, h)).astype(np.float32)
  lm_head = (rng.normal(size=(v, h)) / np.sqrt(h)).astype(np.float32)

  def rows(count):
    tok = rng.integers(0, v, count)
    tgt = np.stack([(tok * (2 * j + 3) + j + 1) % v for j in range(n)], 1).astype(np.int32)
    others = (tgt[..., None] + 1 + np.arange(k - 1)) % v
    t_ids = np.concatenate([tgt[..., None], others], -1).astype(np.int32)
    t_logp = np.log(np.concatenate([np.full((count, n, 1), 0.7),
                                    np.full((count, n, k - 1), 0.3 / (k - 1))], -1))
    hid = table[tok] + 0.05 * rng.normal(size=(count, h)).astype(np.float32)
    return TokenRows(hidden=hid, targets=tgt, teacher_ids=t_ids,
                     teacher_logp=t_logp.astype(np.float16))

  cfg = TrainConfig(name="t", num_heads=n, batch_rows=64, steps=60, warmup_steps=5,
                    learning_rate=3e-2, eval_every=60, log_every=10, checkpoint_every=60,
                    max_rank=5, tree_nodes=7, loss="kl", teacher_topk=k)
  res = fit(cfg, rows(r), rows(256), lm_head, tmp_path, progress=False, log=lambda m: None)
  assert res.losses[60] < 0.5 * res.losses[1]
  assert np.all(res.accuracy.topk_acc[:, 0] > 0.5), res.accuracy.topk_acc[:, 0]
  assert medusa_targets(np.arange(4), np.ones(4, bool), 1).tolist() == [[2], [3], [-1], [-1]]
