"""The pyfunc flavour of a seqgen model, logged as code (models-from-code: nothing is pickled).

MLflow runs this file when the model loads; the weights come from the bundle artifact.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd


class SeqgenPyfunc(mlflow.pyfunc.PythonModel):
    """One row per parameter set in, generated sequences (long format) in original units out."""

    def load_context(self, context) -> None:
        from seqgen.bundle import Bundle

        self.bundle = Bundle.load(Path(context.artifacts["bundle"]))
        self.model = self.bundle.build_model()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from seqgen.generate import generate_frame

        return generate_frame(self.model, self.bundle, model_input)


mlflow.models.set_model(SeqgenPyfunc())
