"""The pyfunc flavour of a seed ensemble, logged as code: MLflow runs this file when the model
loads; the members' bundles are its artifacts (member_0, member_1, ...)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from seqgen.model.pyfunc import RefusedInput


class EnsemblePyfunc(mlflow.pyfunc.PythonModel):
    """One row per parameter set in; per step each component's mean and std over members out."""

    def load_context(self, context) -> None:
        from seqgen.model.bundle import Bundle

        names = sorted(context.artifacts, key=lambda n: int(n.rsplit("_", 1)[1]))
        self.bundles = [Bundle.load(Path(context.artifacts[n])) for n in names]
        self.models = [b.build_model() for b in self.bundles]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from seqgen.model.ensemble import ensemble_frame
        from seqgen.model.generate import InputError

        try:
            return ensemble_frame(self.models, self.bundles, model_input)
        except InputError as e:
            raise RefusedInput(str(e), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(EnsemblePyfunc())
