"""Multi-host evaluation of Medusa heads (a TPU pod, or several GPU hosts).

Every process runs the same program:

1. ``jax.distributed.initialize`` joins the processes (coordinator address,
   process count and id from the config, else from the environment / the
   TPU runtime's auto-detection).
2. One global ``(data, model)`` mesh is built over every host's devices, grouped
   by host: host ``p`` owns the ``data`` rows ``p*R:(p+1)*R`` and the ``model``
   axis never crosses a host (tensor parallelism rides the fast in-host links).
3. Each host takes its share of the prompts (``prompts[p::P]``) and runs the
   engine on its own rows of the mesh: weights split over ``model``, its
   batch over its ``data`` rows. Hosts do not run in lockstep: the decode
   loop's host control (early stop when every row is done, one ``device_get``
   per step) differs per host, so one SPMD program over all hosts would stall
   every host on the slowest and deadlock on different step counts. Data
   parallelism across hosts needs no communication until the end.
4. Per-host statistics (tokens per step, per-head acceptance, throughput) are
   combined with ``multihost_utils.process_allgather`` over the global mesh,
   and process 0 writes ``pod_eval.json`` and ``pod_eval.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh

from medusa_jax import _atomic
from medusa_jax._validate import require_ints
from medusa_jax.assets import cache as assets
from medusa_jax.assets import datasets
from medusa_jax.config import MedusaConfig
from medusa_jax.decoding.engine import Engine
from medusa_jax.errors import ShardingError
from medusa_jax.heads.modules import MedusaModel
from medusa_jax.models.llama import Llama
from medusa_jax.models.llama_config import LlamaConfig
from medusa_jax.models.llama_sharding import shard_llama
from medusa_jax.parallel.mesh import DATA, MODEL
from medusa_jax.training.evaluate import save_figure

RESULT_JSON = "pod_eval.json"
RESULT_PNG = "pod_eval.png"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PodEvalConfig:
  """One pod evaluation run (every process gets the same config).

  Attributes:
    coordinator: ``host:port`` of process 0; None = environment / auto-detect.
    num_processes: processes in the job; None = environment / auto-detect.
    process_id: this process; None = environment / auto-detect.
    local_device_ids: devices of this process to use (None = all).
    base: Hugging Face Llama directory; None = the cached SmolLM2.
    medusa: Medusa adapter directory; None = the engine's default heads.
    tiny: a tiny random Llama and random V2 heads with integer prompts (no
      assets, no tokenizer): for tests and dry runs.
    num_prompts: MT-bench questions (first turns) to evaluate; None = all 80.
    batch_size: prompts per ``generate`` call on a host.
    max_new_tokens: budget per prompt.
    speculate: ``tree``, ``chain`` or ``none``.
    model_parallel: size of the ``model`` axis (within a host); None = the
      largest divisor of a host's device count that divides the model's
      query heads, hidden, intermediate and vocabulary sizes (SmolLM2's 9
      heads give 1: pure data parallelism).
    out_dir: where process 0 writes the results.
    seed: prompts (tiny) and weights (tiny).
  """
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  base: str | None = None
  medusa: str | None = None
  tiny: bool = False
  num_prompts: int | None = None
  batch_size: int = 8
  max_new_tokens: int = 64
  speculate: str = "tree"
  model_parallel: int | None = None
  out_dir: str = "pod_eval_out"
  seed: int = 0

  def __post_init__(self):
    require_ints(self, ("batch_size", "max_new_tokens"), minimum=1)
    require_ints(self, ("num_prompts", "model_parallel", "num_processes"), minimum=1,
                 allow_none=True)


# ---------------------------------------------------------------------------- set-up


def initialize(cfg: PodEvalConfig) -> None:
  """Joins the job (``jax.distributed.initialize``); a no-op for one process."""
  if cfg.num_processes == 1 and cfg.coordinator is None:
    return
  jax.distributed.initialize(coordinator_address=cfg.coordinator,
                             num_processes=cfg.num_processes, process_id=cfg.process_id,
                             local_device_ids=cfg.local_device_ids)


def pod_mesh(model_parallel: int | None = None):
  """The global ``(data, model)`` mesh over every host's devices, grouped by host.

  Row ``r`` of the device grid lies on host ``r // R`` (R rows per host), so
  the ``model`` axis stays inside a host.

  Raises:
    ShardingError: hosts hold different device counts, or ``model_parallel``
      does not divide a host's devices.
  """

  by_host: dict[int, list] = {}
  for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    by_host.setdefault(d.process_index, []).append(d)
  counts = {len(v) for v in by_host.values()}
  if len(counts) != 1:
    raise ShardingError(f"hosts hold {sorted(counts)} devices; expected the same count on each")
  local = counts.pop()
  model = local if model_parallel is None else model_parallel
  if local % model:
    raise ShardingError(f"mesh axis 'model' of size {model} does not divide the {local}"
                        " devices of a host")
  grid = np.array([by_host[p] for p in sorted(by_host)], dtype=object)
  grid = grid.reshape(len(by_host) * (local // model), model)
  return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def auto_model_parallel(sizes: Sequence[int], local_devices: int) -> int:
  """The largest divisor of ``local_devices`` that divides every size."""
  return max(d for d in range(1, local_devices + 1)
             if local_devices % d == 0 and all(s % d == 0 for s in sizes))


def _model_parallel(cfg: PodEvalConfig, local_devices: int) -> int:
  if cfg.model_parallel is not None:
    return cfg.model_parallel
  if cfg.tiny:
    return local_devices  # the tiny model is sized to the mesh
  lcfg = LlamaConfig.from_hf(_base_dir(cfg))
  return auto_model_parallel((lcfg.num_attention_heads, lcfg.hidden_size,
                              lcfg.intermediate_size, lcfg.vocab_size), local_devices)


def _base_dir(cfg: PodEvalConfig) -> str:
  if cfg.base is not None:
    return cfg.base
  return str(assets.fetch(quiet=True).model_dir)


def host_mesh(mesh, process_index: int):
  """The rows of ``mesh`` that lie on one host, as a mesh of its own."""
  rows = [r for r in range(mesh.devices.shape[0])
          if mesh.devices[r, 0].process_index == process_index]
  return Mesh(mesh.devices[rows], mesh.axis_names, axis_types=mesh.axis_types)


def host_share(items: Sequence[Any], process_index: int, process_count: int) -> list[Any]:
  """This host's items: every ``process_count``-th, starting at ``process_index``."""
  return list(items[process_index::process_count])


