"""ChatGLM-6B (first generation): our own ggml graph, KV cache and tokenizer behind the common Engine interface."""
