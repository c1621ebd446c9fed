"""Smoke test of scripts/bench_mesh.py: a tiny model on fake CPU devices, engine and serving core.

Kept cheap (one mesh pair, one batch, tree mode only); speed is never asserted.
"""

from __future__ import annotations

import json

from script_modules import load_script


def test_bench_mesh_quick_runs_engine_and_serving_core(tmp_path):
  rows = load_script("bench_mesh").main(["--quick", "--layers", "1", "--new-tokens", "4",
                                         "--meshes", "1x2,9x9", "--modes", "tree", "--serving",
                                         "--out", str(tmp_path)])
  assert [(r["kind"], r["data"], r["model"]) for r in rows] == [("engine", 1, 2),
                                                                ("serving", 1, 2)]
  for r in rows:
    assert not r["errors"], r["errors"]
    assert r["tokens_per_s"] > 0 and r["tokens_per_step"] >= 1 and r["step_ms"] > 0
    assert r["efficiency"] is None  # no 1x1 row to compare with
  saved = json.loads((tmp_path / "bench_mesh.json").read_text())
  assert len(saved["rows"]) == 2 and saved["meta"]["devices"] == 8


def test_scaling_efficiency_is_per_device_throughput_against_one_device():
  rows = [dict(kind="engine", mode="tree", batch=8, devices=d, tokens_per_s=t)
          for d, t in ((1, 100.0), (2, 150.0), (4, 100.0))]
  rows.append(dict(kind="engine", mode="tree", batch=32, devices=2, tokens_per_s=50.0))
  load_script("bench_mesh").add_efficiency(rows)
  assert [r["efficiency"] for r in rows] == [1.0, 0.75, 0.25, None]
