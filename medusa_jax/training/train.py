"""The head-training loop: optax AdamW, jitted steps, orbax checkpoints.

The base model is frozen, so training works on *token rows*: the base
model's final hidden state at a position (``[H]``) and the n head targets of
that position (``[n]``, ``IGNORE`` where none). Rows are shuffled at the token
level; the loss equals the sequence-level Medusa loss because the heads see
one position at a time.

Determinism: the rows of step s depend only on (seed, s) (one permutation per
epoch), so a run resumed from its last checkpoint reproduces the loss curve
of an uninterrupted run exactly.

Data parallelism: with several devices the batch is sharded over a ``data``
mesh axis and the parameters and lm_head are replicated; XLA inserts the
gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medusa_jax import _atomic
from medusa_jax.config import MedusaConfig
from medusa_jax.errors import ConfigError
from medusa_jax.heads.modules import MedusaModel
from medusa_jax.training.config import HeadKind, LossKind, TrainConfig
from medusa_jax.training.losses import IGNORE, medusa_kl_loss, medusa_loss, per_head_ce
from medusa_jax.training.metrics import HeadAccuracy, rank_hits

NO_GUARD = 2**31 - 1
"""The speculation guard of heads that train or evaluate: V2 heads skip drafting
above a row limit at serving time, and these calls feed thousands of rows."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TokenRows:
  """Training rows: a hidden state and the head targets of one position.

  Attributes:
    hidden: [R, H] float (float16/float32) base-model hidden states after the
      final norm.
    targets: [R, n] int32 targets of the n heads (``IGNORE`` = none).
    teacher_ids: [R, n, K] int32, the base model's top-K ids for each head's
      token (``losses.teacher_targets``), or None (no distillation targets).
    teacher_logp: [R, n, K] float16 log-probabilities of ``teacher_ids``, or None.
  """
  hidden: np.ndarray
  targets: np.ndarray
  teacher_ids: np.ndarray | None = None
  teacher_logp: np.ndarray | None = None

  def __post_init__(self):
    if self.hidden.ndim != 2 or self.targets.ndim != 2 or (
        self.hidden.shape[0] != self.targets.shape[0]):
      raise ConfigError(f"TokenRows: expected hidden [R, H] and targets [R, n], got"
                        f" {self.hidden.shape} and {self.targets.shape}")
    if (self.teacher_ids is None) != (self.teacher_logp is None):
      raise ConfigError("TokenRows: expected both teacher_ids and teacher_logp, or neither")
    if self.teacher_ids is not None:
      want = self.targets.shape
      for name in ("teacher_ids", "teacher_logp"):
        shape = getattr(self, name).shape
        if len(shape) != 3 or shape[:2] != want or shape[2] < 1:
          raise ConfigError(f"TokenRows: expected {name} [R, n, K] with [R, n] = {want},"
                            f" got {shape}")
      if self.teacher_ids.shape != self.teacher_logp.shape:
        raise ConfigError(f"TokenRows: teacher_ids {self.teacher_ids.shape} and teacher_logp"
                          f" {self.teacher_logp.shape}: expected the same shape")

  @property
  def num_rows(self) -> int:
    return self.hidden.shape[0]

  @property
  def has_teacher(self) -> bool:
    return self.teacher_ids is not None

  def save(self, path: str | os.PathLike) -> None:
    """Writes the rows as ``.npz``, atomically (a cache of the pipeline: replaced)."""
    arrays = {"hidden": self.hidden, "targets": self.targets}
    if self.has_teacher:
      arrays.update(teacher_ids=self.teacher_ids, teacher_logp=self.teacher_logp)

    def fill(tmp: str) -> None:
      with open(tmp, "xb") as f:
        np.savez(f, **arrays)
    _atomic.write_file(path, fill, overwrite=True)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TokenRows":
    with np.load(path) as z:
      teacher = ({"teacher_ids": z["teacher_ids"], "teacher_logp": z["teacher_logp"]}
                 if "teacher_ids" in z.files else {})
      return cls(hidden=z["hidden"], targets=z["targets"], **teacher)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
  """What ``fit`` returns.

  Attributes:
    model: the trained MedusaModel.
    losses: {step: training loss} for the steps this call ran (step = the
      optimiser step count after the update, 1-based).
    accuracy: validation accuracy at the end (None without validation rows).
    val_ce: [n] float64 mean validation CE per head at the end (None likewise).
    start_step: the step this call resumed from (0 = fresh).
    seconds: wall time of this call's training loop.
  """
  model: MedusaModel
  losses: dict[int, float]
  accuracy: HeadAccuracy | None
  val_ce: np.ndarray | None
  start_step: int
  seconds: float


