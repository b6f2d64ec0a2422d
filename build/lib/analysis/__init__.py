"""Analysis: pull seqgen runs from MLflow and draw comparisons."""
