"""One llama.cpp bs1 greedy decode for bench/engine/decode_cpu.py, run by the llama-cpp-python venv's python.

    /work/llamacpp-venv/bin/python bench/engine/_llamacpp_decode.py MODEL.gguf TOKENS THREADS PROMPT_IDS...

Prints {"rate": decode tokens/s after the first token, "ids": generated ids} as JSON. Imports neither torch
nor the project: llama-cpp-python is a benchmark-only dependency living in its own venv.
"""
from __future__ import annotations

import json
import sys
import time

from llama_cpp import Llama


def main() -> None:
    path, new_tokens, threads, *prompt = sys.argv[1:]
    llm = Llama(model_path=path, n_ctx=512, n_threads=int(threads), n_batch=512, verbose=False)
    ids, stamps = [], []
    for token in llm.generate([int(t) for t in prompt], temp=0.0, top_k=1, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        ids.append(token)
        if len(ids) == int(new_tokens):
            break
    print(json.dumps({"rate": (len(ids) - 1) / (stamps[-1] - stamps[0]), "ids": ids}))


if __name__ == "__main__":
    main()