def medusa_config(cfg: TrainConfig) -> MedusaConfig:
  """The adapter config of the heads a TrainConfig trains."""
  return MedusaConfig(base_model_name_or_path=cfg.base_model_name_or_path,
                      medusa_num_heads=cfg.num_heads, medusa_num_layers=cfg.num_layers,
                      version=2.0)


def init_heads(cfg: TrainConfig, hidden_size: int, lm_head_VxH: np.ndarray) -> MedusaModel:
  """Fresh heads: ResBlocks at zero (identity); V1 output layers copy the lm_head."""
  vocab = lm_head_VxH.shape[0]
  model = MedusaModel(medusa_config(cfg), hidden_size, vocab,
                      per_head_lm_head=cfg.head_kind is HeadKind.V1,
                      rngs=nnx.Rngs(params=cfg.seed), max_batch_size=NO_GUARD)
  if not model.is_v2:
    for head in model.medusa.heads:
      head.out[...] = jnp.asarray(lm_head_VxH.T, jnp.float32)
  return model


def head_logits(model: MedusaModel, h_RxH: jax.Array, lm_head_VxH: jax.Array, dtype
                ) -> jax.Array:
  """Draft logits of every head.

  Args:
    model: the heads.
    h_RxH: [R, H] base hidden states.
    lm_head_VxH: [V, H] the base lm_head (tied embedding).
    dtype: matmul operand dtype (accumulation is f32).

  Returns:
    [R, n, V] float32.
  """
  x_RxH = h_RxH.astype(dtype)
  if model.is_v2:
    h_RxnxH = model.medusa.heads_hidden(x_RxH)
    return jnp.einsum("rnh,vh->rnv", h_RxnxH, lm_head_VxH.astype(dtype),
                      preferred_element_type=jnp.float32)
  return jnp.stack([head(x_RxH) for head in model.medusa.heads], axis=1).astype(jnp.float32)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay (optionally clipped)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.steps, end_value=cfg.learning_rate * cfg.end_lr_ratio)
  adamw = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  if cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw


def batch_indices(step: int, num_rows: int, batch_rows: int, seed: int,
                  _cache: dict | None = None) -> np.ndarray:
  """Rows of optimiser step ``step`` (0-based): a pure function of its arguments.

  Each epoch is one seeded permutation of the rows; the remainder of an
  epoch that does not fill a batch is skipped.
  """
  per_epoch = num_rows // batch_rows
  if per_epoch < 1:
    raise ConfigError(f"batch_rows={batch_rows}: expected at most the {num_rows} training rows")
  epoch, i = divmod(step, per_epoch)
  key = (seed, epoch, num_rows)
  if _cache is not None and key in _cache:
    perm = _cache[key]
  else:
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    if _cache is not None:
      _cache.clear()
      _cache[key] = perm
  return perm[i * batch_rows:(i + 1) * batch_rows]


def _train_step(graphdef, tx, decay, dtype, loss_kind, state, idx_R, rows, lm_head_VxH):
  """One AdamW step on rows ``idx_R`` of the device-resident rows. DONATES state.

  Args:
    state: {"params", "opt_state"}.
    idx_R: [R] int32 row indices (sharded over ``data`` on a mesh).
    rows: {"hidden": [A, H], "targets": [A, n]} all training rows, plus
      "teacher_ids" / "teacher_logp" [A, n, K] for the ``kl`` loss.
    lm_head_VxH: [V, H].
  """
  h_RxH = jnp.take(rows["hidden"], idx_R, axis=0)
  tgt_Rxn = jnp.take(rows["targets"], idx_R, axis=0)
  if loss_kind is LossKind.KL:
    t_ids_RxnxK = jnp.take(rows["teacher_ids"], idx_R, axis=0)
    t_logp_RxnxK = jnp.take(rows["teacher_logp"], idx_R, axis=0)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    logits_RxnxV = head_logits(model, h_RxH, lm_head_VxH, dtype)
    if loss_kind is LossKind.KL:
      return medusa_kl_loss(logits_RxnxV, t_ids_RxnxK, t_logp_RxnxK, tgt_Rxn, decay)
    return medusa_loss(logits_RxnxV, tgt_Rxn, decay)

  (loss, head_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return {"params": params, "opt_state": opt_state}, loss, head_loss


def _eval_step(graphdef, dtype, max_rank, params, h_RxH, tgt_Rxn, lm_head_VxH):
  model = nnx.merge(graphdef, params)
  logits_RxnxV = head_logits(model, h_RxH, lm_head_VxH, dtype)
  hits, count = rank_hits(logits_RxnxV, tgt_Rxn, max_rank)
  ce_sum, _ = per_head_ce(logits_RxnxV, tgt_Rxn)
  return hits, count, ce_sum


def _mesh_shardings(batch_rows: int):
  """(batch sharding, replicated sharding), or (None, None) on one device."""
  n = jax.device_count()
  if n == 1:
    return None, None
  if batch_rows % n:
    raise ConfigError(f"batch_rows={batch_rows}: expected a multiple of the {n} devices"
                      " (data parallel)")
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  return (jax.sharding.NamedSharding(mesh, P("data")),
          jax.sharding.NamedSharding(mesh, P()))


def _put(x, sharding):
  return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)


