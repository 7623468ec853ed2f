"""The runtime: the Ray pool and its workers, MLflow tracking, Hydra plumbing, library internals."""
