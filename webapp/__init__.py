"""numllama's HTTP layer: llama-server's API over `engine.slots`. Knows nothing of kernels."""
