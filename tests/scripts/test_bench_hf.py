"""scripts/bench_hf.py: transformers generate on a tiny checkpoint (the layout convert_gguf
writes) makes medusa_jax's plain greedy tokens for the same prompts, one at a time and
left-padded in a batch, stopped and counted as the engine stops and counts them."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.decoding.engine import Engine
from medusa_jax.errors import ConfigError
from medusa_jax.models.llama_weights import load_llama
from script_modules import load_script
from tiny_model import make_tiny_llama_dir

bench_hf = load_script("bench_hf")


@pytest.mark.parametrize("skip,expected", [
    (0, (6, 4, 4.0)),   # positions 2..5, from the prefill's token
    (1, (4, 3, 3.0)),   # positions 3..5
    (3, (1, 1, 1.0)),   # position 5 alone
    (4, (6, 4, 4.0)),   # every row done within the skipped call: the fallback, 2..5
])
def test_decode_window_leaves_out_the_prefill_and_the_first_call(skip, expected):
  times, counts = [10.0, 11.0, 12.0, 13.0, 14.0], [2, 2, 2, 1, 1]
  assert bench_hf.decode_window(times, counts, skip) == expected
  assert bench_hf.decode_window([10.0], [2], 0) == (0, 0, 0.0)


def test_emitted_cuts_after_the_first_eos_and_modes_parse():
  assert bench_hf.emitted([5, 7, 2, 9, 2], (2,)) == [5, 7, 2]
  assert bench_hf.emitted([5, 7, 9], (2,)) == [5, 7, 9]
  assert bench_hf.emitted([5, 2, 9], ()) == [5, 2, 9]
  assert bench_hf.HFMode.parse("Static-Compile") is bench_hf.HFMode.STATIC_COMPILE
  with pytest.raises(ConfigError, match="expected one of eager, static-compile"):
    bench_hf.HFMode.parse("compiled")


def test_generate_equals_medusa_jax_plain_greedy_f32(tmp_path):
  pytest.importorskip("torch", reason="torch is a test extra")
  pytest.importorskip("transformers", reason="transformers is a test extra")
  model_dir = str(tmp_path / "model")
  cfg = make_tiny_llama_dir(model_dir, seed=7)
  llama = load_llama(model_dir, dtype=jnp.float32)
  rng = np.random.default_rng(8)
  prompts = [[int(t) for t in rng.integers(3, cfg["vocab_size"], size=n)] for n in (5, 9, 7)]
  N = 8
  free = Engine(llama, max_cache_len=64, eos_ids=()).generate(prompts, N).tokens
  assert [len(t) for t in free] == [N] * 3
  eos = free[1][3]  # an id the engine emits: the second prompt stops by its 4th token
  # The engine's stop (decoding/step.py, tested there): cut after the first EOS, kept.
  expected = [bench_hf.emitted(t, (eos,)) for t in free]
  assert len(expected[1]) <= 4
  ref = {1: expected, 3: expected}  # batch 1: one prompt at a time, unpadded

  sets = {1: [[p] for p in prompts], 3: [prompts]}
  rows = bench_hf.bench_hf_real(model_dir, sets, N, dtype="f32", modes=bench_hf.HF_MODES,
                                eos_token_ids=(eos,), skip_decode_steps=2, reference=ref,
                                keep_outputs=True, device="cpu", log=lambda line: None)
  assert [(r["mode"], r["batch"]) for r in rows] == [
      ("eager", 1), ("eager", 3), ("static-compile", 1), ("static-compile", 3)]
  for r in rows:
    assert "error" not in r, r["error"]
    assert r["outputs"] == ref[r["batch"]], (r["mode"], r["batch"])
    assert r["matches_reference"] == "3/3"
    assert r["tokens"] == sum(len(t) for t in expected) and r["prompts"] == 3
    assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["new_tokens"] == N
    assert r["compiled"] is False and r["compile_s"] is None  # transformers compiles on GPUs
    assert r["eos_token_ids"] == [eos] and r["device"] and r["transformers"]


def test_a_failing_mode_and_the_time_budget_keep_the_other_rows(tmp_path):
  pytest.importorskip("torch", reason="torch is a test extra")
  pytest.importorskip("transformers", reason="transformers is a test extra")
  sets = {1: [[[5, 6, 7]]], 2: [[[5, 6], [7, 8, 9]]]}
  rows = bench_hf.bench_hf_real(str(tmp_path / "missing"), sets, 4, device="cpu",
                                log=lambda line: None)
  assert [(r["mode"], r["batch"]) for r in rows] == [("eager", 1), ("static-compile", 1)]
  assert all("error" in r for r in rows)
  rows = bench_hf.bench_hf_real(str(tmp_path / "missing"), sets, 4, time_budget_s=-1.0,
                                log=lambda line: None)
  assert [(r["mode"], r["batch"], r["skipped"]) for r in rows] == [
      (m, b, "time budget") for m in bench_hf.HF_MODES for b in (1, 2)]


def test_e2e_table_sets_medusa_jax_against_the_best_transformers_mode():
  bench_decode = load_script("bench_decode")
  nan = math.nan
  run = dict(dtype="bf16", batch=16, none=dict(tokens_per_s=1000.0),
             tree=dict(tokens_per_s=2500.0, speedup=2.5, tokens_per_step=2.6, tree_nodes=16,
                       matches_plain="16/16"))
  res = dict(device="H200", backend="gpu", jax="0.10", heads="smollm2", new_tokens=256,
             runs=[run], hf_real=[
                 dict(mode="eager", batch=16, tokens_per_s=400.0, torch="2.x", transformers="5.x"),
                 dict(mode="static-compile", batch=16, tokens_per_s=500.0,
                      matches_reference="3/16"),
                 dict(mode="eager", batch=1, tokens_per_s=40.0),
                 dict(mode="static-compile", batch=1, error="RuntimeError: boom")])
  table = bench_decode._e2e_table(res)
  assert ("transformers static-compile 500 tok/s (eager 400): plain 2.00x, tree 5.00x of it"
          " (its tokens = plain's: 3/16)") in table
  assert "transformers B=1: eager 40 tok/s" in table
  assert "transformers static-compile B=1: error RuntimeError: boom" in table
  assert bench_hf.best_by_batch([dict(batch=1, tokens_per_s=nan)]) == {}  # NaN is no best