class _JsonlLog:
  """Append-only JSONL metrics log that forgets records past a resume point."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kept = []
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
    _atomic.write_text(path, "".join(kept), overwrite=True)

  def write(self, record: dict[str, Any]) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")


def evaluate(model: MedusaModel, rows: TokenRows, lm_head_VxH, cfg: TrainConfig,
             *, batch_rows: int | None = None) -> tuple[HeadAccuracy, np.ndarray]:
  """Per-head accuracy and mean CE of ``model`` on ``rows``.

  Returns:
    (HeadAccuracy, head_ce [n] float64).
  """
  graphdef, params = nnx.split(model, nnx.Param)
  return _evaluate(graphdef, params, rows, jnp.asarray(lm_head_VxH), cfg,
                   batch_rows or cfg.batch_rows, None)


def _evaluate(graphdef, params, rows, lm_head_VxH, cfg, batch_rows, shardings):
  fn = _eval_fn(graphdef, cfg.compute_dtype.jnp_dtype, cfg.max_rank)
  n = rows.targets.shape[1]
  acc = HeadAccuracy.empty(n, cfg.max_rank)
  ce = np.zeros(n)
  total = rows.num_rows if cfg.eval_max_rows == 0 else min(rows.num_rows, cfg.eval_max_rows)
  batch_sh = shardings[0] if shardings else None
  for start in range(0, total, batch_rows):
    stop = min(start + batch_rows, total)
    h = np.zeros((batch_rows, rows.hidden.shape[1]), rows.hidden.dtype)
    t = np.full((batch_rows, n), IGNORE, np.int32)
    h[: stop - start] = rows.hidden[start:stop]
    t[: stop - start] = rows.targets[start:stop]
    hits, count, ce_sum = fn(params, _put(h, batch_sh), _put(t, batch_sh), lm_head_VxH)
    acc = acc.add(hits, count)
    ce += np.asarray(ce_sum, np.float64)
  return acc, ce / np.maximum(acc.count, 1)


@functools.lru_cache(maxsize=16)
def _step_fn(graphdef, cfg: TrainConfig):
  """The jitted train step of a (heads, config) pair; cached so a resumed or
  repeated run in one process reuses the compiled program."""
  step = functools.partial(_train_step, graphdef, make_optimizer(cfg), cfg.loss_decay,
                           cfg.compute_dtype.jnp_dtype, cfg.loss)
  return jax.jit(step, donate_argnames=("state",))


@functools.lru_cache(maxsize=16)
def _eval_fn(graphdef, dtype, max_rank):
  return jax.jit(functools.partial(_eval_step, graphdef, dtype, max_rank))


def fit(cfg: TrainConfig, train: TokenRows, val: TokenRows | None, lm_head_VxH: np.ndarray,
        workdir: str | os.PathLike, *, stop_after: int | None = None, progress: bool = True,
        log: Callable[[str], None] | None = None) -> FitResult:
  """Trains Medusa heads on token rows, resuming from ``workdir`` checkpoints.

  Args:
    cfg: the run config (steps, optimiser, eval and checkpoint intervals).
    train: training rows.
    val: validation rows (None: no validation).
    lm_head_VxH: [V, H] the frozen base lm_head.
    workdir: checkpoints go to ``workdir/checkpoints``, metrics to
      ``workdir/metrics.jsonl``.
    stop_after: stop once this step is reached (simulates an interruption);
      None trains to ``cfg.steps``.
    progress: show a tqdm progress bar.
    log: a printer for one-line messages (default: stderr).

  Returns:
    FitResult.
  """
  import orbax.checkpoint as ocp
  from tqdm.auto import tqdm

  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  workdir = os.path.abspath(os.fspath(workdir))
  n, hidden = train.targets.shape[1], train.hidden.shape[1]
  if n != cfg.num_heads:
    raise ConfigError(f"targets: expected {cfg.num_heads} heads (num_heads), got {n}")
  if lm_head_VxH.shape[1] != hidden:
    raise ConfigError(f"lm_head: expected [V, {hidden}], got {lm_head_VxH.shape}")
  if cfg.loss is LossKind.KL and not train.has_teacher:
    raise ConfigError("loss='kl': expected training rows with teacher top-K"
                      " (teacher_ids, teacher_logp); these rows have none")
  batch_sh, repl = _mesh_shardings(cfg.batch_rows)

  model = init_heads(cfg, hidden, lm_head_VxH)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(cfg)
  state = {"params": params, "opt_state": tx.init(params)}
  if repl is not None:
    state = jax.device_put(state, repl)
  lm_head = _put(np.asarray(lm_head_VxH), repl)
  # The rows live on the device; a step only ships its [R] indices.
  rows_all = {"hidden": _put(train.hidden, repl), "targets": _put(train.targets, repl)}
  if cfg.loss is LossKind.KL:
    rows_all["teacher_ids"] = _put(train.teacher_ids, repl)
    rows_all["teacher_logp"] = _put(train.teacher_logp, repl)

  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, create=True)
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)
  start = manager.latest_step() or 0
  if start:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
    log(f"resumed from step {start} ({workdir}/checkpoints)")
  metrics = _JsonlLog(os.path.join(workdir, "metrics.jsonl"), start)

  step_fn = _step_fn(graphdef, cfg)
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  perm_cache: dict = {}
  losses: dict[int, float] = {}
  pending: list[tuple[int, Any, Any]] = []
  accuracy = ce = None
  t0 = time.perf_counter()
  bar = tqdm(total=end, initial=start, disable=not progress, desc=f"train {cfg.name}",
             dynamic_ncols=True)

  def flush():
    for s, loss, head_ce in pending:
      losses[s] = float(loss)
      if s % cfg.log_every == 0 or s == end:
        metrics.write({"kind": "train", "step": s, "loss": losses[s],
                       f"head_{cfg.loss.value}": [round(float(c), 5)
                                                  for c in np.asarray(head_ce)],
                       "seconds": round(time.perf_counter() - t0, 2)})
    if pending:
      bar.set_postfix(loss=f"{losses[pending[-1][0]]:.4f}")
    pending.clear()

  for step in range(start, end):
    idx = batch_indices(step, train.num_rows, cfg.batch_rows, cfg.seed, perm_cache)
    state, loss, head_ce = step_fn(state, _put(idx.astype(np.int32), batch_sh), rows_all,
                                   lm_head)
    done = step + 1
    pending.append((done, loss, head_ce))
    bar.update(1)
    if done % cfg.log_every == 0 or done == end or len(pending) >= 64:
      flush()
    if val is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
      flush()
      accuracy, ce = _evaluate(graphdef, state["params"], val, lm_head, cfg, cfg.batch_rows,
                               (batch_sh, repl) if batch_sh is not None else None)
      record = {"kind": "eval", "step": done, "head_ce": [round(float(c), 5) for c in ce],
                **accuracy.summary()}
      metrics.write(record)
      log(f"step {done}: val top1 {record['top1']} top5 {record['top5']}")
    if done % cfg.checkpoint_every == 0 or done == end:
      flush()
      manager.save(done, args=ocp.args.StandardSave(state))
  flush()
  bar.close()
  if val is not None and accuracy is None:  # resumed at the end: nothing ran
    accuracy, ce = _evaluate(graphdef, state["params"], val, lm_head, cfg, cfg.batch_rows,
                             (batch_sh, repl) if batch_sh is not None else None)
  manager.wait_until_finished()
  manager.close()
  seconds = time.perf_counter() - t0
  model = nnx.merge(graphdef, jax.device_get(state["params"]))
  return FitResult(model=model, losses=losses, accuracy=accuracy, val_ce=ce, start_step=start,
                   seconds=seconds)
