"""Loading weights: safetensors folders, GGUF files, the embedded default model."""
