"""Evaluate Medusa heads on every host of a TPU pod (or GPU cluster) at once.

Run the same command on every host. On a Cloud TPU pod, JAX finds the
coordinator, the process count and the process id itself:

  gcloud compute tpus tpu-vm ssh POD --worker=all --command \\
    "python scripts/tpu_pod_eval.py --medusa /path/to/heads --out /tmp/eval"

Elsewhere give them by flag or environment (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID):

  python scripts/tpu_pod_eval.py --coordinator 10.0.0.1:1234 --num-processes 2 \\
    --process-id 0 --tiny --out /tmp/eval

Process 0 writes pod_eval.json and pod_eval.png to --out (see
medusa_jax/pod_eval.py for the layout of the mesh and the statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
  p.add_argument("--speculate", default="tree", choices=("tree", "chain", "none"))
  p.add_argument("--model-parallel", type=int, default=None,
                 help="size of the 'model' axis within a host (default: all its devices)")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="run on N fake CPU devices per process (set before JAX starts)")
  p.add_argument("--out", default="pod_eval_out")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv=None) -> int:
  a = parse(argv)
  if a.cpu_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.cpu_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  from medusa_jax.training.pod_eval import PodEvalConfig, run
  cfg = PodEvalConfig(coordinator=a.coordinator, num_processes=a.num_processes,
                      process_id=a.process_id, base=a.base, medusa=a.medusa, tiny=a.tiny,
                      num_prompts=a.num_prompts, batch_size=a.batch_size,
                      max_new_tokens=a.max_new_tokens, speculate=a.speculate,
                      model_parallel=a.model_parallel, out_dir=a.out, seed=a.seed)
  summary = run(cfg)
  if "files" in summary:
    total = summary["total"]
    print(json.dumps(dict(mesh=summary["mesh"], total=total, files=summary["files"])))
  return 0


if __name__ == "__main__":
  sys.exit(main())
