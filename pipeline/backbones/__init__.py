"""Scale-wise backbones: the protocol the sampler drives (base), VAR and its VQ tokenizer (var, vqvae)."""
