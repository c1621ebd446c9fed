"""Pod evaluation: 2 processes on one CPU machine, end to end; the pieces by hand."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from medusa_jax.training import pod_eval
from medusa_jax.errors import ConfigError, ShardingError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "tpu_pod_eval.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_pod_eval_end_to_end(tmp_path):
  """2 processes x 2 CPU devices, coordinator on 127.0.0.1: JSON + PNG from process 0."""
  out = tmp_path / "eval"
  port = _free_port()
  args = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--tiny",
          "--cpu-devices", "2", "--num-prompts", "5", "--batch-size", "2",
          "--max-new-tokens", "5", "--speculate", "chain", "--out", str(out)]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, SCRIPT, *args, "--process-id", str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"

  summary = json.loads((out / "pod_eval.json").read_text())
  assert (out / "pod_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert summary["mesh"]["shape"] == {"data": 2, "model": 2}
  assert summary["mesh"]["processes"] == 2
  hosts = summary["hosts"]
  assert [h["process"] for h in hosts] == [0, 1]
  assert [h["prompts"] for h in hosts] == [3, 2]      # prompts[p::2]
  assert [r["prompt"] for r in summary["per_prompt"]] == [0, 1, 2, 3, 4]
  assert all(r["new_tokens"] == 5 and len(r["tokens"]) == 5 for r in summary["per_prompt"])
  total = summary["total"]
  assert total["new_tokens"] == 25 == sum(h["new_tokens"] for h in hosts)
  assert total["steps"] == sum(h["steps"] for h in hosts) > 0
  assert len(total["head_acceptance"]) == 3
  assert total["tokens_per_step"] == pytest.approx((25 - 5) / total["steps"])
  assert all(h["tokens_per_s"] > 0 for h in hosts)

  # The pod's tokens are the engine's on one process (same tiny model, same prompts).
  cfg = pod_eval.PodEvalConfig(tiny=True, num_prompts=5, max_new_tokens=5, speculate="chain")
  local = pod_eval.pod_mesh(2)
  engine = pod_eval.build_engine(cfg, pod_eval.host_mesh(
      jax.sharding.Mesh(local.devices[:1], local.axis_names, axis_types=local.axis_types), 0))
  prompts = pod_eval.load_prompts(cfg, engine.cfg.vocab_size)
  want = engine.generate(prompts, max_new_tokens=5, speculate="chain").tokens
  assert [r["tokens"] for r in summary["per_prompt"]] == want


def test_pod_mesh_single_process():
  mesh = pod_eval.pod_mesh(4)
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  assert pod_eval.host_mesh(mesh, 0).devices.shape == (2, 4)
  assert dict(pod_eval.pod_mesh().shape) == {"data": 1, "model": 8}
  with pytest.raises(ShardingError, match="mesh axis 'model' of size 3 does not divide the 8"
                                          " devices of a host"):
    pod_eval.pod_mesh(3)


def test_auto_model_parallel():
  assert pod_eval.auto_model_parallel((9, 576, 1536, 49152), 8) == 1   # SmolLM2: 9 heads
  assert pod_eval.auto_model_parallel((32, 4096, 14336, 128256), 8) == 8
  assert pod_eval.auto_model_parallel((12, 768, 3072, 32000), 8) == 4


def test_host_share_partitions_prompts():
  items = list(range(11))
  shares = [pod_eval.host_share(items, p, 3) for p in range(3)]
  assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
  assert sorted(sum(shares, [])) == items


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("max_new_tokens", -1),
                                         ("num_prompts", 0), ("model_parallel", 1.5),
                                         ("num_processes", True)])
def test_config_errors(field, value):
  with pytest.raises(ConfigError, match=f"{field}: expected a positive integer"):
    pod_eval.PodEvalConfig(**{field: value})


def test_summarize_hand_checked_and_report(tmp_path):
  """2 hosts, 3 slots each (host 1 has a padding slot), n = 2 heads."""
  gathered = dict(
      prompt_ids=np.array([[0, 2, 4], [1, 3, -1]]),
      new_tokens=np.array([[5, 9, 3], [7, 4, 99]]),
      steps=np.array([[2, 4, 2], [3, 3, 99]]),
      head_accepts=np.array([[[2, 0], [3, 2], [0, 0]], [[3, 1], [0, 0], [9, 9]]]),
      tokens=np.arange(2 * 3 * 9).reshape(2, 3, 9),
      timing=np.array([[2.0, 1.5, 6.0], [1.0, 0.5, 4.0]]))  # wall, decode_s, decode_tokens
  cfg = pod_eval.PodEvalConfig(tiny=True)
  s = pod_eval.summarize(gathered, cfg)
  h0, h1 = s["hosts"]
  assert (h0["prompts"], h0["new_tokens"], h0["steps"]) == (3, 17, 8)
  assert h0["tokens_per_step"] == pytest.approx((17 - 3) / 8)
  assert h0["head_acceptance"] == pytest.approx([5 / 8, 2 / 8])
  assert h0["tokens_per_s"] == pytest.approx(17 / 2.0)
  assert h0["decode_tokens_per_s"] == pytest.approx(6.0 / 1.5)
  assert (h1["prompts"], h1["new_tokens"], h1["steps"]) == (2, 11, 6)
  assert h1["head_acceptance"] == pytest.approx([3 / 6, 1 / 6])
  t = s["total"]
  assert (t["prompts"], t["new_tokens"], t["steps"]) == (5, 28, 14)
  assert t["tokens_per_step"] == pytest.approx(23 / 14)
  assert t["tokens_per_s"] == pytest.approx(28 / 2.0)
  assert t["decode_tokens_per_s"] == pytest.approx(4.0 + 8.0)
  assert [r["prompt"] for r in s["per_prompt"]] == [0, 1, 2, 3, 4]
  assert s["per_prompt"][1]["tokens"] == list(range(27, 34))  # host 1 slot 0, 7 tokens
  json_path, png_path = pod_eval.write_report(s, str(tmp_path / "r"))
  assert json.loads(open(json_path).read())["total"]["new_tokens"] == 28
  assert os.path.getsize(png_path) > 1000
