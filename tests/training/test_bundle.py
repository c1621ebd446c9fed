"""Replacing the bundled heads: only when better on validation and tokens per step, whole or
not at all (a full disk or a crash mid-copy leaves the old heads)."""

import errno
import json
import os

import numpy as np
import pytest

from medusa_jax import _atomic
from medusa_jax.errors import ConfigError, WriteError
from medusa_jax.training import bundle


def _recipe(top1, rng):
  n = len(top1)
  return {"config": {"num_heads": n, "tree_nodes": 7, "loss": "kl", "teacher_topk": 32,
                     "prompt_turns": "all", "loss_decay": 0.8},
          "data": {"prompts": 10, "examples": 9, "examples_val": 2, "answer_tokens": 1234},
          "val_accuracy": {"top1": list(top1), "top5": [min(1.0, t + 0.2) for t in top1],
                           "count": [int(rng.integers(100, 999))] * n}}


def _eval(t1, t2, coding):
  return {"device": "cpu", "jax": "x", "max_new_tokens": 8, "head_accuracy": {"top1": [0.4]},
          "turns": {"turn1": {"tree": {"tokens_per_step": t1,
                                       "tokens_per_step_by_category": {"coding": coding[0],
                                                                       "math": 1.1}}},
                    "turn2": {"tree": {"tokens_per_step": t2,
                                       "tokens_per_step_by_category": {"coding": coding[1]}}}}}


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


def _setup(tmp_path, rng, *, new_top1, new_eval, old_eval):
  cur = tmp_path / "bundled"
  for name, text in (("config.json", "{}"), ("medusa_choices.json", "[[0]]"),
                     ("README.md", "old"), ("model.safetensors", "old-weights")):
    os.makedirs(cur, exist_ok=True)
    (cur / name).write_text(text)
  _write(cur / "recipe.json", _recipe([0.38, 0.22], rng))
  run = tmp_path / "run"
  heads = run / "heads"
  os.makedirs(heads)
  (heads / "config.json").write_text('{"medusa_num_heads": 2}')
  (heads / "medusa_choices.json").write_text("[[0], [1]]")
  (heads / "model.safetensors").write_bytes(rng.bytes(64))
  _write(heads / "recipe.json", _recipe(new_top1, rng))
  _write(run / "eval.json", new_eval)
  _write(run / "eval_baseline.json", old_eval)
  return run, cur


def _snapshot(d):
  return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def test_install_only_when_better_and_whole(tmp_path):
  rng = np.random.default_rng()
  run, cur = _setup(tmp_path, rng, new_top1=[0.45, 0.3], new_eval=_eval(2.2, 2.3, (2.6, 2.4)),
                    old_eval=_eval(1.9, 2.0, (1.7, 1.8)))
  res = bundle.install(str(run), str(cur))
  assert res["better"] and res["installed"] and res["reasons"] == []
  assert res["tree_tokens_per_step"]["new"]["coding"] == pytest.approx(2.5)
  assert res["tree_tokens_per_step"]["old"]["mean"] == pytest.approx(1.95)
  assert sorted(os.listdir(cur)) == ["README.md", "config.json", "medusa_choices.json",
                                     "model.safetensors", "recipe.json"]
  assert (cur / "model.safetensors").read_bytes() == (run / "heads" / "model.safetensors"
                                                      ).read_bytes()
  recipe = json.loads((cur / "recipe.json").read_text())
  assert recipe["val_accuracy"]["top1"] == [0.45, 0.3]
  assert recipe["mtbench"]["tree_tokens_per_step"]["coding"] == pytest.approx(2.5)
  text = (cur / "README.md").read_text()
  assert "0.450" in text and "2.20 / 2.30 tokens per step" in text and "coding" in text


@pytest.mark.parametrize("new_top1,new_eval,reason", [
    ([0.30, 0.3], _eval(2.2, 2.3, (2.6, 2.4)), "head-1 top-1"),
    ([0.45, 0.3], _eval(1.8, 1.9, (2.6, 2.4)), "(mean)"),
    ([0.45, 0.3], _eval(2.2, 2.3, (1.6, 1.7)), "(coding)"),
])
def test_not_better_writes_nothing(tmp_path, new_top1, new_eval, reason):
  rng = np.random.default_rng()
  run, cur = _setup(tmp_path, rng, new_top1=new_top1, new_eval=new_eval,
                    old_eval=_eval(1.9, 2.0, (1.7, 1.8)))
  before = _snapshot(cur)
  res = bundle.install(str(run), str(cur))
  assert not res["better"] and not res["installed"]
  assert any(reason in r for r in res["reasons"]), res["reasons"]
  assert _snapshot(cur) == before
  assert bundle.install(str(run), str(cur), force=True)["installed"]
  assert _snapshot(cur) != before


def test_full_disk_and_crash_keep_the_old_heads(tmp_path, monkeypatch):
  rng = np.random.default_rng()
  run, cur = _setup(tmp_path, rng, new_top1=[0.45, 0.3], new_eval=_eval(2.2, 2.3, (2.6, 2.4)),
                    old_eval=_eval(1.9, 2.0, (1.7, 1.8)))
  before = _snapshot(cur)

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(_atomic, "_fsync", full)
  with pytest.raises(WriteError, match="No space left"):
    bundle.install(str(run), str(cur))
  monkeypatch.undo()
  assert _snapshot(cur) == before

  def crash(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(bundle, "readme", crash)
  with pytest.raises(KeyboardInterrupt):
    bundle.install(str(run), str(cur))
  monkeypatch.undo()
  assert _snapshot(cur) == before
  assert sorted(os.listdir(tmp_path)) == ["bundled", "run"]  # no temporary left behind


def test_missing_or_malformed_inputs_are_named(tmp_path):
  rng = np.random.default_rng()
  run, cur = _setup(tmp_path, rng, new_top1=[0.45, 0.3], new_eval=_eval(2.2, 2.3, (2.6, 2.4)),
                    old_eval=_eval(1.9, 2.0, (1.7, 1.8)))
  os.remove(run / "eval_baseline.json")
  with pytest.raises(ConfigError, match="eval_baseline.json: not found"):
    bundle.compare(str(run), str(cur))
  (run / "eval.json").write_text("{broken")
  with pytest.raises(ConfigError, match="eval.json: not valid JSON"):
    bundle.compare(str(run), str(cur), baseline_eval=str(run / "eval.json"))
  with pytest.raises(ConfigError, match="--modes tree"):
    bundle.tree_tokens_per_step({"turns": {"turn1": {"plain": {}}}})
