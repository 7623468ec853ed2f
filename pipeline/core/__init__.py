"""The core math: guidance, metrics, the sampler, seeds and pictures (tensors in, tensors or PNG bytes out)."""
