"""Long prompts on the fast engine: the graphs captured before serving (time, memory), then real source code
as the prompt at several lengths up to the cache's end, each mode's answer, speed and tau.

    python bench/long_prompts.py --model MODEL_DIR --heads RUN --modes ar,verify-t48d3 \
        --lengths 256,2048,4096,8192,16384,30000 --new 128 --out long.json

Prompts are standard-library files (the machine's own Python), joined and cut to the length, inside a
request to explain the code. Nothing is captured inside a timed request: Decoder.prepare captures every
graph of each mode first, as `collocate serve` does.
"""
import argparse
import json
import time

import torch

from collocate import data
from collocate.bench import parse_mode
from collocate.engine import load_decoder


def code_prompt(tokenizer, n_tokens: int) -> list[int]:
    """A chat prompt of about n_tokens asking about real source code (whole files, joined, cut to fit)."""
    ask = "Explain what this Python code does, then suggest one improvement.\n```python\n{}\n```"
    empty = len(data.encode(tokenizer, ask.format("")))
    code, files = "", iter(data.stdlib_files())
    while len(tokenizer(code)["input_ids"]) < n_tokens:
        code += next(files).read_text(errors="replace") + "\n"
    ids = tokenizer(code)["input_ids"][: max(1, n_tokens - empty)]
    return data.encode(tokenizer, ask.format(tokenizer.decode(ids)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads")
    ap.add_argument("--modes", default="ar,verify-t48d3")
    ap.add_argument("--lengths", default="256,2048,4096,8192,16384,30000")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--max-len", type=int)
    ap.add_argument("--out")
    args = ap.parse_args()
    dec = load_decoder(args.model, heads=args.heads, max_len=args.max_len)
    backend, cuda = dec.backend, dec.device.type == "cuda"
    result = {"model": args.model, "heads": args.heads, "capacity": backend.capacity, "engine": backend.describe(),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "prepare": {}, "runs": []}
    configs = {m: parse_mode(m, max_new_tokens=args.new) for m in args.modes.split(",")}
    for label, cfg in configs.items():
        free_before = torch.cuda.mem_get_info()[0] if cuda else 0
        start = time.perf_counter()
        dec.prepare(cfg)
        result["prepare"][label] = {"seconds": time.perf_counter() - start, "graphs": len(getattr(backend, "graphs", {})),
                                    "gpu_memory_gb": (free_before - torch.cuda.mem_get_info()[0]) / 2 ** 30 if cuda else 0}
        print(label, result["prepare"][label], flush=True)
    for n in (int(x) for x in args.lengths.split(",")):
        ids = code_prompt(dec.tokenizer, min(n, backend.capacity - args.new - 16))
        answers = {}
        for label, cfg in configs.items():
            graphs = len(getattr(backend, "graphs", {}))
            r = dec.generate(ids, cfg)
            answers[label] = r.tokens
            row = {"prompt_tokens": len(ids), "mode": label, "new_tokens": r.stats.new_tokens, "tau": r.stats.tau,
                   "tok_per_s": r.stats.tok_per_s, "prefill_ms": 1000 * r.stats.prefill_seconds,
                   "seconds": r.stats.seconds, "finish": r.finish_reason,
                   "captured_in_request": len(getattr(backend, "graphs", {})) - graphs,
                   "same_as_first_mode": r.tokens == next(iter(answers.values()))}
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
