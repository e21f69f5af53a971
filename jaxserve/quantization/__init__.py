"""Quantized weights: the QArray pytree and the one `linear` every model family calls (qarray.py), the schemes that
quantize a float checkpoint at load (schemes.py), and GGUF's block types kept in integer form (gguf_blocks.py).

Adding a scheme is a quantizer in schemes.py producing a QArray; the model code does not change."""
