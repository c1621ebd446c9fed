"""Hugging Face model ids: the local hub cache layout, and an optional download.

``org/name`` resolves, as transformers resolves it offline, to
``$HF_HUB_CACHE`` (else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``)
``/models--org--name/snapshots/<commit>``, the commit read from
``refs/<revision>`` (``main`` by default; a 40-hex revision is a commit). An
existing local path always wins. When the id is not cached,
``huggingface_hub.snapshot_download`` fetches it if that package is installed
and ``HF_HUB_OFFLINE`` is not set; otherwise (or when the download fails) the
error says where it looked and how to fetch the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from medusa_jax.errors import ModelNotFoundError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt")
"""What a base model download fetches (no duplicate ``.bin`` / ``.pt`` weights)."""


def hub_cache() -> Path:
  """The Hugging Face hub cache directory, by the ``huggingface_hub`` environment rules."""
  if os.environ.get("HF_HUB_CACHE"):
    return Path(os.environ["HF_HUB_CACHE"]).expanduser()
  if os.environ.get("HF_HOME"):
    return Path(os.environ["HF_HOME"]).expanduser() / "hub"
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(xdg) / "huggingface" / "hub"


def is_repo_id(name: str) -> bool:
  """``org/name`` that is not an existing local path."""
  return bool(_REPO_ID.match(name)) and not os.path.exists(name)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
  """The cached snapshot directory of ``repo_id`` at ``revision``, or None."""
  repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
  revision = revision or "main"
  if _COMMIT.match(revision):
    commit = revision
  else:
    ref = repo / "refs" / revision
    if not ref.is_file():
      return None
    commit = ref.read_text(encoding="utf-8").strip()
  snapshot = repo / "snapshots" / commit
  return snapshot if snapshot.is_dir() else None


def resolve(name_or_path: str | os.PathLike, *, what: str = "model",
            revision: str | None = None, allow_patterns: Sequence[str] | None = MODEL_FILES
            ) -> str:
  """A local directory (or file) for a path or a Hugging Face id.

  Args:
    name_or_path: a local path, or ``org/name``.
    what: "model" or "adapter", named in errors.
    revision: a branch, tag or commit (default ``main``).
    allow_patterns: the files a download fetches (None: all).

  Returns:
    The path itself, or the cached (or downloaded) snapshot directory.

  Raises:
    ModelNotFoundError: neither a local path nor an id in the cache (and no
      download possible), saying where it looked and how to fetch it.
  """
  name = os.fspath(name_or_path)
  if os.path.exists(name):
    return name
  if not _REPO_ID.match(name):
    raise ModelNotFoundError(f"{what} {name}: no such file or directory")
  snapshot = cached_snapshot(name, revision)
  if snapshot is not None:
    return str(snapshot)
  looked = hub_cache() / ("models--" + name.replace("/", "--"))
  why = _download(name, revision, allow_patterns)
  if isinstance(why, Path):
    return str(why)
  raise ModelNotFoundError(
      f"{what} {name}: not a local directory and not in the Hugging Face cache (looked for"
      f" {looked}/refs/{revision or 'main'} and its snapshot; set HF_HOME or HF_HUB_CACHE if"
      f" the cache is elsewhere); {why}. Fetch it where there is a network with `hf download"
      f" {name}` (or `huggingface-cli download {name}`), or pass a local directory")


def _download(repo_id: str, revision: str | None, allow_patterns) -> Path | str:
  """The downloaded snapshot, or why there is none."""
  if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
    return "HF_HUB_OFFLINE is set, so nothing was downloaded"
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    return "huggingface_hub is not installed, so nothing was downloaded"
  try:
    return Path(snapshot_download(repo_id, revision=revision,
                                  allow_patterns=None if allow_patterns is None
                                  else list(allow_patterns)))
  except Exception as e:  # offline, unknown repo, gated repo, ...
    return f"downloading failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
