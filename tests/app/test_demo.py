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
