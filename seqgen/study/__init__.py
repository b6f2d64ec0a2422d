"""Chains of phases: one chain of one strategy and seed, phase after phase (chain), every chain of
a study as a Ray task on this machine or a cluster (cluster), and the README's demo (demo)."""
