"""transformers ``generate`` on the real checkpoint: the baseline of bench_decode's end-to-end rows.

``bench_decode.py --real-model DIR --questions Q.json --hf-real`` runs
:func:`bench_hf_real` after its medusa_jax rows, in the same process, on the
same card, with the same prompt token ids, so the table can say "medusa_jax
tree tokens/s against transformers' fastest generate". The model directory is
the one medusa_jax loads (``convert_gguf`` writes Hugging Face names and a
``LlamaForCausalLM`` config.json, so ``AutoModelForCausalLM.from_pretrained``
reads it as it is; tests/models/test_llama.py checks the parity).

Modes (:class:`HFMode`):

* ``eager``: ``model.generate`` with its default dynamic cache.
* ``static-compile``: transformers' recipe for fast generate, a static cache
  and ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs).
  transformers versions with ``CompileConfig`` compile the decoding forward
  themselves when the cache is static (``generation_config.compile_config``;
  the prefill stays eager, so prompt lengths cause no recompilation) and their
  docs say not to compile the model outside ``generate``; older versions get
  ``model.forward = torch.compile(model.forward, ...)``. transformers compiles
  only on an accelerator: on a CPU this mode is the static cache, eager
  (``compiled`` False in its rows). Seen on an H200 (transformers 5.17, torch
  2.11, random SmolLM2-shaped weights, 256 tokens): eager 33 tok/s at B = 1 and
  534 at B = 16; static-compile 345 and 5309, after 36 s and 57 s of compilation.

Usage on its own (prompts as bench_decode builds them)::

  rows = bench_hf_real(model_dir, {1: [[p0], [p1]], 16: [prompts[:16]]}, 256,
                       eos_token_ids=engine.eos_ids, skip_decode_steps=16)
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Mapping, Sequence

from medusa_jax.errors import ConfigError
from medusa_jax.options import Option


class HFMode(Option):
  """How transformers generates."""
  __option__ = "hf mode"
  __error__ = ConfigError

  EAGER = "eager"
  STATIC_COMPILE = "static-compile"


HF_MODES = tuple(m.value for m in HFMode)


def decode_window(times_S: Sequence[float], count_S: Sequence[int],
                  skip_decode_steps: int) -> tuple[int, int, float]:
  """(tokens, steps, seconds) of the decode window, counted as ``Engine.generate`` counts its own.

  The engine's ``decode_tokens / decode_s`` leaves out the prefill's token and
  the first decode call (``steps_per_call`` steps, which may compile): its
  clock starts when that call's tokens reach the host and stops after the last
  step; if every row finished within the first call, it spans all decode steps
  from the prefill's token. Position s here is the s-th generated token.

  Args:
    times_S: [S] host time (s) at which position s's tokens were known, s = 1..S.
    count_S: [S] tokens emitted at position s (rows not yet finished).
    skip_decode_steps: decode steps left out after the prefill's token (the
      engine's ``steps_per_call``).

  Returns:
    (tokens, decode steps, seconds) of the window; (0, 0, 0.0) with fewer than
    2 positions.

  Example: times [10, 11, 12, 13, 14], counts [2, 2, 2, 1, 1], skip 1 ->
  positions 3..5: (4, 3, 3.0); skip 4 -> the fallback, positions 2..5: (6, 4, 4.0).
  """
  S = len(times_S)
  if len(count_S) != S:
    raise ValueError(f"decode_window: {len(count_S)} counts for {S} times")
  start = 1 + skip_decode_steps  # positions 1..start are outside the window
  if S <= start:
    start = 1
  if S <= start:
    return 0, 0, 0.0
  return int(sum(count_S[start:])), S - start, float(times_S[-1] - times_S[start - 1])


def emitted(new_ids: Sequence[int], eos_token_ids: Sequence[int]) -> list[int]:
  """A row's new tokens up to and including its first EOS (the engine's cut)."""
  out = []
  for t in new_ids:
    out.append(int(t))
    if t in eos_token_ids:
      break
  return out


def load_hf_model(model_dir: str, dtype: str = "bf16", device: str | None = None):
  """``AutoModelForCausalLM.from_pretrained(model_dir)`` in ``dtype`` on ``device``, eval mode.

  Args:
    model_dir: a Hugging Face Llama directory (what ``convert_gguf`` writes).
    dtype: ``"bf16"`` or ``"f32"``.
    device: a torch device; None: cuda when available, else cpu.
  """
  import torch
  import transformers
  from packaging.version import Version
  dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
  if dtype not in dtypes:
    raise ConfigError(f"dtype={dtype!r}; expected one of {', '.join(dtypes)}")
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  # transformers 4.56 renamed from_pretrained's torch_dtype to dtype.
  key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **{key: dtypes[dtype]})
  return model.to(device).eval()


def _configure(model, mode: HFMode, *, eos_token_ids: Sequence[int], pad_token_id: int,
               max_cache_len: int) -> None:
  """Sets the model's generation config for ``mode`` (greedy, the engine's EOS ids)."""
  import torch
  import transformers
  gc = model.generation_config
  gc.do_sample = False
  gc.temperature = gc.top_p = gc.top_k = None  # no sampling knobs from a hub config
  # None, not [], for no EOS: an empty value would be filled from the model's config.json.
  gc.eos_token_id = list(eos_token_ids) or None
  gc.pad_token_id = pad_token_id
  if mode is HFMode.STATIC_COMPILE:
    gc.cache_implementation = "static"
    # One cache size for every call of the run (recent transformers honour it;
    # older ones keep a cache at least as large as the warm-up's, the longest prompt's).
    gc.max_cache_len = max_cache_len
    if model.device.type == "cpu":
      return  # transformers compiles on accelerators only: the static cache, eager
    if hasattr(transformers, "CompileConfig"):
      gc.compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    else:
      model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
      model._bench_hf_compiled = True


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device):
  """(input_ids [B, W] int64, attention_mask [B, W] int64): prompts right-aligned."""
  import torch
  W = max(len(p) for p in prompts)
  ids = torch.full((len(prompts), W), pad_token_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), W), dtype=torch.long)
  for b, p in enumerate(prompts):
    ids[b, W - len(p):] = torch.tensor(list(p), dtype=torch.long)
    mask[b, W - len(p):] = 1
  return ids.to(device), mask.to(device)


def _sync(device) -> None:
  import torch
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _step_clock(device):
  """A stopping criterion that never stops: it notes the host time after each generated position.

  transformers calls it once per position (the prefill's token first) after
  the token is appended; the sync makes the time that of the token being done,
  as the engine's clock reads its tokens on the host. It adds no wait on CUDA:
  transformers' own stop test (``unfinished_sequences.max() == 0``) syncs
  every step there anyway (5.24 defers it on MPS only).
  """
  import torch
  from transformers import StoppingCriteria

  class StepClock(StoppingCriteria):
    def __init__(self):
      self.times_S: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
      _sync(device)
      self.times_S.append(time.perf_counter())
      return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)

  return StepClock()


def _generate(model, prompts: Sequence[Sequence[int]], new_tokens: int,
              eos_token_ids: Sequence[int], pad_token_id: int) -> dict:
  """One ``generate`` of ``prompts`` at once: outputs, wall time and per-position times."""
  from transformers import StoppingCriteriaList
  device = model.device
  ids, mask = _left_pad(prompts, pad_token_id, device)
  clock = _step_clock(device)
  _sync(device)
  t = time.perf_counter()
  out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                       stopping_criteria=StoppingCriteriaList([clock]))
  _sync(device)
  wall = time.perf_counter() - t
  new = out[:, ids.shape[1]:].tolist()
  outputs = [emitted(row, eos_token_ids) for row in new]
  S = len(clock.times_S)
  if S != len(new[0]):
    raise RuntimeError(f"step clock: {S} calls for {len(new[0])} generated positions")
  count_S = [sum(len(o) > s for o in outputs) for s in range(S)]
  return dict(outputs=outputs, wall_s=wall, times_S=clock.times_S, count_S=count_S)


def _device_name(device) -> str:
  import torch
  if device.type == "cuda":
    return torch.cuda.get_device_name(device)
  return platform.processor() or platform.machine() or "cpu"


def _run_config(model, sets: Sequence[Sequence[Sequence[int]]], new_tokens: int,
                eos_token_ids: Sequence[int], pad_token_id: int, skip_decode_steps: int) -> dict:
  """One (mode, batch): a warm-up generate of the longest set, then each set timed once."""
  warm = max(range(len(sets)), key=lambda i: max(len(p) for p in sets[i]))
  first = _generate(model, sets[warm], new_tokens, eos_token_ids, pad_token_id)
  runs = [_generate(model, s, new_tokens, eos_token_ids, pad_token_id) for s in sets]
  windows = [decode_window(r["times_S"], r["count_S"], skip_decode_steps) for r in runs]
  dec_tokens, dec_steps, dec_s = (sum(w[i] for w in windows) for i in range(3))
  outputs = [o for r in runs for o in r["outputs"]]
  tokens = sum(len(o) for o in outputs)
  wall = sum(r["wall_s"] for r in runs)
  tps = dec_tokens / dec_s if dec_s else float("nan")
  compiled = bool(getattr(model, "_compiled_call", None) or getattr(model, "_bench_hf_compiled",
                                                                    False))
  return dict(tokens_per_s=tps, ms_per_token=1e3 / tps if dec_tokens else float("nan"),
              ms_per_step=1e3 * dec_s / dec_steps if dec_steps else float("nan"),
              e2e_tokens_per_s=tokens / wall, tokens=tokens, decode_tokens=dec_tokens,
              decode_s=dec_s, wall_s=wall, warmup_s=first["wall_s"],
              compile_s=(first["wall_s"] - runs[warm]["wall_s"]) if compiled else None,
              compiled=compiled, outputs=outputs)


def bench_hf_real(model_dir: str, prompt_sets: Mapping[int, Sequence[Sequence[Sequence[int]]]],
                  new_tokens: int, *, dtype: str = "bf16",
                  modes: Sequence[str | HFMode] = HF_MODES, eos_token_ids: Sequence[int] = (),
                  skip_decode_steps: int = 0, time_budget_s: float = math.inf,
                  reference: Mapping[int, Sequence[Sequence[int]]] | None = None,
                  keep_outputs: bool = False, device: str | None = None, log=print) -> list[dict]:
  """transformers ``generate`` tokens/s, greedy, on the prompts the medusa_jax rows ran.

  Measured as bench_decode's ``tokens_per_s`` is (``Engine.generate``'s
  ``decode_tokens / decode_s``, see :func:`decode_window`): decode only, the
  prefill and its token excluded, and the first ``skip_decode_steps`` decode
  steps too (pass the engine's ``steps_per_call``), summed over the sets of a
  batch; host times after ``torch.cuda.synchronize()``. ``e2e_tokens_per_s``
  is every generated token over the ``generate`` calls' wall time, prefill
  included. Stopping matches the engine's: no ``min_new_tokens``; a row stops
  at its first id of ``eos_token_ids`` (pass the engine's ``eos_ids``; counted,
  as the engine counts it) or after ``new_tokens`` tokens, and a batch runs
  until all of its rows stop. Per (mode, batch), one untimed warm-up
  ``generate`` of the set with the longest prompt (the compilation, for
  ``static-compile``), then every set once, timed.

  Args:
    model_dir: the checkpoint directory medusa_jax loaded.
    prompt_sets: batch size -> the sets of prompts (token ids) run at once, in
      the medusa_jax rows' order (B = 1: one set per prompt).
    new_tokens: ``max_new_tokens`` of every ``generate``.
    dtype: ``"bf16"`` or ``"f32"``.
    modes: :class:`HFMode` values, run in order, each on a freshly loaded model.
    eos_token_ids: the ids that end a row; empty: none does.
    skip_decode_steps: decode steps left out of the window after the prefill.
    time_budget_s: no (mode, batch) starts after this many seconds.
    reference: batch size -> the expected tokens of each prompt, in order (the
      medusa_jax plain rows'); rows then get ``matches_reference``, "equal/total".
    keep_outputs: rows keep ``outputs``, every prompt's generated tokens.
    device: a torch device; None: cuda when available, else cpu.
    log: called with each row's one-line summary.

  Returns:
    One dict per (mode, batch): mode, batch, prompts, new_tokens, tokens_per_s,
    ms_per_token (decode ms per token over the batch), ms_per_step,
    e2e_tokens_per_s, tokens, warmup_s, compile_s (the warm-up's wall time less
    the timed call's on the same prompts: compilation and first-use cost; None
    when nothing compiled), compiled, device, torch, transformers, dtype; or
    ``error`` (the mode failed: its later batches are not run) or ``skipped``
    (the time budget ran out).
  """
  import torch
  import transformers
  t0 = time.perf_counter()
  modes = [HFMode.parse(m) for m in modes]
  widths = [len(p) for sets in prompt_sets.values() for s in sets for p in s]
  if not widths:
    raise ConfigError("bench_hf_real: no prompts")
  max_cache_len = max(widths) + new_tokens
  rows = []
  for mode in modes:
    batch, model = None, None
    try:
      for batch, sets in prompt_sets.items():
        if time.perf_counter() - t0 > time_budget_s:
          rows.append(dict(mode=mode.value, batch=batch, skipped="time budget"))
          continue
        if model is None:
          model = load_hf_model(model_dir, dtype, device)
          pad = model.config.pad_token_id
          pad = pad if pad is not None else (list(eos_token_ids) or [0])[0]
          _configure(model, mode, eos_token_ids=eos_token_ids, pad_token_id=pad,
                     max_cache_len=max_cache_len)
        row = dict(mode=mode.value, batch=batch, prompts=sum(len(s) for s in sets),
                   new_tokens=new_tokens, dtype=dtype, device=_device_name(model.device),
                   torch=torch.__version__, transformers=transformers.__version__,
                   attn_implementation=getattr(model.config, "_attn_implementation", None),
                   eos_token_ids=list(eos_token_ids), skip_decode_steps=skip_decode_steps)
        row.update(_run_config(model, sets, new_tokens, eos_token_ids, pad, skip_decode_steps))
        outputs = row.pop("outputs")
        if reference is not None and batch in reference:
          same = sum(a == list(b) for a, b in zip(outputs, reference[batch]))
          row["matches_reference"] = f"{same}/{len(outputs)}"
        if keep_outputs:
          row["outputs"] = outputs
        rows.append(row)
        log(f"hf {mode.value} B={batch}: {row['tokens_per_s']:.0f} tok/s decode,"
            f" {row['e2e_tokens_per_s']:.0f} e2e, warm-up {row['warmup_s']:.1f} s")
    except Exception as e:  # one mode failing (a compile error, OOM) must not lose the others
      rows.append(dict(mode=mode.value, batch=batch, error=f"{type(e).__name__}: {str(e)[:500]}"))
      log(f"hf {mode.value} B={batch}: error {rows[-1]['error'][:200]}")
    finally:
      del model
      if torch.cuda.is_available():
        torch.cuda.empty_cache()
  return rows


def best_by_batch(rows: Sequence[Mapping]) -> dict[int, Mapping]:
  """Batch size -> the measured row of highest ``tokens_per_s`` (rows with errors left out)."""
  best: dict[int, Mapping] = {}
  for r in rows:
    tps = r.get("tokens_per_s")
    if tps is None or math.isnan(tps):
      continue
    if r["batch"] not in best or tps > best[r["batch"]]["tokens_per_s"]:
      best[r["batch"]] = r
  return best
