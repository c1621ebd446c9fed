"""Atomic, guarded writes: every file and directory the package writes goes through here.

A crash (SIGKILL, power loss after the fsync) at any instant leaves either the
old complete artifact or the new complete one at the destination, never a mix:

* a **file** is written into a temporary sibling ``.{name}.partial-{pid}-{tag}``,
  flushed with ``fsync`` and renamed over the destination (``os.replace``);
* a **directory** artifact (an adapter, an Orbax checkpoint, a converted
  model) is built in a temporary sibling directory and swapped into place with
  one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), or renamed onto an empty
  destination. Where the exchange is unavailable the old directory is first
  renamed to ``.{name}.old-{pid}-{tag}`` and restored by the next write if the
  process died in between. The whole old directory goes, so no file of the old
  artifact can shadow the new one (loaders read the union of a directory's
  weight files).

An existing destination is replaced only with ``overwrite=True`` (an empty
directory counts as absent), and a directory holding entries that are not part
of an artifact of its kind is never replaced: ``save("~", overwrite=True)``
must not wipe a home directory. Temporary siblings left by a killed writer are
removed by the next write to the same destination. Files get the mode the
umask gives (``0o666 & ~umask``; directories ``0o777 & ~umask``). An ``OSError``
(``ENOSPC``, ``EACCES``, ...) becomes a :class:`~medusa_jax.errors.WriteError`
naming the destination, never the temporary name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterator

from medusa_jax.errors import OutputExistsError, WriteError

_PARTIAL = "partial"
_OLD = "old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _temp_name(path: str, kind: str) -> str:
  head, name = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_path(path: str, *, directory: bool = False) -> None:
  fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
  try:
    _fsync(fd)
  finally:
    os.close(fd)


def _fsync(fd: int) -> None:
  """``os.fsync``; its own function so that a test can make it fail like a full disk."""
  os.fsync(fd)


def _fsync_parent(path: str) -> None:
  try:
    _fsync_path(os.path.dirname(os.path.abspath(path)) or ".", directory=True)
  except OSError as e:  # some file systems refuse to fsync a directory; the rename is done
    if e.errno not in (errno.EINVAL, errno.EBADF, errno.EPERM, errno.EACCES):
      raise


def _umask() -> int:
  """The process umask, read without changing it where /proc allows."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)  # elsewhere: the classic read (not thread-safe, and brief)
  os.umask(mask)
  return mask


def file_mode() -> int:
  """The mode a new file gets: ``0o666 & ~umask``."""
  return 0o666 & ~_umask()


def dir_mode() -> int:
  """The mode a new directory gets: ``0o777 & ~umask``."""
  return 0o777 & ~_umask()


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      os.remove(path)


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def _stale_siblings(path: str) -> list[tuple[str, str]]:
  """(kind, path) of temporary siblings of ``path`` left by writers that are no longer alive."""
  head, name = os.path.split(os.path.abspath(path))
  out = []
  try:
    entries = os.listdir(head)
  except OSError:
    return out
  for entry in entries:
    for kind in (_PARTIAL, _OLD):
      prefix = f".{name}.{kind}-"
      if not entry.startswith(prefix):
        continue
      pid = entry[len(prefix):].split("-")[0]
      if pid.isdigit() and not _pid_alive(int(pid)):
        out.append((kind, os.path.join(head, entry)))
  return out


def clean_stale(path: str | os.PathLike) -> None:
  """Removes temporary siblings of ``path`` left by killed writers.

  When the destination is missing and a killed writer left the old directory
  aside (the two-rename fallback), that directory is put back first.
  """
  path = os.path.abspath(os.fspath(path))
  stale = _stale_siblings(path)
  olds = [p for kind, p in stale if kind == _OLD]
  if not os.path.lexists(path) and olds:
    newest = max(olds, key=lambda p: os.stat(p).st_mtime_ns)
    os.replace(newest, path)
    olds.remove(newest)
  for kind, p in stale:
    if p in olds or kind == _PARTIAL:
      _remove(p)


def _write_error(path: str, e: BaseException, tmp: str | None = None) -> WriteError:
  reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
  if tmp:  # name the user's destination, never the temporary sibling
    reason = reason.replace(tmp, path)
  return WriteError(f"{path}: cannot write ({reason})")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
  """Turns an ``OSError`` inside the block into a WriteError naming ``path``."""
  try:
    yield
  except OSError as e:
    raise _write_error(os.fspath(path), e) from None


def _check_file_destination(path: str, overwrite: bool) -> None:
  if os.path.isdir(path):
    raise OutputExistsError(f"{path}: is a directory; expected a file path")
  if os.path.lexists(path) and not overwrite:
    raise OutputExistsError(f"{path}: already exists; pass overwrite=True to replace it")


def write_file(path: str | os.PathLike, fill: Callable[[str], Any], *,
               overwrite: bool = False) -> str:
  """Writes a file atomically: ``fill(temp_path)`` writes it, then fsync and rename.

  Args:
    path: the destination.
    fill: writes the whole file at the path it is given (which does not exist
      yet); any exception it raises aborts the write and leaves ``path`` as it was.
    overwrite: replace an existing file.

  Returns:
    ``path``.

  Raises:
    OutputExistsError: ``path`` exists (without ``overwrite``) or is a directory.
    WriteError: the file cannot be written (names ``path``).
  """
  path = os.fspath(path)
  _check_file_destination(path, overwrite)
  clean_stale(path)
  tmp = _temp_name(path, _PARTIAL)
  try:
    fill(tmp)
    os.chmod(tmp, file_mode())
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_parent(path)
  except OSError as e:
    _remove(tmp)
    raise _write_error(path, e, tmp) from None
  except BaseException:
    _remove(tmp)
    raise
  return path


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> str:
  """Writes ``data`` to ``path`` atomically (see :func:`write_file`)."""
  def fill(tmp: str) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
  return write_file(path, fill, overwrite=overwrite)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> str:
  """Writes UTF-8 ``text`` to ``path`` atomically."""
  return write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = False,
               indent: int | None = 2, **dump_kwargs) -> str:
  """Writes ``obj`` as JSON (with a final newline) to ``path`` atomically."""
  return write_text(path, json.dumps(obj, indent=indent, **dump_kwargs) + "\n",
                    overwrite=overwrite)


