"""scripts/bench_row_blocks.py on a tiny model (interpreted kernels): a kernel's tiles are
timed in the whole step and checked against the defaults' tokens; a tile its kernel refuses
is reported, not timed; the JSON keeps every result."""

from __future__ import annotations

import json

from script_modules import load_script


def test_a_kernel_s_tiles_are_timed_checked_and_refused(tmp_path, capsys):
  script = load_script("bench_row_blocks")
  assert script.main(["--tiny", "--steps", "1", "--repeats", "1", "--kinds", "o",
                      "--tiles", "16,2,4", "16,2,4,2,16", "--out", str(tmp_path)]) == 0
  res = json.loads((tmp_path / "bench_row_blocks.json").read_text())
  assert res["rows"] == 1 and len(res["default_ms"]) == 1
  (only,) = res["results"]
  assert only["kind"] == "o" and only["same_tokens"] and only["ms_per_step"] > 0
  assert only["blocks"] == {"block_k": 16, "block_n": 2, "num_warps": 4}
  assert "block_m=16 without mma" in capsys.readouterr().out
