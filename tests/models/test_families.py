"""Every supported family against transformers: a tiny random model saved by
transformers, loaded by medusa_jax, gives the same logits (f32, 1e-4) and the same
32 greedy tokens, plain and with Medusa speculation (chain and tree; random heads,
since greedy speculation is lossless). Every refused config is refused by name."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medusa_jax.config import MedusaConfig
from medusa_jax.decoding.engine import Engine
from medusa_jax.errors import ConfigError, UnsupportedModelError
from medusa_jax.heads.modules import MedusaModel
from medusa_jax.models.families import Family, LayerType
from medusa_jax.models.llama import KVCache, causal_mask
from medusa_jax.models.llama_config import LlamaConfig, RopeType
from medusa_jax.models.llama_weights import load_llama

torch = pytest.importorskip("torch", reason="torch is a test extra")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

V, NEW, PROMPT = 97, 32, 20
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# name -> (transformers config class, model class, fields); every model is random.
CASES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE)),
    "llama_biases": ("LlamaConfig", "LlamaForCausalLM", dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
}
# Logits only: Qwen2's sliding layers from max_window_layers on, dynamic RoPE.
LOGIT_CASES = {
    "qwen2_sliding": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "llama_dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})),
}


def _save_random(name, spec, out) -> object:
  config_cls, model_cls, fields = spec
  torch.manual_seed(sum(map(ord, name)))
  cfg = getattr(transformers, config_cls)(**SIZES, initializer_range=0.3, **fields)
  hf = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():  # norms away from 1, biases away from 0
    for pname, p in hf.named_parameters():
      if "norm" in pname:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif pname.endswith(".bias"):
        p.copy_(0.3 * torch.randn_like(p))
  hf.save_pretrained(str(out))
  return hf


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, tmp_path_factory):
  out = tmp_path_factory.mktemp(request.param)
  hf = _save_random(request.param, CASES[request.param], out)
  return request.param, hf, load_llama(out)


def _hf_greedy(hf, prompt, steps):
  """Greedy tokens by full forwards (no cache: the reference math itself)."""
  ids = list(prompt)
  with torch.no_grad():
    for _ in range(steps):
      ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
  return ids[len(prompt):]


def _logits(model, tokens_BxT, L=64):
  B, T = tokens_BxT.shape
  idx = jnp.zeros((B,), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  h, _ = model(jnp.asarray(tokens_BxT, jnp.int32), pos, KVCache.init(model.cfg, B, L), idx,
               causal_mask(idx, T, L))
  return np.asarray(model.lm_head(h))


def _random_heads(hidden, n=3, seed=0):
  mc = MedusaConfig(base_model_name_or_path="test", medusa_num_heads=n, medusa_num_layers=1,
                    version=2.0)
  heads = MedusaModel(mc, hidden, rngs=nnx.Rngs(seed))
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 7))
  heads.medusa.kernel[...] = 0.05 * jax.random.normal(k1, heads.medusa.kernel[...].shape)
  heads.medusa.bias[...] = 0.05 * jax.random.normal(k2, heads.medusa.bias[...].shape)
  return heads


def test_config_is_read_as_transformers_reads_it(family):
  name, hf, model = family
  cfg = model.cfg
  assert cfg.family is Family(hf.config.model_type)
  assert cfg.tie_word_embeddings == bool(hf.config.tie_word_embeddings)
  assert (model.lm_head_kernel is None) == cfg.tie_word_embeddings
  if name == "llama3":
    assert cfg.rope_scaling.rope_type is RopeType.LLAMA3
  if name == "llama_biases":
    assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias
  if name.startswith("qwen2"):
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias and cfg.sliding_window is None
  if name == "mistral":
    assert cfg.sliding_window == 8 and all(cfg.layer_window(i) == 8 for i in range(2))


def test_logits_match_transformers(family):
  """Prefill logits within 1e-4 (f32), the prompt longer than Mistral's window;
  the fused q/k/v + gate/up layout computes the same."""
  _, hf, model = family
  tokens = np.random.default_rng(5).integers(0, V, (2, 40))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  for m in (model, model.fuse_projections()):
    got = _logits(m, tokens)
    assert np.abs(got - ref).max() < 1e-4, (m.fused_projections, np.abs(got - ref).max())


@pytest.mark.parametrize("name", sorted(LOGIT_CASES))
def test_more_configs_match_transformers(name, tmp_path):
  hf = _save_random(name, LOGIT_CASES[name], tmp_path)
  model = load_llama(tmp_path)
  if name == "qwen2_sliding":
    assert model.cfg.layer_types == (LayerType.FULL, LayerType.SLIDING)
    assert [model.cfg.layer_window(i) for i in range(2)] == [None, 6]
  else:
    assert model.cfg.rope_scaling.rope_type is RopeType.DYNAMIC
    assert model.cfg.position_limit == 128
  tokens = np.random.default_rng(6).integers(0, V, (2, 30))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  assert np.abs(_logits(model, tokens) - ref).max() < 1e-4


def test_greedy_tokens_match_transformers_plain_chain_and_tree(family):
  """32 greedy tokens equal transformers' through the engine, plain, chain and tree."""
  name, hf, model = family
  if name == "llama_biases":
    pytest.skip("biases are covered by the logits test (CI time)")
  prompt = np.random.default_rng(7).integers(0, V, PROMPT).tolist()
  want = _hf_greedy(hf, prompt, NEW)
  engine = Engine(model.fuse_projections(), None, _random_heads(model.cfg.hidden_size),
                  max_cache_len=128, max_tree_rows=12, eos_ids=())
  for mode in ("none", "chain", "tree"):
    res = engine.generate([prompt], NEW, speculate=mode)
    assert res.tokens[0] == want, (name, mode)
    if mode != "none":
      assert res.tree_nodes > 1 and not res.speculation_skipped