# ---------------------------------------------------------------------------- inputs


def load_prompts(cfg: PodEvalConfig, vocab_size: int | None = None) -> list[Any]:
  """Evaluation prompts: MT-bench first turns (strings), or integer prompts (tiny).

  Every host computes the same list, then keeps its share.
  """
  if cfg.tiny:
    rng = np.random.default_rng(cfg.seed)
    count = cfg.num_prompts or 8
    return [rng.integers(3, vocab_size, int(rng.integers(3, 12))).tolist()
            for _ in range(count)]
  questions = datasets.load_mtbench(assets.fetch(quiet=True).mtbench_jsonl)
  prompts = [q["turns"][0] for q in questions]
  return prompts[:cfg.num_prompts] if cfg.num_prompts else prompts


def build_engine(cfg: PodEvalConfig, mesh):
  """The engine on ``mesh`` (a host's rows of the pod mesh)."""

  if cfg.tiny:

    model_width = mesh.devices.shape[1]
    lcfg = LlamaConfig.tiny(vocab_size=64 * model_width, hidden_size=8 * model_width,
                            intermediate_size=16 * model_width, num_hidden_layers=1,
                            num_attention_heads=2 * model_width,
                            num_key_value_heads=model_width, head_dim=4, eos_token_ids=())
    llama = Llama(lcfg, rngs=nnx.Rngs(cfg.seed))
    mcfg = MedusaConfig(base_model_name_or_path="tiny", medusa_num_heads=3,
                        medusa_num_layers=1, version=2.0)
    heads = MedusaModel(mcfg, lcfg.hidden_size, rngs=nnx.Rngs(cfg.seed + 1))
    rng = np.random.default_rng(cfg.seed + 2)
    h, n = lcfg.hidden_size, mcfg.medusa_num_heads
    heads.medusa.kernel[...] = jnp.asarray(rng.standard_normal((h, n, h)) * 0.3, jnp.float32)
    heads.medusa.bias[...] = jnp.asarray(rng.standard_normal((n, h)) * 0.3, jnp.float32)
    return Engine(shard_llama(llama, mesh), None, heads.shard(mesh),
                  max_cache_len=128, mesh=mesh)
  return Engine.load(_base_dir(cfg), cfg.medusa, mesh=mesh)


