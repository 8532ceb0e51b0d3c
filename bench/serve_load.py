"""`collocate serve` under load, called with the official openai client: requests/s, time to first token
and latency (p50, p99), tokens/s, tau and errors, at several concurrencies, streaming and not, with prompts
of mixed lengths (MT-Bench questions and ~4K-token source files).

    python bench/serve_load.py --model qwen2.5-coder-1.5b --heads RUN --device cuda --modes ar,verify-t48d3 \
        --concurrency 1,4,16 --requests 8 --long 4000 --out serve_load.json
    python bench/serve_load.py --url http://127.0.0.1:8000 ...     # a server that is already running

Modes are named as `collocate bench` names them. Every client sends its requests one after another, every
second one streamed, every fourth one a long prompt; the server answers one at a time on its one engine,
so requests/s is the engine's and latency includes the wait in the queue. With `--max-queue Q` below the
concurrency, the requests past the queue get 429s: counted apart from errors, which should be 0.
Graphs are captured before the clock starts (Decoder.prepare, as `collocate serve` does).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def one_request(client, model: str, prompt: str, fields: dict, max_tokens: int, stream: bool) -> dict:
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
              extra_body=fields)
    start, first, usage = time.perf_counter(), None, None
    try:
        if not stream:
            r = client.chat.completions.create(**kw)
            usage = r.usage
        else:
            for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - start
                usage = chunk.usage or usage
    except openai.APIStatusError as e:
        return {"status": e.status_code, "seconds": time.perf_counter() - start}
    return {"status": 200, "seconds": time.perf_counter() - start, "first": first, "stream": stream,
            "tokens": usage.completion_tokens, "tau": (usage.model_extra or {}).get("tau")}


def run(url: str, model: str, prompts: list[str], long: list[str], fields: dict, clients: int, args) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key or "none", max_retries=0, timeout=900)

    def worker(c: int) -> list[dict]:
        out = []
        for i in range(args.requests):
            prompt = long[(c + i) % len(long)] if long and i % 4 == 3 else prompts[(c * args.requests + i) % len(prompts)]
            out.append(one_request(client, model, prompt, fields, args.max_tokens, stream=i % 2 == 1))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ok = [r for r in rows if r["status"] == 200]
    lat, firsts = [r["seconds"] for r in ok], [r["first"] for r in ok if r.get("first") is not None]
    taus = [r["tau"] for r in ok if r.get("tau")]
    return {"clients": clients, "requests": len(rows), "answered": len(ok),
            "rejected_429": sum(r["status"] == 429 for r in rows),
            "errors": sum(r["status"] not in (200, 429) for r in rows), "wall_seconds": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": percentile(lat, 0.5), "latency_p99_s": percentile(lat, 0.99),
            "ttft_p50_s": percentile(firsts, 0.5), "ttft_p99_s": percentile(firsts, 0.99),
            "tau": statistics.mean(taus) if taus else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heads")
    ap.add_argument("--url", help="a running server (else one is started here)")
    ap.add_argument("--api-key")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-len", type=int)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=8, help="per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--long", type=int, default=4000, help="tokens of the long prompts (0: none)")
    ap.add_argument("--max-queue", type=int, default=64, help="the started server's queue (below the concurrency: 429s)")
    ap.add_argument("--modes", default="ar,verify")
    ap.add_argument("--out")
    args = ap.parse_args()
    from collocate import data
    from collocate.options import spec_options

    prompts = [p.text for p in data.suite_prompts("mtbench")]
    server, url, env = None, args.url, {}
    if url is None:
        from long_prompts import code_prompt
        from test_serve import Server

        from collocate.api import Generator
        from collocate.bench import parse_mode
        from collocate.serve import ServeConfig, build_app

        gen = Generator.from_pretrained(args.model, heads=args.heads, device=args.device, max_len=args.max_len)
        start = time.perf_counter()
        for mode in args.modes.split(","):
            gen.decoder.prepare(parse_mode(mode))
        env = {"engine": gen.decoder.backend.describe(), "device": str(gen.decoder.device),
               "capacity": gen.decoder.backend.capacity, "prepare_seconds": time.perf_counter() - start}
        tok = gen.tokenizer
        long = [tok.decode(code_prompt(tok, args.long)) for _ in range(1)] if args.long else []
        server = Server(build_app(gen, config=ServeConfig(name=args.model, max_queue=args.max_queue,
                                                          api_key=args.api_key)))
        url = server.url
    else:
        long = []
    if args.device == "cuda" or env.get("device", "").startswith("cuda"):
        import torch

        env["card"] = torch.cuda.get_device_name()
    result = {"model": args.model, "heads": args.heads, "requests_per_client": args.requests,
              "max_tokens": args.max_tokens, "long_prompt_tokens": args.long, "max_queue": args.max_queue, **env,
              "date": time.strftime("%Y-%m-%d"), "runs": []}
    for mode in args.modes.split(","):
        fields = spec_options(mode)
        run(url, args.model, prompts[:2], [], fields, 1, argparse.Namespace(**{**vars(args), "requests": 2}))
        for clients in (int(c) for c in args.concurrency.split(",")):
            row = {"mode": mode, **run(url, args.model, prompts, long, fields, clients, args)}
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    if server is not None:
        server.stop()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
