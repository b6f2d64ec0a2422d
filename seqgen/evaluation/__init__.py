"""Evaluation: free-running generation of a split measured in original units (evaluate), the
measures themselves (metrics), and the baselines every model is scored beside (baselines)."""
