"""numllama's inference engine: GGUF file -> tensors + hparams + vocab -> tokenizer ->
batched forward (quantized kernels, KV cache) -> logits -> sampler -> tokens.

The engine knows nothing of HTTP; `webapp/` drives it through `engine.slots`.
"""
