"""Atomic writes: old-or-new at every instant, the overwrite guard, modes, full disks, crashes."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from medusa_files import head_tensors
from safetensors.numpy import save_file

from medusa_jax import _atomic
from medusa_jax.errors import OutputExistsError, WriteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _siblings(path) -> list[str]:
  """Temporary siblings of ``path`` in its directory."""
  head, name = os.path.split(os.fspath(path))
  return sorted(e for e in os.listdir(head) if e.startswith(f".{name}."))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.fixture
def umask_027():
  old = os.umask(0o027)
  yield
  os.umask(old)


# ----------------------------------------------------------------------------- files


def test_write_file_guard_replace_and_mode(tmp_path, umask_027):
  path = tmp_path / "a.json"
  _atomic.write_json(path, {"x": 1})
  assert path.read_text() == '{\n  "x": 1\n}\n'
  assert path.stat().st_mode & 0o777 == 0o640  # 0o666 & ~0o027, not 0o600
  with pytest.raises(OutputExistsError, match=r"a\.json: already exists; pass overwrite=True"):
    _atomic.write_json(path, {"x": 2})
  _atomic.write_json(path, {"x": 2}, overwrite=True)
  assert '"x": 2' in path.read_text()
  with pytest.raises(OutputExistsError, match="is a directory"):
    _atomic.write_text(tmp_path, "x", overwrite=True)
  assert _siblings(path) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "w.bin"
  old = os.urandom(64)
  _atomic.write_bytes(path, old)

  def half(tmp):
    with open(tmp, "wb") as f:
      f.write(b"half")
    raise RuntimeError("killed mid-write")
  with pytest.raises(RuntimeError, match="killed mid-write"):
    _atomic.write_file(path, half, overwrite=True)
  assert path.read_bytes() == old and _siblings(path) == []


def test_full_disk_is_a_write_error_naming_the_destination(tmp_path, monkeypatch):
  path = tmp_path / "model.safetensors"
  old = {"w": np.random.default_rng().standard_normal(8).astype(np.float32)}
  _atomic.write_safetensors(path, old)

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(_atomic, "_fsync", full)
  with pytest.raises(WriteError) as e:
    _atomic.write_safetensors(path, {"w": np.zeros(4, np.float32)}, overwrite=True)
  assert str(e.value) == f"{path}: cannot write (No space left on device)"
  assert ".partial" not in str(e.value)
  monkeypatch.undo()
  from safetensors.numpy import load_file
  np.testing.assert_array_equal(load_file(path)["w"], old["w"])
  assert _siblings(path) == []


def test_a_real_write_failure_from_the_safetensors_writer(tmp_path):
  """A file-size limit makes the Rust writer fail for real (EFBIG): typed, destination named."""
  code = f"""