# ----------------------------------------------------------------------------- refusals

def _cfg(model_type="llama", **over):
  d = {"model_type": model_type, "architectures": [Family(model_type).architecture]
       if model_type in {f.value for f in Family} else None,
       "vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2}
  d.update(over)
  return {k: v for k, v in d.items() if v is not None}


@pytest.mark.parametrize("config,match", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type='gemma'"),
    ({"model_type": None, "architectures": None}, "missing model_type"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_type='longrope'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "attention_factor": 0.7}},
     "attention_factor=0.7"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"sliding_window": 16}, "sliding_window=16"),  # not a llama field
    ({"layer_types": ["full_attention"] * 2}, "layer_types"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"auto_map": {"AutoModelForCausalLM": "x.Y"}}, "auto_map"),
    ({"is_encoder_decoder": True}, "is_encoder_decoder=True"),
    ({"logit_scale": 0.5}, "logit_scale=0.5"),
    ({"attention_bias": "yes"}, "attention_bias: expected a bool"),
])
def test_refused_llama_configs(config, match):
  with pytest.raises(UnsupportedModelError if "expected a bool" not in match else ConfigError,
                     match=match):
    LlamaConfig.from_hf(_cfg(**config))


@pytest.mark.parametrize("model_type,config,match", [
    ("mistral", {"attention_bias": True}, "attention_bias=True"),
    ("mistral", {"layer_types": ["sliding_attention"] * 2}, "layer_types"),
    ("mistral", {"mlp_bias": True}, "mlp_bias=True"),
    ("qwen2", {"use_mrope": True}, "use_mrope=True"),
    ("qwen2", {"layer_types": ["chunked_attention", "full_attention"]},
     "layer_types\\[0\\]='chunked_attention'"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "no sliding_window"),
])
def test_refused_family_configs(model_type, config, match):
  with pytest.raises(UnsupportedModelError, match=match):
    LlamaConfig.from_hf(_cfg(model_type, **config))


def test_family_defaults_and_accepted_fields():
  """Missing fields mean what they mean to transformers; inert fields are accepted."""
  cfg = LlamaConfig.from_hf(_cfg("mistral"))
  assert cfg.sliding_window == 4096 and cfg.rms_norm_eps == 1e-6
  assert cfg.max_position_embeddings == 131072 and cfg.eos_token_ids == (2,)
  assert LlamaConfig.from_hf({**_cfg("mistral"), "sliding_window": None}).sliding_window is None
  qwen = LlamaConfig.from_hf(_cfg("qwen2", sliding_window=8, max_window_layers=1))
  assert qwen.sliding_window is None and qwen.qkv_bias  # use_sliding_window defaults to false
  assert qwen.eos_token_ids == () and qwen.bos_token_id is None
  cfg = LlamaConfig.from_hf(_cfg(attention_dropout=0.1, pretraining_tp=2, use_cache=False,
                                 initializer_range=0.02, torch_dtype="bfloat16",
                                 max_sequence_length=2048, is_decoder=False,
                                 rope_scaling={"type": "dynamic", "factor": 2.0}))
  assert cfg.rope_scaling.rope_type is RopeType.DYNAMIC and cfg.position_limit == 2048
  np.testing.assert_array_equal(cfg.inv_freq, LlamaConfig.from_hf(_cfg()).inv_freq)
  assert LlamaConfig.from_hf({k: v for k, v in _cfg().items() if k != "model_type"}).family \
      is Family.LLAMA


def test_unexpected_bias_tensor_is_refused(tmp_path):
  hf = _save_random("qwen2_tied", CASES["qwen2_tied"], tmp_path)
  del hf
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
  for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
    cfg.pop(key)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedModelError, match=r"self_attn\.[qkv]_proj\.bias is in the checkpoint"):
    load_llama(tmp_path)


def test_dynamic_rope_refuses_a_longer_cache(tmp_path):
  _save_random("llama_dynamic", LOGIT_CASES["llama_dynamic"], tmp_path)
  model = load_llama(tmp_path)
  Engine(model, max_cache_len=128)
  with pytest.raises(ConfigError, match="max_position_embeddings=128: rope_scaling type .dynamic."):
    Engine(model, max_cache_len=256)


def test_biases_on_a_mesh_compute_the_same():
  """Megatron rules place every bias (column-parallel split, row-parallel replicated) and
  the sharded model gives the unsharded logits."""
  from jax.sharding import PartitionSpec as P

  from medusa_jax.models.llama import Llama
  from medusa_jax.models.llama_sharding import shard_llama
  from medusa_jax.parallel.mesh import make_mesh
  cfg = LlamaConfig.tiny(vocab_size=128, num_attention_heads=4, num_key_value_heads=4,
                         qkv_bias=True, o_bias=True, mlp_bias=True)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  for layer in model.layers:
    for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                layer.mlp.down_proj):
      lin.bias[...] = 0.3 * jax.random.normal(next(keys), lin.bias[...].shape)
  mesh = make_mesh(2, 4)
  with jax.set_mesh(mesh):
    sharded = shard_llama(model, mesh)
  attn, mlp = sharded.layers[0].self_attn, sharded.layers[0].mlp
  assert attn.q_proj.bias[...].sharding.spec == P("model")
  assert mlp.up_proj.bias[...].sharding.spec == P("model")
  assert attn.o_proj.bias[...].sharding.spec == P() == mlp.down_proj.bias[...].sharding.spec
  tokens = np.random.default_rng(2).integers(0, 128, (2, 12))
  np.testing.assert_allclose(_logits(sharded, tokens), _logits(model, tokens), atol=1e-5)
