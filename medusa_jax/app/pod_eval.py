"""``medusa-jax pod_eval``: evaluate Medusa heads on every host of a TPU pod (or GPU cluster).

Run the same command on every host. On a Cloud TPU pod, JAX finds the
coordinator, the process count and the process id itself; elsewhere give them
by flag or environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Process 0 writes pod_eval.json and pod_eval.png to --out (see
medusa_jax/training/pod_eval.py for the mesh layout and the statistics).
"""

from __future__ import annotations

import argparse
import json
import os

HELP = "evaluate heads on every host of a TPU pod or GPU cluster (jax.distributed)"
EPILOG = """\
examples:
  gcloud compute tpus tpu-vm ssh POD --worker=all --command \\
    "medusa-jax pod_eval --medusa /path/to/heads --out /tmp/eval"
  medusa-jax pod_eval --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 \\
    --tiny --out /tmp/eval
"""


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
  p.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
  p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
  p.add_argument("--base", default=None, help="Llama directory (default: cached SmolLM2)")
  p.add_argument("--medusa", default=None, help="Medusa adapter directory")
  p.add_argument("--tiny", action="store_true",
                 help="tiny random Llama + heads and integer prompts (tests, dry runs)")
  p.add_argument("--num-prompts", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--speculate", default="tree", help="tree, chain or none (default: tree)")
  p.add_argument("--model-parallel", type=int, default=None,
                 help="size of the 'model' axis within a host (default: all its devices)")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="run on N fake CPU devices per process (set before JAX starts)")
  p.add_argument("--out", default="pod_eval_out")
  p.add_argument("--seed", type=int, default=0)


def run(ns: argparse.Namespace) -> int:
  if ns.cpu_devices:  # must precede the first JAX import, which the library import below is
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ns.cpu_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  from medusa_jax.training.pod_eval import PodEvalConfig, run as run_pod
  cfg = PodEvalConfig(coordinator=ns.coordinator, num_processes=ns.num_processes,
                      process_id=ns.process_id, base=ns.base, medusa=ns.medusa, tiny=ns.tiny,
                      num_prompts=ns.num_prompts, batch_size=ns.batch_size,
                      max_new_tokens=ns.max_new_tokens, speculate=ns.speculate,
                      model_parallel=ns.model_parallel, out_dir=ns.out, seed=ns.seed)
  summary = run_pod(cfg)
  if "files" in summary:
    print(json.dumps(dict(mesh=summary["mesh"], total=summary["total"],
                          files=summary["files"])))
  return 0
