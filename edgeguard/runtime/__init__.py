"""The native layer: the only modules that import llama_cpp and onnxruntime.

``llama_model`` loads the shared library and a GGUF; ``backend`` owns a context, its batches and
its KV cache (``kv_state`` saves and restores sequences); ``kernels`` reads what the build and the
CPU can do; ``heads`` runs Stream's ONNX heads; ``embedding_rows`` reads embedding rows from a
GGUF without loading the table; ``gguf_meta`` reads GGUF metadata before llama.cpp sees it;
``native_order`` loads onnxruntime before a CUDA llama.cpp.
"""