def write_safetensors(path: str | os.PathLike, tensors: dict, *,
                      metadata: dict[str, str] | None = None, overwrite: bool = False) -> str:
  """Writes NumPy ``tensors`` as a safetensors file atomically.

  Raises:
    OutputExistsError: ``path`` exists (without ``overwrite``).
    WriteError: the file cannot be written (disk full, ...), naming ``path``.
  """
  from safetensors.numpy import save_file  # light, but only writers need it
  path = os.fspath(path)

  def fill(tmp: str) -> None:
    try:
      save_file(tensors, tmp, metadata=metadata)
    except OSError:
      raise
    except Exception as e:  # SafetensorError wraps the OS error (e.g. ENOSPC) in its text
      raise _write_error(path, e, tmp) from None
  return write_file(path, fill, overwrite=overwrite)


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps the paths ``a`` and ``b`` (Linux ``renameat2``); False if unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), b)


def _fsync_tree(root: str) -> None:
  for folder, _, files in os.walk(root):
    for name in files:
      _fsync_path(os.path.join(folder, name))
    _fsync_path(folder, directory=True)


def _foreign_entries(path: str, belongs: Callable[[str, bool], bool]) -> list[str]:
  out = []
  for entry in sorted(os.listdir(path)):
    is_dir = os.path.isdir(os.path.join(path, entry))
    if not belongs(entry, is_dir):
      out.append(entry + ("/" if is_dir else ""))
  return out


def check_dir_destination(path: str | os.PathLike, *, overwrite: bool, what: str,
                          belongs: Callable[[str, bool], bool] = lambda name, is_dir: True,
                          exists_error: type[OutputExistsError] = OutputExistsError) -> None:
  """Raises unless :func:`replace_dir` may write ``path``.

  Raises:
    OutputExistsError: ``path`` is a file; a non-empty directory without
      ``overwrite``; or a directory holding entries ``belongs(name, is_dir)``
      rejects (named), which is never replaced.
  """
  path = os.fspath(path)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise OutputExistsError(f"{path}: exists and is not a directory; expected a directory"
                            f" for {what}")
  if not os.path.isdir(path) or not os.listdir(path):
    return
  foreign = _foreign_entries(path, belongs)
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" (and {len(foreign) - 5} more)" if len(foreign) > 5
                                      else "")
    raise exists_error(
        f"{path}: holds {shown}, which {'is' if len(foreign) == 1 else 'are'} not part of"
        f" {what}; refusing to replace the directory (remove them or choose another path)")
  if not overwrite:
    raise exists_error(f"{path}: already holds {what}; pass overwrite=True to replace it")


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike, *, overwrite: bool = False, what: str = "an artifact",
                belongs: Callable[[str, bool], bool] = lambda name, is_dir: True,
                exists_error: type[OutputExistsError] = OutputExistsError) -> Iterator[str]:
  """Builds a directory artifact in a temporary sibling and swaps it into place.

  Usage::

    with replace_dir(out_dir, overwrite=overwrite, what="a Medusa adapter") as tmp:
      ...write every file of the artifact under tmp...

  On a normal exit the files are fsynced and the directory replaces ``path``
  in one atomic step (the old one is then deleted); on an exception the
  temporary directory is removed and ``path`` is untouched.

  Args:
    path: the destination directory.
    overwrite: replace an existing non-empty directory.
    what: what the artifact is, for messages.
    belongs: ``(entry name, is_dir) -> bool``: may this entry of an existing
      destination be deleted with it? A destination holding any other entry is
      refused even with ``overwrite``.
    exists_error: the OutputExistsError subclass raised for an existing destination.

  Raises:
    OutputExistsError: see :func:`check_dir_destination`.
    WriteError: an ``OSError`` while writing (names ``path``).
  """
  path = os.path.abspath(os.fspath(path))
  check_dir_destination(path, overwrite=overwrite, what=what, belongs=belongs,
                        exists_error=exists_error)
  with writing(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    clean_stale(path)
    tmp = _temp_name(path, _PARTIAL)
    os.mkdir(tmp, 0o777)
  try:
    yield tmp
    os.chmod(tmp, dir_mode())
    _fsync_tree(tmp)
    _swap_into_place(tmp, path)
    _fsync_parent(path)
  except OSError as e:
    _remove(tmp)
    raise _write_error(path, e, tmp) from None
  except WriteError as e:  # a file inside: name it where it was going, not in the temporary
    _remove(tmp)
    raise WriteError(str(e).replace(tmp, path)) from None
  except BaseException:
    _remove(tmp)
    raise


def _swap_into_place(tmp: str, path: str) -> None:
  if not os.path.lexists(path):
    os.rename(tmp, path)
    return
  if os.path.isdir(path) and not os.listdir(path):
    os.rename(tmp, path)  # POSIX: a rename onto an empty directory replaces it atomically
    return
  if _exchange(tmp, path):
    old = _temp_name(path, _OLD)
    os.rename(tmp, old)  # tmp now holds the old artifact
    _remove(old)
    return
  old = _temp_name(path, _OLD)
  os.rename(path, old)  # a crash here leaves the old aside; clean_stale puts it back
  os.rename(tmp, path)
  _remove(old)
