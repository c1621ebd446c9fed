"""Loading checks: the adapter against the base before any weight is read (one line, exit 2
in the CLI), Hugging Face ids in a local hub cache, the ids the engine feeds."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from medusa_jax.app import main as cli
from medusa_jax.decoding.engine import Engine
from medusa_jax.decoding.loading import load_model, model_name, same_model
from medusa_jax.errors import AdapterMismatchError, ModelNotFoundError, UnsupportedModelError
from medusa_jax.models import hub
from medusa_jax.models.chat import chat_ids
from tiny_model import make_tiny_adapter_dir, make_tiny_llama_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("load")
  cfg = make_tiny_llama_dir(root / "model", seed=5)
  make_tiny_adapter_dir(root / "adapter", hidden=cfg["hidden_size"], num_heads=2, seed=6,
                        base="model")
  return root, cfg


def _broken_base(root, name="broken"):
  """The tiny model with unreadable weights: a check that passes must come before them."""
  out = root / name
  if not out.exists():
    shutil.copytree(root / "model", out)
    (out / "model.safetensors").write_bytes(b"\x10\x00junk")
  return str(out)


def _adapter(root, name, *, hidden=32, vocab=None, dtype=np.float32, base="model"):
  from medusa_files import head_tensors
  out = root / name
  out.mkdir(exist_ok=True)
  tensors = head_tensors(np.random.default_rng(1), n=2, hidden=hidden, vocab=vocab, dtype=dtype)
  save_file(tensors, str(out / "model.safetensors"))
  (out / "config.json").write_text(json.dumps({
      "base_model_name_or_path": base, "medusa_num_heads": 2, "medusa_num_layers": 1,
      "version": 1 if vocab else 2}))
  return str(out)


@pytest.mark.parametrize("kw,match", [
    (dict(hidden=64), r"hidden size 64 \(.*0\.0\.linear\.weight \[64, 64\]\) does not match the"
                      r" base model .*hidden_size=32"),
    (dict(vocab=300), r"per-head vocabulary 300 does not match .*vocab_size=259"),
    (dict(dtype=np.int32), r"tensor 0\.0\.linear\.\w+ has dtype I32; expected floating point"),
])
def test_adapter_mismatch_stops_before_the_base_weights(tiny, kw, match):
  root, _ = tiny
  adapter = _adapter(root, "bad_" + "_".join(map(str, kw)), **kw)
  with pytest.raises(AdapterMismatchError, match=match):
    Engine.load(_broken_base(root), adapter)


def test_cli_mismatch_is_one_line_exit_2(tiny, capsys):
  root, _ = tiny
  adapter = _adapter(root, "wide", hidden=64)
  assert cli.main(["generate", "hi", "--model-dir", _broken_base(root), "--adapter",
                   adapter]) == 2
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert len(err) == 1 and "hidden size 64" in err[0] and "hidden_size=32" in err[0]


def test_unsupported_base_stops_before_its_weights(tiny):
  root, _ = tiny
  base = _broken_base(root, "qwen_like")
  cfg = json.loads((root / "model" / "config.json").read_text())
  cfg["model_type"], cfg["architectures"] = "gemma", ["GemmaForCausalLM"]
  (root / "qwen_like" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedModelError, match="model_type='gemma'"):
    Engine.load(base, str(root / "adapter"))


def test_base_name_warning_and_fresh_heads_for_a_new_base(tiny):
  root, _ = tiny
  notes = []
  other = _adapter(root, "other", base="meta-llama/Llama-3.1-8B-Instruct")
  loaded = load_model(str(root / "model"), other, notice=notes.append)
  assert len(notes) == 1 and "trained for 'meta-llama/Llama-3.1-8B-Instruct'" in notes[0]
  notes.clear()
  load_model(str(root / "model"), str(root / "adapter"), notice=notes.append)
  assert notes == []  # "model" names the directory .../model
  # No adapter: the bundled SmolLM2 heads are not forced onto another base.
  loaded = load_model(str(root / "model"), None, num_heads=2, notice=notes.append)
  assert loaded.medusa.speculative_tokens == 2 and "freshly initialised" in notes[0]
  assert loaded.name == str(root / "model") and loaded.eos_ids == (2,)


def test_the_base_takes_the_backend_s_kernel_layout(tiny, monkeypatch):
  """load_model fuses the projections, then holds them in the backend's layout: [out, in] on
  a CUDA GPU (faked here), [in, out] elsewhere; the weights are the same either way."""
  import jax

  from medusa_jax.models import llama as llama_mod
  root, _ = tiny
  here = load_model(str(root / "model"), str(root / "adapter")).llama
  assert here.fused_projections and here.kernel_layout == llama_mod.default_kernel_layout()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(llama_mod, "_cuda", lambda: True)
  gpu = load_model(str(root / "model"), str(root / "adapter")).llama
  assert gpu.kernel_layout == "out_in" and gpu.fused_projections
  want = here.with_kernel_layout("out_in")
  for a, b in zip(want._linears(), gpu._linears()):
    np.testing.assert_array_equal(np.asarray(a.kernel[...]), np.asarray(b.kernel[...]))


def test_names():
  assert same_model("HuggingFaceTB/SmolLM2-135M-Instruct", "/x/smollm2-135m-instruct/")
  assert not same_model("lmsys/vicuna-7b-v1.3", "lmsys/vicuna-13b-v1.3")
  assert not same_model(None, "x")


def _hub_cache(tmp_path, monkeypatch, tiny):
  """A Hugging Face cache in a temporary HF_HOME holding the tiny model and adapter."""
  root, _ = tiny
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  for repo, src in (("acme/tiny-chat", root / "model"), ("acme/tiny-medusa", root / "adapter")):
    base = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
  return commit


def test_hugging_face_ids_resolve_in_the_local_cache(tiny, tmp_path, monkeypatch):
  commit = _hub_cache(tmp_path, monkeypatch, tiny)
  path = hub.resolve("acme/tiny-chat")
  assert path.endswith(f"snapshots/{commit}") and model_name(path) == "acme/tiny-chat"
  assert hub.resolve("acme/tiny-chat", revision=commit) == path
  notes = []
  loaded = load_model("acme/tiny-chat", "acme/tiny-medusa", notice=notes.append)
  assert loaded.name == "acme/tiny-chat" and loaded.medusa.speculative_tokens == 2
  assert any("trained for 'model'" in n for n in notes)  # the adapter names another base


def test_missing_id_says_where_it_looked_and_how_to_fetch(tiny, tmp_path, monkeypatch):
  _hub_cache(tmp_path, monkeypatch, tiny)
  with pytest.raises(ModelNotFoundError) as e:
    hub.resolve("meta-llama/Llama-3.1-8B-Instruct")
  msg = str(e.value)
  assert os.path.join("hf", "hub", "models--meta-llama--Llama-3.1-8B-Instruct") in msg
  assert "HF_HUB_OFFLINE" in msg and "hf download meta-llama/Llama-3.1-8B-Instruct" in msg
  with pytest.raises(ModelNotFoundError, match="no such file or directory"):
    hub.resolve(str(tmp_path / "nowhere"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
  assert hub.hub_cache() == tmp_path / "elsewhere"


def test_encode_prompt_is_what_the_engine_feeds(tiny):
  root, _ = tiny
  eng = Engine.load(str(root / "model"), str(root / "adapter"), max_cache_len=128)
  ids = eng.encode_prompt("Hi!")
  assert ids == chat_ids(eng.tokenizer, eng.chat_template, "Hi!")
  assert ids[0] == eng.tokenizer.token_to_id("<|im_start|>")
  msgs = [{"role": "user", "content": "Hi!"}]
  assert eng.encode_prompt(msgs) == ids
  assert eng.encode_prompt("Hi!", chat=False) == eng.tokenizer.encode("Hi!")
  assert eng.encode_prompt([5, 6]) == [5, 6]
  by_text = eng.generate(["Hi!"], 4, chat=True)
  by_ids = eng.generate([ids], 4)
  assert by_text.tokens == by_ids.tokens
