"""seqgen: an autoregressive LSTM surrogate for PCA-compressed simulations, tracked in MLflow.

Subpackages, in the order a phase uses them:
  data/        the data contract (sequences), the seeded split, the embedded Burgers dataset
  model/       StreamlinedSequenceGenerator, its hand-written recurrence (Python, C++, CUDA), the
               model file (bundle) and generation for users (pyfunc)
  training/    one phase: where it starts, its epochs, steps, losses, schedules, local files
  runs/        the phase's life in the tracking store: tracking (the only module that talks to
               MLflow), the courier that delivers records, the run keeper (lease, resume, finish)
  study/       chains of phases: one chain (pipeline), every chain on Ray (cluster), the demo
  evaluation/  free-running evaluation, its measures and the baselines
Top level: config (typed settings from experiments/phases.toml), errors, files (atomic writes),
log (the `seqgen` logger), version, cli, bench.
"""
