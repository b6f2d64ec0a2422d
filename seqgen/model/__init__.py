"""The model: StreamlinedSequenceGenerator (generator), its autoregressive recurrence with a
hand-written backward (recurrence; the C++ time loop in native/), the model file that rebuilds it
anywhere (bundle), and generation in original units for users and `mlflow models serve` (generate,
pyfunc)."""
