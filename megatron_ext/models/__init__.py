"""Plain-PyTorch decoder models (Llama 2/3, Mistral). No parallelism inside."""
