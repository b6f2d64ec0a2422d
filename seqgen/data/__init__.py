"""Data: the CSV contract and its cache (sequences), the seeded 4400/550/rest split and the
training-split normaliser, and the embedded viscous-Burgers dataset (synth)."""
