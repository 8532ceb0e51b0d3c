"""Requests/s and latency of `collocate serve` under concurrent clients (the official openai client).

    python bench/serve_load.py --model smollm2-135m --clients 4 --requests 8 --max-tokens 64 \
        --out bench/results/cpu-smollm2-serve/load.json
    python bench/serve_load.py --url http://127.0.0.1:8000 ...     # a server that is already running
    python bench/serve_load.py --model MODEL --heads BUNDLE --device cuda --modes ar,verify-t32 ...

Modes are named as `collocate bench` names them (verify-t32: a 32-node tree, clp@0.9, ...).

Each client sends its requests one after another (half of them streamed), with prompts from MT-Bench;
the server answers them one at a time on its one engine, so requests/s is the engine's, and latency
includes the wait in the queue. Per mode: requests/s, tokens/s, p50 / p95 latency and, for streams,
time to the first token.
"""
import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def request_fields(spec: str) -> dict:
    """A bench mode name (verify, verify-t32, clp@0.9, ...) as the server's extra body fields."""
    from collocate.options import spec_options

    return spec_options(spec)


def one_request(client, model: str, prompt: str, mode: str, max_tokens: int, stream: bool) -> dict:
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
              extra_body=request_fields(mode))
    start = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(**kw)
        return {"seconds": time.perf_counter() - start, "tokens": r.usage.completion_tokens, "first": None}
    first, tokens = None, 0
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "first": first}


def run_mode(url: str, model: str, prompts: list[str], mode: str, args) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def worker(c: int) -> list[dict]:
        return [one_request(client, model, prompts[(c * args.requests + i) % len(prompts)], mode, args.max_tokens,
                            stream=(i % 2 == 1)) for i in range(args.requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        rows = [r for rs in pool.map(worker, range(args.clients)) for r in rs]
    wall = time.perf_counter() - start
    lat = [r["seconds"] for r in rows]
    firsts = [r["first"] for r in rows if r["first"] is not None]
    return {"requests": len(rows), "wall_seconds": wall, "requests_per_s": len(rows) / wall,
            "tokens_per_s": sum(r["tokens"] for r in rows) / wall, "p50_s": statistics.median(lat),
            "p95_s": percentile(lat, 0.95), "stream_first_token_p50_s": statistics.median(firsts) if firsts else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heads")
    ap.add_argument("--url", help="a running server (else one is started here)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default="ar,verify")
    ap.add_argument("--out")
    args = ap.parse_args()
    from collocate import data

    prompts = [p.text for p in data.suite_prompts("mtbench")]
    server, url, env = None, args.url, {}
    if url is None:
        from test_serve import Server

        from collocate.api import Generator
        from collocate.serve import build_app

        gen = Generator.from_pretrained(args.model, heads=args.heads, device=args.device)
        server = Server(build_app(gen, name=args.model))
        url = server.url
        env = {"engine": gen.decoder.backend.describe(), "device": str(gen.decoder.device)}
    result = {"model": args.model, "clients": args.clients, "requests_per_client": args.requests,
              "max_tokens": args.max_tokens, **env, "date": time.strftime("%Y-%m-%d"), "modes": {}}
    for mode in args.modes.split(","):
        run_mode(url, args.model, prompts[:2], mode, argparse.Namespace(**{**vars(args), "clients": 1, "requests": 2}))
        result["modes"][mode] = run_mode(url, args.model, prompts, mode, args)
        print(mode, json.dumps(result["modes"][mode]), flush=True)
    if server is not None:
        server.stop()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
