"""seqgen: an autoregressive LSTM surrogate for PCA-compressed simulations, tracked in MLflow."""
