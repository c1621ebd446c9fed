"""What this installation has (``medusa-jax info``): cached assets, heads, devices, versions."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import argparse
from typing import Any

from medusa_jax.assets import cache as assets
from medusa_jax.bundled import SMOLLM2_HEADS as BUNDLED_HEADS

HELP = "cached assets, devices and library versions"
_PACKAGES = ("medusa_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "safetensors",
             "numpy", "tokenizers", "gguf", "torch")


def versions() -> dict[str, str | None]:
  """Installed versions of Python and the libraries medusa_jax uses (None: not installed)."""
  out: dict[str, str | None] = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def cached_assets(home: str | os.PathLike | None = None) -> dict[str, Any]:
  """The asset cache: its home and, per asset, its path, whether present, and size.

  Reads the filesystem only; nothing is fetched or hashed.
  """
  paths = assets.asset_paths(home)
  out: dict[str, Any] = {"home": str(paths.home), "home_env": assets.HOME_ENV, "assets": {}}
  for name in ("model_dir", "gguf_path", "sharegpt_json", "mtbench_jsonl"):
    path = getattr(paths, name, None)
    if path is None:
      continue
    out["assets"][name] = {"path": str(path), "present": os.path.exists(path),
                           "bytes": _size(path)}
  # `medusa-jax train` keeps its work directories (data caches, checkpoints) here by default.
  runs = paths.home / "training"
  out["training_runs"] = (sorted(p.name for p in runs.iterdir() if p.is_dir())
                          if runs.is_dir() else [])
  return out


def bundled_heads() -> dict[str, Any]:
  """The heads ``Engine.load()`` uses by default, and their config when shipped."""
  config_path = os.path.join(BUNDLED_HEADS, "config.json")
  config = None
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, ValueError):
      config = "unreadable"
  return {"path": BUNDLED_HEADS, "present": config is not None, "config": config}


def devices() -> dict[str, Any]:
  """JAX's default backend and its devices."""
  import jax  # only here: `info --no-devices` never imports JAX
  devs = jax.devices()
  return {"backend": jax.default_backend(), "count": len(devs),
          "devices": [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip()
                      for d in devs]}


def collect(home: str | os.PathLike | None = None, *, with_devices: bool = True
            ) -> dict[str, Any]:
  """Everything ``medusa-jax info`` reports, as a JSON-ready dict."""
  report: dict[str, Any] = {"versions": versions(), "cache": cached_assets(home),
                            "bundled_heads": bundled_heads(), "platform": platform.platform()}
  if with_devices:
    report["devices"] = devices()
  return report


def _size(path) -> int | None:
  if os.path.isfile(path):
    return os.path.getsize(path)
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)
  return None


def _human(n: int | None) -> str:
  if n is None:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def format_report(report: dict[str, Any]) -> str:
  """The human-readable form of :func:`collect`'s dict."""
  lines = ["versions:"]
  lines += [f"  {k:18s} {v or 'not installed'}" for k, v in report["versions"].items()]
  cache = report["cache"]
  lines.append(f"cache: {cache['home']}  (set ${cache['home_env']} to move it)")
  for name, a in cache["assets"].items():
    state = _human(a["bytes"]) if a["present"] else "missing (run `medusa-jax fetch`)"
    lines.append(f"  {name:18s} {state:>12s}  {a['path']}")
  if cache["training_runs"]:
    lines.append(f"  training runs: {', '.join(cache['training_runs'])}")
  heads = report["bundled_heads"]
  if heads["present"] and isinstance(heads["config"], dict):
    c = heads["config"]
    what = f"{c.get('medusa_num_heads')} heads, version {c.get('version')}"
  else:
    what = "not shipped (Engine.load() initialises fresh heads)"
  lines.append(f"bundled heads: {what}  {heads['path']}")
  if "devices" in report:
    d = report["devices"]
    lines.append(f"devices: {d['backend']} x{d['count']}: {', '.join(d['devices'])}")
  lines.append(f"platform: {report['platform']}")
  return "\n".join(lines)


EPILOG = """\
examples:
  medusa-jax info
  medusa-jax info --json | python -c "import json,sys; print(json.load(sys.stdin)['devices'])"
  MEDUSA_JAX_HOME=/data/mj medusa-jax info --no-devices
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--home", default=None, help="cache directory (default: $MEDUSA_JAX_HOME)")
  p.add_argument("--no-devices", action="store_true", help="skip importing JAX")


def run(ns: argparse.Namespace) -> int:
  report = collect(ns.home, with_devices=not ns.no_devices)
  print(json.dumps(report, indent=1) if ns.json else format_report(report))
  sys.stdout.flush()
  return 0
