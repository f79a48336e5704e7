"""The pieces of the GPU benchmark suite (``benchmarks/gpu_suite.py`` runs them).

  common     paths, logging, the JSON files the driver and the workers share
  plan       the stages, their items and time limits (GPU sizes or dry-run sizes)
  configs    the package configs of the items; ``--check_plan`` (full-size traces)
  machine    the set-up: the workers' environment (XLA flags probed), what the machine is
  driver     one worker process per group of items, time limits, the outputs rewritten
             after every item
  worker     a worker process: runs its items one by one, one result file each
  device     the env, layers and throughput stages (random inputs, the device alone)
  pipeline   the pipeline stage (the real loaders against the train step)
  commands   the stages that run another command: torch_compare, time_to_accuracy
  report     gpu_suite.json's summary and the gpu_suite.md tables

The driver side (common, plan, machine, driver, report) imports neither jax nor the
package's dependencies: it runs before they are known to work.
"""
