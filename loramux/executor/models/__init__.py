"""Model code in plain PyTorch, one module per architecture family (llama.py: Llama, Mistral, Qwen2)."""
