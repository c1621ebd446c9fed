"""Medusa loss targets (the off-by-one), loss and accuracy against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.errors import ConfigError
from medusa_jax.training.config import ComputeDType, HeadKind, TrainConfig
from medusa_jax.training.losses import (IGNORE, medusa_loss, medusa_targets,
                                        sequence_medusa_loss)
from medusa_jax.training.metrics import HeadAccuracy, rank_hits


def _ref_targets(ids, mask, n):
  s = len(ids)
  out = np.full((s, n), IGNORE)
  for t in range(s):
    for k in range(n):
      j = t + k + 2  # lm_head at t predicts t+1; head k (0-based) predicts t+k+2
      if j < s and mask[j]:
        out[t, k] = ids[j]
  return out


def test_targets_off_by_one_hand_checked():
  ids = np.array([10, 11, 12, 13, 14, 15])
  mask = np.array([0, 0, 1, 1, 1, 1], bool)  # prompt = first two tokens
  got = medusa_targets(ids, mask, 3)
  assert got.tolist() == [[12, 13, 14], [13, 14, 15], [14, 15, -1], [15, -1, -1],
                          [-1, -1, -1], [-1, -1, -1]]


def test_targets_match_loop_reference():
  rng = np.random.default_rng()
  for _ in range(5):
    b, s, n = rng.integers(1, 4), rng.integers(1, 12), rng.integers(1, 6)
    ids = rng.integers(0, 100, (b, s))
    mask = rng.random((b, s)) < 0.6
    got = medusa_targets(ids, mask, n)
    for i in range(b):
      np.testing.assert_array_equal(got[i], _ref_targets(ids[i], mask[i], n))


def _np_loss(logits, targets, decay):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  n = targets.shape[1]
  ce = np.zeros(n)
  for k in range(n):
    valid = targets[:, k] != IGNORE
    if valid.any():
      ce[k] = -logp[valid, k, targets[valid, k]].mean()
  return (decay ** np.arange(n) * ce).sum(), ce


@pytest.mark.parametrize("jit", [False, True])
def test_medusa_loss_matches_numpy(jit):
  rng = np.random.default_rng()
  r, n, v = 37, 4, 29
  logits = rng.normal(size=(r, n, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, (r, n)).astype(np.int32)
  targets[rng.random((r, n)) < 0.3] = IGNORE
  targets[:, 3] = IGNORE  # a head with no target contributes 0
  fn = jax.jit(medusa_loss, static_argnums=2) if jit else medusa_loss
  loss, head_ce = fn(jnp.asarray(logits), jnp.asarray(targets), 0.8)
  ref_loss, ref_ce = _np_loss(logits, targets, 0.8)
  np.testing.assert_allclose(np.asarray(head_ce), ref_ce, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)


def test_sequence_loss_equals_row_loss():
  rng = np.random.default_rng()
  b, s, n, v = 3, 9, 3, 17
  logits = rng.normal(size=(b, s, n, v)).astype(np.float32)
  ids = rng.integers(0, v, (b, s)).astype(np.int32)
  mask = rng.random((b, s)) < 0.7
  seq_loss, seq_ce = sequence_medusa_loss(jnp.asarray(logits), jnp.asarray(ids),
                                          jnp.asarray(mask), 0.8)
  targets = medusa_targets(ids, mask, n).reshape(b * s, n)
  ref_loss, ref_ce = _np_loss(logits.reshape(b * s, n, v), targets, 0.8)
  np.testing.assert_allclose(np.asarray(seq_ce), ref_ce, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(seq_loss), ref_loss, rtol=1e-5)


def test_rank_hits_and_accuracy():
  rng = np.random.default_rng()
  r, n, v, k = 50, 3, 12, 5
  logits = rng.normal(size=(r, n, v)).astype(np.float32)
  targets = rng.integers(0, v, (r, n)).astype(np.int32)
  targets[rng.random((r, n)) < 0.2] = IGNORE
  hits, count = rank_hits(jnp.asarray(logits), jnp.asarray(targets), k)
  order = np.argsort(-logits, axis=-1)
  ref = np.zeros((n, k), int)
  for i in range(r):
    for h in range(n):
      if targets[i, h] != IGNORE:
        rank = int(np.where(order[i, h] == targets[i, h])[0][0])
        if rank < k:
          ref[h, rank] += 1
  np.testing.assert_array_equal(np.asarray(hits), ref)
  np.testing.assert_array_equal(np.asarray(count), (targets != IGNORE).sum(0))
  acc = HeadAccuracy.empty(n, k).add(hits, count).add(hits, count)
  np.testing.assert_allclose(acc.topk_acc[:, -1], ref.sum(1) / (targets != IGNORE).sum(0))
  summary = acc.summary()
  assert summary["count"] == [2 * int(c) for c in (targets != IGNORE).sum(0)]
  np.testing.assert_allclose(summary["top1"], ref[:, 0] / (targets != IGNORE).sum(0), atol=1e-5)


def test_train_config_parsing(tmp_path):
  cfg = TrainConfig.load({"name": "x", "head_kind": "v1", "compute_dtype": "bfloat16",
                          "steps": 10, "warmup_steps": 2})
  assert cfg.head_kind is HeadKind.V1 and cfg.compute_dtype is ComputeDType.BFLOAT16
  assert TrainConfig.load(cfg.to_dict()) == cfg
  with pytest.raises(ConfigError, match="unknown keys \\['stepz'\\]"):
    TrainConfig.load({"stepz": 3})
  with pytest.raises(ConfigError, match="head_kind='v3'; expected one of v2, v1"):
    TrainConfig.load({"head_kind": "v3"})
  with pytest.raises(ConfigError, match="compute_dtype='fp8'"):
    TrainConfig.load({"compute_dtype": "fp8"})
  with pytest.raises(ConfigError, match="batch_rows: expected a positive integer"):
    TrainConfig.load({"batch_rows": 0})
  with pytest.raises(ConfigError, match="warmup_steps=10"):
    TrainConfig.load({"steps": 10, "warmup_steps": 10})
  with pytest.raises(ConfigError, match="num_layers=2: head_kind v2"):
    TrainConfig.load({"num_layers": 2})
  with pytest.raises(ConfigError, match="learning_rate"):
    TrainConfig.load({"learning_rate": -1.0})
  with pytest.raises(ConfigError, match="val_fraction"):
    TrainConfig.load({"val_fraction": 1.5})
  with pytest.raises(ConfigError, match="not found"):
    TrainConfig.from_file(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("{oops")
  with pytest.raises(ConfigError, match="not valid JSON"):
    TrainConfig.from_file(tmp_path / "bad.json")
  with pytest.raises(ConfigError, match="expected a JSON object"):
    TrainConfig.load([1, 2])
