"""``medusa-jax demo`` end to end on SmolLM2 with the bundled heads, at a tiny size."""

from __future__ import annotations

import json

import pytest

from medusa_jax.app import demo
from medusa_jax.app.main import main
from medusa_jax.errors import AssetError


@pytest.fixture(scope="module")
def smol_assets():
  from medusa_jax.assets import cache as assets
  try:
    return assets.fetch(quiet=True)
  except AssetError as e:
    pytest.skip(f"SmolLM2 assets unavailable: {e}")


def test_demo_prints_the_table_and_json(smol_assets, capsys):
  assert main(["demo", "--prompts", "1", "--max-new-tokens", "8", "--speculate", "none", "tree",
                    "--json"]) == 0
  out = capsys.readouterr().out
  table, _, payload = out.partition("\n{\n")
  assert "mode" in table and "tokens/s" in table and "speed-up" in table
  rows = {line.split()[0]: line.split() for line in table.splitlines()
          if line.split() and line.split()[0] in ("none", "tree")}
  assert set(rows) == {"none", "tree"}
  assert rows["none"][1] == "1" and int(rows["tree"][1]) >= 2  # tree nodes
  result = json.loads("{\n" + payload)
  assert set(result["modes"]) == {"none", "tree"}
  for mode in ("none", "tree"):
    assert result["modes"][mode]["new_tokens"] == 8
  assert result["modes"]["none"]["tokens_per_step"] == 1.0
  assert result["identical_to_plain"] == {"none": True, "tree": True}  # greedy is lossless
  assert len(result["questions"]) == 1
  assert result["sample"]["answer"].strip()
  assert "Q: " in table and "A (tree): " in table


def test_demo_rejects_unknown_modes(smol_assets):
  from medusa_jax.errors import RequestError
  with pytest.raises(RequestError, match="speculate='beam'"):
    demo.run_demo(1, 4, speculate=["none", "beam"], engine=object(), log=None)


def test_demo_rejects_an_unknown_policy(smol_assets):
  from medusa_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="policy='fastest'"):
    demo.run_demo(1, 4, policy="fastest", engine=object(), log=None)


def test_demo_says_so_when_the_measured_policy_picks_plain_decoding(smol_assets):
  """The tree row repeats the plain run (same computation), flagged, at 1.00x."""
  from types import SimpleNamespace

  runs = []

  class PlainPicking:
    heads_notice, num_heads, measured = None, 5, {}
    config = SimpleNamespace(tree_policy="measured")
    context = SimpleNamespace(tree_policy=lambda batch: None)

    def generate(self, prompts, max_new, *, speculate, **kw):
      runs.append(speculate.value)
      stats = [SimpleNamespace(steps=max_new - 1, new_tokens=max_new) for _ in prompts]
      return SimpleNamespace(tokens=[[5] * max_new for _ in prompts], texts=["ok"] * len(prompts),
                             decode_s=0.5, decode_tokens=(max_new - 1) * len(prompts),
                             stats=stats, tree_nodes=1)
  lines = []
  out = demo.run_demo(2, 6, engine=PlainPicking(), log=lines.append)
  assert runs == ["none", "none"]  # two prompts, batch 1; the tree row is not run again
  assert out["modes"]["tree"]["speedup"] == 1.0 and out["modes"]["tree"]["repeats"] == "none"
  text = "\n".join(lines)
  assert "plain decoding pays best on this device" in text
  assert "the measured policy's choice" in text
