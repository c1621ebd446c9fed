"""Variants on one self-distillation's rows (``training.sweep``): parsing, validation,
the expected-tokens table, and a whole run on a tiny Llama with a compared adapter."""

import json

import numpy as np
import pytest
from tiny_model import make_tiny_llama_dir

from medusa_jax.adapters.weights import MedusaWeights
from medusa_jax.config import MedusaConfig
from medusa_jax.errors import ConfigError
from medusa_jax.training import pipeline, sweep
from medusa_jax.training.config import DATA_FIELDS, TrainConfig
from medusa_jax.training.data import Prompt, write_jsonl


def test_parse_variant_forms():
  assert sweep.parse_variant("base") == ("base", {})
  assert sweep.parse_variant("base:") == ("base", {})
  assert sweep.parse_variant("v1.l2:head_kind=v1, num_layers=2,learning_rate=3e-3") == (
      "v1.l2", {"head_kind": "v1", "num_layers": 2, "learning_rate": 3e-3})
  assert sweep.parse_variant("x:grad_clip=0,seed=7")[1] == {"grad_clip": 0, "seed": 7}


@pytest.mark.parametrize("text, match", [
    ("", "expected NAME"), ("../up", "expected NAME"), (".hidden", "expected NAME"),
    ("a b", "expected NAME"), ("x" * 65, "expected NAME"),
    ("long:steps", "'steps': expected key=value"), ("long:=3", "expected key=value"),
    ("long:steps=1,steps=2", "steps given twice"),
])
def test_parse_variant_errors(text, match):
  with pytest.raises(ConfigError, match=match):
    sweep.parse_variant(text)


def test_variant_configs_validate_and_name_the_variant():
  cfg = TrainConfig(num_heads=2, steps=10, warmup_steps=1)
  out = sweep.variant_configs(cfg, {"base": {}, "long": {"steps": 40, "weight_decay": 0.1}})
  assert out["base"] == cfg
  assert out["long"].steps == 40 and out["long"].weight_decay == 0.1
  assert out["long"].num_heads == 2
  for field in sorted(DATA_FIELDS):
    with pytest.raises(ConfigError, match=f"variant d: {field} shape the shared rows"):
      sweep.variant_configs(cfg, {"d": {field: getattr(cfg, field)}})
  with pytest.raises(ConfigError, match="variant t: unknown keys \\['stpes'\\]"):
    sweep.variant_configs(cfg, {"t": {"stpes": 3}})
  with pytest.raises(ConfigError, match="num_layers=2: head_kind v2 needs exactly 1"):
    sweep.variant_configs(cfg, {"l2": {"num_layers": 2}})
  with pytest.raises(ConfigError, match="variant k: loss kl needs the teacher top-K"):
    sweep.variant_configs(cfg, {"k": {"loss": "kl"}})
  kl = TrainConfig(num_heads=2, steps=10, warmup_steps=1, loss="kl")
  assert sweep.variant_configs(kl, {"ce": {"loss": "ce"}})["ce"].loss.value == "ce"
  with pytest.raises(ConfigError, match="at least one"):
    sweep.variant_configs(cfg, {})
  with pytest.raises(ConfigError, match="not a valid variant name"):
    sweep.variant_configs(cfg, {"a/b": {}})


def test_tree_expectations_against_closed_forms():
  rng = np.random.default_rng()
  n, k = int(rng.integers(2, 6)), int(rng.integers(2, 8))
  # rank 0 always right, others never: the chain of rank-0 drafts, 1 token per depth.
  acc = np.zeros((n, k))
  acc[:, 0] = 1.0
  exp = sweep.tree_expectations(acc, sizes=(2, 4, 16))
  assert exp == {str(t): float(1 + min(t - 1, n)) for t in (2, 4, 16)}
  assert sweep.tree_expectations(np.zeros((n, k)), sizes=(4,)) == {"4": 1.0}
  # One node: head 0's top draft (the construction starts there).
  acc = rng.uniform(0, 1 / k, (n, k))
  assert sweep.tree_expectations(acc, sizes=(2,))["2"] == pytest.approx(1 + acc[0, 0],
                                                                        abs=1e-4)
  e = sweep.tree_expectations(acc, sizes=(2, 4, 16, 64))
  assert e["2"] <= e["4"] <= e["16"] <= e["64"]


def _prompts(path, rng, count=12):
  prompts = []
  for i in range(count):
    ids = tuple(int(x) for x in rng.integers(3, 200, int(rng.integers(4, 20))))
    prompts.append(Prompt(conv_id=f"c{i}", text=f"p{i}", ids=ids,
                          split="val" if i % 4 == 0 else "train"))
  write_jsonl(path, prompts)


