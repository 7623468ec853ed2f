"""Image metrics: FID on torch-fidelity (features, reference statistics) and CLIP score."""