import resource, signal, sys
import numpy as np
sys.path.insert(0, {REPO!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from medusa_jax import _atomic
from medusa_jax.errors import WriteError
try:
  _atomic.write_safetensors({str(tmp_path / 'big.safetensors')!r}, {{"w": np.ones(1 << 16, np.float32)}})
except WriteError as e:
  print("WriteError", e)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert out.stdout.startswith(f"WriteError {tmp_path / 'big.safetensors'}: cannot write"), (
      out.stdout + out.stderr)
  assert ".partial" not in out.stdout
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- directories


def test_replace_dir_guard_foreign_entries_and_empty_dir(tmp_path, umask_027):
  dst = tmp_path / "art"
  with _atomic.replace_dir(dst, what="a thing") as tmp:
    _atomic.write_text(os.path.join(tmp, "a.json"), "1")
  assert (dst / "a.json").read_text() == "1"
  assert dst.stat().st_mode & 0o777 == 0o750
  with pytest.raises(OutputExistsError, match=r"art: already holds a thing; pass overwrite=True"):
    with _atomic.replace_dir(dst, what="a thing"):
      pass
  (dst / "notes.py").write_text("mine")
  with pytest.raises(OutputExistsError, match=r"holds notes\.py, which is not part of a thing"):
    with _atomic.replace_dir(dst, overwrite=True, what="a thing",
                             belongs=lambda name, is_dir: name.endswith(".json")):
      pass
  assert (dst / "notes.py").read_text() == "mine"  # never deleted
  empty = tmp_path / "empty"
  empty.mkdir()
  with _atomic.replace_dir(empty) as tmp:  # an empty directory counts as absent
    _atomic.write_text(os.path.join(tmp, "b.json"), "2")
  assert os.listdir(empty) == ["b.json"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(OutputExistsError, match="exists and is not a directory"):
    with _atomic.replace_dir(tmp_path / "file", overwrite=True):
      pass


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_swaps_whole_and_an_exception_keeps_the_old(tmp_path, monkeypatch, exchange):
  if not exchange:
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)  # the two-rename fallback
  dst = tmp_path / "art"
  with _atomic.replace_dir(dst) as tmp:
    _atomic.write_text(os.path.join(tmp, "old.json"), "old")
  with pytest.raises(KeyError):
    with _atomic.replace_dir(dst, overwrite=True) as tmp:
      _atomic.write_text(os.path.join(tmp, "new.json"), "new")
      raise KeyError("boom")
  assert os.listdir(dst) == ["old.json"] and _siblings(dst) == []
  with _atomic.replace_dir(dst, overwrite=True) as tmp:
    _atomic.write_text(os.path.join(tmp, "new.json"), "new")
  assert os.listdir(dst) == ["new.json"] and _siblings(dst) == []  # nothing old shadows it


def test_the_next_write_cleans_a_killed_writers_temporaries(tmp_path):
  dst = tmp_path / "art"
  with _atomic.replace_dir(dst) as tmp:
    _atomic.write_text(os.path.join(tmp, "v.json"), "1")
  pid = _dead_pid()
  partial = tmp_path / f".art.partial-{pid}-deadbeef"
  partial.mkdir()
  (partial / "junk.bin").write_bytes(os.urandom(128))
  # A writer killed between the two renames of the fallback: the old one is aside.
  os.rename(dst, tmp_path / f".art.old-{pid}-cafe0000")
  alive = tmp_path / f".art.partial-{os.getpid()}-0000live"  # ours: another thread's, kept
  alive.mkdir()
  _atomic.clean_stale(dst)
  assert (dst / "v.json").read_text() == "1"  # put back
  assert _siblings(dst) == [alive.name]
  os.rmdir(alive)


# ----------------------------------------------------------------------------- crashes

_WRITER = r"""
import os, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, os.path.join({repo!r}, "tests"))
from medusa_jax.adapters.weights import MedusaWeights
from medusa_jax.config import MedusaConfig
versions = []
for path, n in zip({sources!r}, (2, 3)):
  cfg = MedusaConfig(base_model_name_or_path="b", medusa_num_heads=n, medusa_num_layers=1)
  versions.append((MedusaWeights.load(cfg, path), [[0]] * n + [[1]]))
k = 0
while True:
  w, choices = versions[k % 2]
  w.save({lorax!r}, overwrite=True, choices=choices)
  w.save_orbax({orbax!r}, overwrite=True)
  if k == 1:
    print("ready", flush=True)
  k += 1
"""


def _which(loaded: dict, versions: list[dict]) -> int:
  for i, want in enumerate(versions):
    if loaded.keys() == want.keys() and all(
        np.array_equal(loaded[k], want[k]) for k in want):
      return i
  raise AssertionError(f"loaded tensors are neither version: {sorted(loaded)}")


def _check_on_disk(lorax, orbax, versions):
  """What is on disk loads, through the library's loaders, as one version, whole."""
  from medusa_jax.adapters.io import adapter_choices
  from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter
  w = load_medusa_adapter(lorax)
  i = _which(w.lorax_tensors(), versions)
  assert w.speculative_tokens == (2, 3)[i]
  assert adapter_choices(lorax) == tuple([(0,)] * (2, 3)[i] + [(1,)])
  o = MedusaWeights.load_orbax(orbax)
  j = _which(o.lorax_tensors(), versions)
  assert o.speculative_tokens == (2, 3)[j]
  return i, j


def test_sigkill_at_random_instants_leaves_old_or_new(tmp_path):
  """A writer alternating two adapters (LoRAX dir + choices, Orbax dir) is frozen
  (SIGSTOP) at random instants, what is on disk is loaded, then it is killed
  (SIGKILL) at a random instant; twice. Every load gives one version, whole."""
  pytest.importorskip("orbax.checkpoint")
  rng = np.random.default_rng()
  sources, versions = [], []
  for n in (2, 3):
    t = head_tensors(rng, n=n, hidden=16)
    path = tmp_path / f"src{n}.safetensors"
    save_file(t, str(path))
    sources.append(str(path))
    versions.append(t)
  lorax, orbax = str(tmp_path / "out" / "lorax"), str(tmp_path / "out" / "orbax")
  seen = set()
  rnd = random.Random()
  for _ in range(2):
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(repo=REPO, sources=sources, lorax=lorax,
                                              orbax=orbax)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
      assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
      deadline = time.monotonic() + 3.0
      while time.monotonic() < deadline:
        time.sleep(rnd.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGSTOP)
        try:
          seen.add(_check_on_disk(lorax, orbax, versions))
        finally:
          os.kill(proc.pid, signal.SIGCONT)
      time.sleep(rnd.uniform(0.0, 0.5))
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=30)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    seen.add(_check_on_disk(lorax, orbax, versions))
  assert {i for i, _ in seen} == {0, 1}, seen  # both versions were caught on disk
  # The next write removes what the killed writers left beside the destinations.
  from medusa_jax.adapters.weights import load_medusa_adapter
  w = load_medusa_adapter(lorax)
  w.save(lorax, overwrite=True)
  w.save_orbax(orbax, overwrite=True)
  assert _siblings(lorax) == [] and _siblings(orbax) == []
