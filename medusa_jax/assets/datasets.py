"""Readers of the data packages: ShareGPT's truncated JSON array, MT-bench's questions.

The ShareGPT V3 package ships a JSON array cut off mid-record, so it is read
element by element (:func:`iter_json_array_objects`) and the partial tail is
dropped. Turning conversations into chat messages for training is
``medusa_jax.training.data``'s job.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from medusa_jax.errors import AssetError, DataFormatError


def iter_json_array_objects(text: str) -> Iterator[Any]:
  """Decodes the elements of a JSON array one by one, stopping at a cut.

  The array may be truncated anywhere: every element that decodes in full
  is yielded, and the partial tail is dropped.

  Raises:
    DataFormatError: the text does not start with a JSON array.
  """
  decoder = json.JSONDecoder()
  start = text.find("[")
  if start < 0 or text[:start].strip():
    raise DataFormatError(f"expected a top-level array '[', got {text[:20]!r}")
  i, n = start + 1, len(text)
  while True:
    while i < n and text[i] in " \t\r\n,":
      i += 1
    if i >= n or text[i] == "]":
      return
    try:
      obj, i = decoder.raw_decode(text, i)
    except json.JSONDecodeError:
      return  # the cut: a partial object
    yield obj


def load_sharegpt(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads ShareGPT's (possibly truncated) JSON list, keeping whole conversations.

  The file is a JSON array cut off mid-record; every complete object before
  the cut is returned, the partial one is dropped.

  Returns:
    ``[{"id": ..., "conversations": [{"from": "human"|"gpt"|..., "value": str}, ...]}, ...]``
    as stored.

  Raises:
    AssetError: the file is missing or does not start with a JSON array.
  """
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError as e:
    raise AssetError(f"{path}: cannot read ShareGPT file ({e})") from None
  try:
    return [obj for obj in iter_json_array_objects(text) if isinstance(obj, dict)]
  except DataFormatError as e:
    raise AssetError(f"{path}: expected a JSON array of conversations ({e})") from None


def load_mtbench(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads MT-bench ``question.jsonl``.

  Returns:
    ``[{"question_id": int, "category": str, "turns": [str, ...]}, ...]`` in file order.

  Raises:
    AssetError: the file is missing, or a line is not a valid question (line named).
  """
  out = []
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except OSError as e:
    raise AssetError(f"{path}: cannot read MT-bench questions ({e})") from None
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      q = json.loads(line)
    except json.JSONDecodeError as e:
      raise AssetError(f"{path}:{lineno}: not valid JSON ({e})") from None
    if (not isinstance(q, dict) or not isinstance(q.get("question_id"), int)
        or not isinstance(q.get("turns"), list) or not q["turns"]
        or not all(isinstance(t, str) for t in q["turns"])):
      raise AssetError(f"{path}:{lineno}: expected question_id (int), category and turns "
                       "(non-empty list of str)")
    out.append({"question_id": q["question_id"], "category": str(q.get("category", "")),
                "turns": list(q["turns"])})
  return out
