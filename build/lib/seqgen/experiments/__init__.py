"""Data, not code: the phase table and presets (phases.toml). Installed as seqgen.experiments."""
