"""nexlab.llamacpp: llama.cpp itself, from the one tree llama-cpp-python vendors.

- source: fetch and patch that tree, the cache, the reference converter, upstream's chat template
- build: cmake of the tools (llama-bench, llama-server, ...), ``nexlab setup``
- process: child processes that are stopped with everything they started on Ctrl-C
- server: llama-server, and chat-template routing through the real server
- runtime: the llama-cpp-python model wrapper, log capture, the allocation probe
- libggml: ctypes binding of libggml's C quantizers and tensor structs (the bit-exact oracle)

May import :mod:`nexlab.convert` and everything below it.
"""
