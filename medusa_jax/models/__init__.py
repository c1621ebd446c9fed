"""Base models: the Flax NNX Llama family, GGUF conversion and the tokenizer."""
