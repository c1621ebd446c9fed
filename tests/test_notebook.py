"""notebooks/medusa_jax_colab.ipynb runs top to bottom on CPU with small settings."""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from tiny_model import make_tiny_adapter_dir, make_tiny_llama_dir  # noqa: E402

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "notebooks", "medusa_jax_colab.ipynb")


def _smollm2_cached() -> bool:
  from medusa_jax.assets import cache as assets
  paths = assets.asset_paths()
  return (paths.model_dir / "model.safetensors").is_file() and paths.mtbench_jsonl.is_file()


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream":
        out.append(o["text"])
  return "".join(out)


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv("MEDUSA_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # One CPU device, as on a laptop; the suite's compile flag kept (see conftest.py).
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f))
  if not _smollm2_cached():
    # No network in the test: run the same cells on a tiny model of our own.
    cfg = make_tiny_llama_dir(tmp_path / "model", seed=5)
    make_tiny_adapter_dir(tmp_path / "adapter", hidden=cfg["hidden_size"], num_heads=3)
    monkeypatch.setenv("MEDUSA_JAX_NOTEBOOK_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("MEDUSA_JAX_NOTEBOOK_ADAPTER", str(tmp_path / "adapter"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  text = _text(nb)
  assert "skipping pip" in text  # the install cell saw the installed package
  assert "backend=cpu" in text and "modes=('none', 'tree')" in text
  rows = [ln.split() for ln in text.splitlines() if ln.startswith(("none ", "tree "))]
  assert [r[0] for r in rows] == ["none", "tree"]
  assert all(r[-1] == "True" for r in rows)  # greedy speculation gives the plain answer
  assert "same tokens as Engine.generate: True" in text
  images = [o for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == 1  # the per-head acceptance plot