# ------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HostStats:
  """One host's results, as fixed-size arrays (so hosts can be gathered).

  Attributes:
    prompt_ids: [S] int64 global prompt index, -1 for padding slots.
    new_tokens: [S] int64 tokens generated per prompt.
    steps: [S] int64 decode steps per prompt.
    head_accepts: [S, n] int64 steps in which head k's draft was accepted.
    tokens: [S, max_new_tokens] int64 generated ids, -1 after the end.
    wall_s: seconds the host spent generating (compilation included).
    decode_s: seconds of steady-state decode steps (each call's first step,
      which compiles, excluded; ``GenerationResult.decode_s``).
    decode_tokens: tokens those steps emitted.
  """
  prompt_ids: np.ndarray
  new_tokens: np.ndarray
  steps: np.ndarray
  head_accepts: np.ndarray
  tokens: np.ndarray
  wall_s: float
  decode_s: float = 0.0
  decode_tokens: int = 0


def run_host(engine, prompts: Sequence[Any], ids: Sequence[int], cfg: PodEvalConfig,
             slots: int) -> HostStats:
  """Generates this host's prompts in batches; per-prompt counts in ``slots`` rows."""
  n = engine.num_heads or 0
  out = HostStats(prompt_ids=np.full((slots,), -1, np.int64),
                  new_tokens=np.zeros((slots,), np.int64), steps=np.zeros((slots,), np.int64),
                  head_accepts=np.zeros((slots, n), np.int64),
                  tokens=np.full((slots, cfg.max_new_tokens), -1, np.int64), wall_s=0.0)
  chat = not cfg.tiny
  t0 = time.perf_counter()
  decode_s, decode_tokens = 0.0, 0
  for start in range(0, len(prompts), cfg.batch_size):
    res = engine.generate(list(prompts[start:start + cfg.batch_size]),
                          max_new_tokens=cfg.max_new_tokens, speculate=cfg.speculate, chat=chat)
    decode_s += res.decode_s
    decode_tokens += res.decode_tokens
    for j, stats in enumerate(res.stats):
      k = start + j
      out.prompt_ids[k] = ids[k]
      out.new_tokens[k] = stats.new_tokens
      out.steps[k] = stats.steps
      acc = np.asarray(stats.head_accepts[:n], np.int64)
      out.head_accepts[k, :acc.shape[0]] = acc
      out.tokens[k, :len(res.tokens[j])] = res.tokens[j]
  return dataclasses.replace(out, wall_s=time.perf_counter() - t0, decode_s=decode_s,
                             decode_tokens=decode_tokens)


def gather_hosts(stats: HostStats) -> dict[str, np.ndarray]:
  """Every host's :class:`HostStats`, stacked on a leading [P] axis, on every host.

  The scalars travel as ``timing`` [P, 3]: wall seconds, decode seconds, decode tokens.
  """
  local = dict(prompt_ids=stats.prompt_ids, new_tokens=stats.new_tokens, steps=stats.steps,
               head_accepts=stats.head_accepts, tokens=stats.tokens,
               timing=np.asarray([stats.wall_s, stats.decode_s, stats.decode_tokens], np.float64))
  return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(local).items()}


