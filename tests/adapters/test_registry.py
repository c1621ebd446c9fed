"""AdapterRegistry: LoRAX's static/dynamic Medusa loading rules."""

from __future__ import annotations

import pytest

from medusa_jax.adapters.registry import AdapterRegistry
from medusa_jax.config import MedusaConfig
from medusa_jax.errors import AdapterLoadError, MedusaError
from medusa_jax.adapters.weights import MedusaWeights

H = 8


def _w(n: int = 3, *, version: float = 2.0, layers: int = 1, hidden: int = H,
       per_head: bool = False) -> MedusaWeights:
  cfg = MedusaConfig(base_model_name_or_path="base", medusa_num_heads=n,
                     medusa_num_layers=layers, version=version)
  vocab = 12 if (layers > 1 or per_head) else None
  return MedusaWeights.init(cfg, hidden, vocab, per_head_lm_head=per_head)


@pytest.fixture(scope="module")
def default3():
  return _w(3, version=1.0)  # a v1 default is fine: version gates dynamic loads only


def test_empty_registry_disables_speculation():
  reg = AdapterRegistry()
  assert not reg.enabled and reg.speculative_tokens == 0 and reg.medusa_ids == ()
  assert reg.default is None and reg.get(0) is None and reg.medusa_id_for(4) is None
  assert len(reg) == 0


def test_default_enables_speculation_with_its_head_count(default3):
  reg = AdapterRegistry()
  reg.load_default(default3)
  assert reg.enabled and reg.speculative_tokens == 3 and reg.medusa_ids == (0,)
  assert reg.get(0) is default3 and reg.default is default3 and 0 in reg
  with pytest.raises(AdapterLoadError, match="already loaded"):
    reg.load_default(_w(2))


def test_dynamic_needs_a_default():
  reg = AdapterRegistry()
  with pytest.raises(AdapterLoadError) as e:
    reg.load_dynamic(1, _w(3))
  msg = str(e.value)
  assert msg.startswith("adapter 1:") and "can only be loaded at request time" in msg
  assert "default Medusa adapter" in msg and "load_default" in msg
  assert not reg.enabled and 1 not in reg


@pytest.mark.parametrize("version", [1.0, 1.5])
def test_dynamic_needs_version_2(default3, version):
  reg = AdapterRegistry()
  reg.load_default(default3)
  with pytest.raises(AdapterLoadError) as e:
    reg.load_dynamic(2, _w(3, version=version))
  msg = str(e.value)
  assert f"Medusa version {version} " in msg and "migrate to a v2 adapter" in msg
  assert "load_default" in msg and reg.medusa_ids == (0,)


def test_dynamic_needs_same_head_count(default3):
  reg = AdapterRegistry()
  reg.load_default(default3)
  with pytest.raises(AdapterLoadError) as e:
    reg.load_dynamic(1, _w(2))
  assert ("different number of heads (2) from the default speculative tokens (3)"
          in str(e.value))


def test_checks_run_in_lorax_order(default3):
  """A v1 adapter with the wrong head count fails on the version first."""
  reg = AdapterRegistry()
  with pytest.raises(AdapterLoadError, match="request time"):
    reg.load_dynamic(1, _w(2, version=1.0))
  reg.load_default(default3)
  with pytest.raises(AdapterLoadError, match="version 1.0"):
    reg.load_dynamic(1, _w(2, version=1.0))


def test_dynamic_needs_the_default_architecture(default3):
  reg = AdapterRegistry()
  reg.load_default(default3)
  with pytest.raises(AdapterLoadError, match="V1 heads with H=8, L=2, V=12; expected V2 heads"):
    reg.load_dynamic(1, _w(3, layers=2))
  with pytest.raises(AdapterLoadError, match="V1 heads with H=8, L=1, V=12; expected V2"):
    reg.load_dynamic(1, _w(3, per_head=True))
  with pytest.raises(AdapterLoadError, match="V2 heads with H=16; expected V2 heads with H=8"):
    reg.load_dynamic(1, _w(3, hidden=16))
  v1 = AdapterRegistry()
  v1.load_default(_w(3, layers=2))
  v1.load_dynamic(1, _w(3, layers=2))  # V1 adapters batch with a V1 default of equal shapes
  with pytest.raises(AdapterLoadError, match="L=3.*expected V1 heads with H=8, L=2"):
    v1.load_dynamic(2, _w(3, layers=3))
  assert v1.medusa_ids == (0, 1)


def test_dynamic_load_routing_and_unload(default3):
  reg = AdapterRegistry()
  reg.load_default(default3)
  a5, a2 = _w(3), _w(3, version=2.5)
  reg.load_dynamic(5, a5)
  reg.load_dynamic(2, a2)
  assert reg.medusa_ids == (0, 2, 5) and reg.get(5) is a5 and reg.get(7) is None
  assert [i for i, _ in reg.items()] == [0, 2, 5]
  assert reg.speculative_tokens == 3
  # Requests of adapters without Medusa heads draft with the default.
  assert [reg.medusa_id_for(i) for i in (0, 2, 3, 5)] == [0, 2, 0, 5]
  with pytest.raises(AdapterLoadError, match="adapter 5: already loaded"):
    reg.load_dynamic(5, _w(3))
  with pytest.raises(AdapterLoadError, match=r"dynamic adapters \[2, 5\]"):
    reg.unload(0)
  assert reg.unload(5) is a5 and reg.unload(2) is a2
  with pytest.raises(AdapterLoadError, match=r"no Medusa adapter.*loaded: \[0\]"):
    reg.unload(2)
  assert reg.unload(0) is default3 and not reg.enabled and reg.speculative_tokens == 0


@pytest.mark.parametrize("index", [0, -1, True, 1.0, "1"])
def test_bad_dynamic_index(default3, index):
  reg = AdapterRegistry()
  reg.load_default(default3)
  with pytest.raises(AdapterLoadError, match="index >= 1"):
    reg.load_dynamic(index, _w(3))


def test_registries_are_independent(default3):
  a, b = AdapterRegistry(), AdapterRegistry()
  a.load_default(default3)
  assert a.enabled and not b.enabled
  with pytest.raises(AdapterLoadError):
    b.load_dynamic(1, _w(3))
  assert issubclass(AdapterLoadError, MedusaError)


def test_engine_holds_its_adapters_under_loras_rules():
  """The engine loads a map of adapters through the registry: what LoRAX refuses, it refuses."""
  from flax import nnx

  from medusa_jax.decoding.engine import Engine
  from medusa_jax.models.llama import Llama, LlamaConfig
  llama = Llama(LlamaConfig.tiny(vocab_size=64, hidden_size=H, intermediate_size=16,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                 eos_token_ids=()), rngs=nnx.Rngs(0))
  v2_default = _w(3)
  with pytest.raises(AdapterLoadError, match="adapter 1: Dynamic adapter loading is not"
                                             " supported for Medusa version 1.0"):
    Engine(llama, None, {0: v2_default, 1: _w(3, version=1.0)})
  with pytest.raises(AdapterLoadError, match="different number of heads \\(2\\)"):
    Engine(llama, None, {0: v2_default, 1: _w(2)})
  with pytest.raises(AdapterLoadError, match="adapter 0"):
    Engine(llama, None, {1: _w(3)})  # no default
  eng = Engine(llama, None, {0: v2_default, 2: _w(3), 3: None}, max_cache_len=32)
  assert eng.registry.medusa_ids == (0, 2)
  assert eng.adapter_slots == {0: 0, 2: 1, 3: 0}  # 3 has no Medusa heads: the default's
