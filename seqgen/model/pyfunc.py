"""The pyfunc flavour of a seqgen model, logged as code (models-from-code: nothing is pickled).

MLflow runs this file when the model loads; the weights come from the bundle artifact.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class RefusedInput(MlflowException, ValueError):
    """A request the model refuses. An MlflowException with INVALID_PARAMETER_VALUE, so
    `mlflow models serve` answers 400 with this message (any other exception becomes a 400 that
    says only "unexpected error"); a ValueError for callers of predict()."""


class SeqgenPyfunc(mlflow.pyfunc.PythonModel):
    """One row per parameter set in, generated sequences (long format) in original units out."""

    def load_context(self, context) -> None:
        from seqgen.model.bundle import Bundle

        self.bundle = Bundle.load(Path(context.artifacts["bundle"]))
        self.model = self.bundle.build_model()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from seqgen.model.generate import InputError, generate_frame

        try:
            return generate_frame(self.model, self.bundle, model_input)
        except InputError as e:
            raise RefusedInput(str(e), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(SeqgenPyfunc())