def summarize(gathered: dict[str, np.ndarray], cfg: PodEvalConfig) -> dict[str, Any]:
  """Per-host and pod-wide statistics from the gathered arrays."""
  hosts = []
  for p in range(gathered["prompt_ids"].shape[0]):
    valid = gathered["prompt_ids"][p] >= 0
    tokens = int(gathered["new_tokens"][p][valid].sum())
    steps = int(gathered["steps"][p][valid].sum())
    accepts = gathered["head_accepts"][p][valid].sum(axis=0)
    wall, decode_s, decode_tokens = (float(v) for v in gathered["timing"][p])
    hosts.append(dict(
        process=p, prompts=int(valid.sum()), new_tokens=tokens, steps=steps,
        # The prefill's token is not a decode step's (RowStats convention).
        tokens_per_step=(tokens - int(valid.sum())) / steps if steps else None,
        head_acceptance=[float(a) / steps if steps else None for a in accepts],
        wall_s=wall, tokens_per_s=tokens / wall if wall > 0 else None,
        decode_tokens_per_s=decode_tokens / decode_s if decode_s > 0 else None))
  valid = gathered["prompt_ids"] >= 0
  tokens, steps = int(gathered["new_tokens"][valid].sum()), int(gathered["steps"][valid].sum())
  accepts = gathered["head_accepts"][valid].sum(axis=0)
  per_prompt = sorted(
      (dict(prompt=int(i), new_tokens=int(t), steps=int(s), tokens=[int(x) for x in ids[:t]])
       for i, t, s, ids in zip(gathered["prompt_ids"][valid], gathered["new_tokens"][valid],
                               gathered["steps"][valid], gathered["tokens"][valid])),
      key=lambda r: r["prompt"])
  return dict(
      config=dataclasses.asdict(cfg), hosts=hosts, per_prompt=per_prompt,
      total=dict(prompts=int(valid.sum()), new_tokens=tokens, steps=steps,
                 tokens_per_step=(tokens - int(valid.sum())) / steps if steps else None,
                 head_acceptance=[float(a) / steps if steps else None for a in accepts],
                 tokens_per_s=tokens / max(h["wall_s"] for h in hosts),
                 decode_tokens_per_s=sum(h["decode_tokens_per_s"] or 0 for h in hosts)))


def write_report(summary: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """``pod_eval.json`` and a PNG plot (tokens per step and per-head acceptance per host)."""
  import matplotlib
  matplotlib.use("Agg")  # headless
  import matplotlib.pyplot as plt

  with _atomic.writing(out_dir):
    os.makedirs(out_dir, exist_ok=True)
  json_path, png_path = os.path.join(out_dir, RESULT_JSON), os.path.join(out_dir, RESULT_PNG)
  _atomic.write_json(json_path, summary, indent=1, overwrite=True)  # a report: replaced
  hosts = summary["hosts"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.bar([str(h["process"]) for h in hosts], [h["tokens_per_step"] or 0 for h in hosts])
  ax1.axhline(summary["total"]["tokens_per_step"] or 0, color="k", ls="--", label="pod")
  ax1.set(xlabel="host (process)", ylabel="tokens per step", title="Tokens per decode step")
  ax1.legend()
  for h in hosts:
    acc = [a or 0 for a in h["head_acceptance"]]
    ax2.plot(range(1, len(acc) + 1), acc, marker="o", label=f"host {h['process']}")
  ax2.set(xlabel="Medusa head", ylabel="acceptance rate", title="Per-head acceptance",
          ylim=(0, 1), xticks=range(1, len(summary["total"]["head_acceptance"]) + 1))
  ax2.legend()
  fig.tight_layout()
  save_figure(fig, png_path, dpi=100)
  plt.close(fig)
  return json_path, png_path


def run(cfg: PodEvalConfig) -> dict[str, Any]:
  """The whole evaluation on this process; returns the pod summary (on every host)."""
  initialize(cfg)
  mesh = pod_mesh(_model_parallel(cfg, len(jax.local_devices())))
  p, count = jax.process_index(), jax.process_count()
  local = host_mesh(mesh, p)
  engine = build_engine(cfg, local)
  prompts = load_prompts(cfg, engine.cfg.vocab_size)
  ids = host_share(list(range(len(prompts))), p, count)
  slots = -(-len(prompts) // count)
  stats = run_host(engine, [prompts[i] for i in ids], ids, cfg, slots)
  summary = summarize(gather_hosts(stats), cfg)
  summary["mesh"] = dict(shape=dict(mesh.shape), processes=count,
                         devices=[d.device_kind for d in mesh.devices.flat][:1])
  if p == 0:
    summary["files"] = list(write_report(summary, cfg.out_dir))
  return summary
