"""What the registry and the runs say about themselves in `mlflow ui`: description texts built
from a model bundle and a run's settings. Pure text, no MLflow calls."""

from __future__ import annotations

from seqgen.model.bundle import Bundle


def model_descriptions(
    bundle: Bundle, name: str, version: str, continued_from: str
) -> tuple[str, str]:
    """(registered model description, version description): what the model generates, its input
    columns and their trained ranges, the phase and what it continued from, how to load it."""
    d = bundle.data
    ranges = list(zip(d.param_names, d.param_ranges, strict=True)) if d.param_ranges else []
    example = {n: [round((lo + hi) / 2, 6)] for n, (lo, hi) in ranges}
    example = example or {n: [0.0] for n in d.param_names}
    params, comps = ", ".join(d.param_names), ", ".join(d.component_names)

    def load(uri: str) -> str:
        return (
            "```python\nimport mlflow, pandas as pd\n"
            f'mlflow.pyfunc.load_model("{uri}").predict(pd.DataFrame({example}))\n```'
        )

    latest = f"models:/{name}@phase-{bundle.phase}"
    model_text = (
        f"seqgen `{bundle.strategy}` ({bundle.preset} preset): generates sequences of "
        f"{d.seq_len} steps of {len(d.component_names)} components ({comps}) from "
        f"{len(d.param_names)} simulation parameters ({params}), free-running, in the data's "
        f"original units.\n\nInput: one row per parameter set, columns {params}; other columns "
        f"are ignored. Output: long format, columns sample, {d.step_name}, {comps}, "
        "outside_training_range. Aliases `phase-N` (latest of any seed) and `phase-N-s<seed>`."
        f"\n\nLoad the latest phase {bundle.phase}:\n\n{load(latest)}"
    )
    span = "; ".join(f"{n} in [{lo:.6g}, {hi:.6g}]" for n, (lo, hi) in ranges)
    parent = continued_from.removeprefix("models:/") or "nothing (new training)"
    version_text = (
        f"Phase {bundle.phase} of `{bundle.strategy}`, seed {bundle.seed}, best validation loss "
        f"{bundle.val_loss:.6g} at epoch {bundle.epoch} (last epoch {bundle.last_epoch}); "
        f"continued from {parent}; run {bundle.run_id}.\n\nTrained on {d.data_dir} (fingerprint "
        f"{d.fingerprint}); parameter ranges of the training split: {span or 'not recorded'}. "
        f"Inputs outside them are answered and flagged (outside_training_range).\n\n"
        f"{load(f'models:/{name}/{version}')}"
    )
    return model_text, version_text
