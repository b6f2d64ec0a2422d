"""Training one phase, the machine learning only: where it starts and what it trains on (start),
one optimiser step and one evaluation pass under the device's precision (step), what an epoch
produced and early stopping (epochs), the loss terms by name and the objective a strategy weighs
them in (losses), pure schedules (schedules), CUDA graphs and the rule that makes capturing them
safe (graphs), and the loop that ties them together (train). Its bookkeeping is the run keeper's
(seqgen/runs/keeper.py)."""