def test_run_variants_trains_each_on_the_same_rows_and_compares(tmp_path):
  rng = np.random.default_rng()
  model = tmp_path / "model"
  llama_cfg = make_tiny_llama_dir(model, seed=int(rng.integers(1 << 30)))
  _prompts(tmp_path / "prompts.jsonl", rng)
  cfg = TrainConfig(name="tiny", num_heads=2, num_prompts=12, max_new_tokens=12,
                    gen_batch_size=8, hidden_batch_size=8, length_bucket=32, seq_bucket=64,
                    batch_rows=32, steps=6, warmup_steps=1, learning_rate=1e-2, eval_every=3,
                    log_every=3, checkpoint_every=6, max_rank=4, tree_nodes=5)
  # An adapter on disk to compare: random V2 heads of the same shape.
  other = tmp_path / "other"
  MedusaWeights.init(MedusaConfig(base_model_name_or_path="tiny", medusa_num_heads=2,
                                  medusa_num_layers=1, version=2.0),
                     llama_cfg["hidden_size"]).save(other)
  src = pipeline.Sources(model_dir=str(model), prompts=str(tmp_path / "prompts.jsonl"))
  work, out = tmp_path / "work", tmp_path / "out"
  result = sweep.run_variants(cfg, {"base": {}, "fast": {"learning_rate": 3e-2, "steps": 4}},
                              str(work), str(out), src, compare=[str(other)], progress=False)
  on_disk = json.loads((out / "sweep.json").read_text())
  assert on_disk == json.loads(json.dumps(result))
  assert set(result["variants"]) == {"base", "fast"}
  assert result["data"]["rows_val"] > 0 and result["data"]["rows_train"] > 0
  for name, steps in (("base", 6), ("fast", 4)):
    v = result["variants"][name]
    recipe = json.loads((out / name / "recipe.json").read_text())
    assert recipe["config"]["steps"] == steps
    assert recipe["data"]["rows_train"] == result["data"]["rows_train"]
    assert (out / name / "model.safetensors").is_file()
    assert (work / "variants" / name / "metrics.jsonl").is_file()
    assert len(v["top1"]) == 2 and len(v["head_ce"]) == 2
    assert set(v["expected_tokens"]) == {str(t) for t in sweep.TREE_SIZES}
  # The data stages ran once: one examples cache, no per-variant copies.
  assert (work / "examples.jsonl").is_file()
  assert not (work / "variants" / "base" / "examples.jsonl").exists()
  # An exported variant, compared on the same rows, scores what its fit reported.
  data = pipeline.prepare(cfg, str(work), src)
  again = sweep.compare_adapter(str(out / "base"), cfg, data)
  np.testing.assert_allclose(again["top1"], result["variants"]["base"]["top1"], atol=1e-5)
  np.testing.assert_allclose(again["head_ce"], result["variants"]["base"]["head_ce"],
                             rtol=1e-4)
  # The single-config path on the same cached rows trains the same heads as the variant.
  recipe = pipeline.run(cfg, str(work), str(out / "single"), src, progress=False)
  np.testing.assert_allclose(recipe["val_accuracy"]["top1"], result["variants"]["base"]["top1"],
                             atol=1e-6)
  assert recipe["timings_s"]["train_s"] > 0 and recipe["val_ce"] is not None
  cmp = result["compare"][str(other)]
  assert cmp["path"] == str(other) and len(cmp["top1"]) == 2
  # Mismatched adapters are refused by name.
  with pytest.raises(ConfigError, match="3 heads; the rows have targets for 2"):
    wrong = tmp_path / "wrong"
    MedusaWeights.init(MedusaConfig(base_model_name_or_path="tiny", medusa_num_heads=3,
                                    medusa_num_layers=1, version=2.0),
                       llama_cfg["hidden_size"]).save(wrong)
    sweep.compare_adapter(str(wrong), cfg, data)
  with pytest.raises(ConfigError, match="vocabulary has 7 tokens; the base model's has"):
    v1 = tmp_path / "v1"
    MedusaWeights.init(MedusaConfig(base_model_name_or_path="tiny", medusa_num_heads=2,
                                    medusa_num_layers=2, version=1.0),
                       llama_cfg["hidden_size"], 7).save(v1)
    sweep.compare_adapter(str(v1), cfg, data)
  with pytest.raises(ConfigError, match="not an adapter directory"):
    sweep.run_variants(cfg, {"base": {}}, str(work), str(out), src,
                       compare=[str(tmp_path / "missing")], progress=False)
