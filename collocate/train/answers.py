"""Stage 1, data: the backbone's own greedy answers to real prompts, in atomic shards and a manifest.

    collocate train --model smollm2-135m --samples 2000 --out runs/x --only data
    collocate train --model smollm2-135m --samples 2000 --out runs/x --answers made-by-vllm.jsonl

Each shard is written whole or not at all, so a killed run resumes with nothing lost or repeated, and
the prompt list is fixed at the first run so a restart sees the very same one.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from array import array
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .common import is_main, rank_world, save_atomic, say, write_atomic
from .config import TrainConfig


def saved_prompts(cfg: TrainConfig, run: Path) -> tuple[list[list[int]], bool]:
    """The prompts a run's answers were made from (none on its first run), and whether its data settings
    are this one's; settings it cannot grow into are refused."""
    if not prompts_path(run).exists():
        return [], False
    saved = json.loads(prompts_path(run).read_text())
    if saved["settings"] == cfg.data_settings():
        return saved["ids"], True
    if not can_grow(saved["settings"], cfg):
        raise ValueError(f"{run} was started with other data settings {saved['settings']}; use another "
                         "--out or the same settings (only --samples may grow, from a whole number of shards, and "
                         "--prompts may name another file)")
    return saved["ids"], False


def prepare_prompts(cfg: TrainConfig, tokenizer, run: Path) -> list[list[int]]:
    """The encoded prompt list, fixed at the first run so a restart sees the very same one. A run asked
    for more --samples than it was started with keeps its prompts (and answers) and appends new ones."""
    kept, same = saved_prompts(cfg, run)
    if same:
        return kept
    from ..data import encode, suite_prompts, training_prompts

    def usable(texts) -> list[list[int]]:
        """The kept prompts, then the pool's prompts that fit and are new, in pool order, encoded only until
        there are enough (encoding a pool of 100K prompts took minutes). A near-copy of a prompt taken
        (half its shingles seen, as two code windows of one def are) gives a near-copy of its answer,
        which in a held-out shard inflates held-out accuracy."""
        ids, seen = list(kept), {tuple(p) for p in kept}
        seen_shingles = set().union(*(shingles(tokenizer.decode(p)) for p in kept))
        for text in texts:
            s = shingles(text)
            if len(s & seen_shingles) > NEAR_COPY * len(s):
                continue
            p = encode(tokenizer, text, chat=cfg.chat)
            if len(p) <= cfg.max_prompt_tokens and tuple(p) not in seen:  # a repeated prompt: a repeated answer
                ids.append(p)
                seen.add(tuple(p))
                seen_shingles |= s
                if len(ids) == cfg.samples:
                    break
        return ids

    if cfg.prompts_file:
        ids = usable(p.text for p in suite_prompts(cfg.prompts_file))
    else:  # spare prompts for the length filter; a bigger pool where too few fit (most code windows are long)
        for factor in (2, 4, 8):
            ids = usable(training_prompts(cfg.samples * factor, mix=cfg.mix, seed=cfg.seed))
            if len(ids) >= cfg.samples or not cfg.mix:  # (without a mix, ShareGPT's ~8.9K turns are all there is)
                break
    if len(ids) < cfg.samples:
        hint = "" if cfg.mix else "; add prompt kinds with --mix code"
        raise ValueError(f"only {len(ids)} usable prompts for --samples {cfg.samples}{hint}")
    prompts_path(run).parent.mkdir(parents=True, exist_ok=True)
    if is_main():
        write_atomic(prompts_path(run), json.dumps({"settings": cfg.data_settings(), "ids": ids[: cfg.samples]}))
    return ids[: cfg.samples]


NEAR_COPY = 0.5  # a prompt with more than this share of its shingles in the prompts taken is a near-copy


def shingles(text: str, n: int = 8) -> set[bytes]:
    """A text's overlapping n-word pieces, hashed (a text under n words is one piece)."""
    words = text.split()
    return {hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest()
            for i in range(max(1, len(words) - n + 1))}


def can_grow(saved: dict, cfg: TrainConfig) -> bool:
    """A run's answers extend to more --samples when nothing else changed and its shards are whole (a new
    prompt never lands in a shard that exists). --prompts may name another file: the kept prompts stay
    first, and the new ones come from that file (a bigger pool, once the first runs out)."""
    now, free = cfg.data_settings(), ("samples", "prompts_file")
    same = {k: v for k, v in saved.items() if k not in free} == {k: v for k, v in now.items() if k not in free}
    return same and now["samples"] > saved["samples"] and saved["samples"] % cfg.shard_size == 0


def prompts_path(run: Path) -> Path:
    return run / "data" / "prompts.json"


def shard_path(run: Path, i: int) -> Path:
    return run / "data" / f"shard-{i:05d}.safetensors"


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], cfg: TrainConfig, eos: list[int]) -> list[list[int]]:
    """Greedy answers for a batch of prompts: left padding, KV cache, cut after the first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # with a static cache every batch is padded to the longest allowed prompt: one shape, one compile
    width = cfg.max_prompt_tokens if cfg.gen_static else max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    extra = {"cache_implementation": "static"} if cfg.gen_static else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad, **extra)[:, width:].tolist()
    answers = []
    for row in out:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append(row[:cut])
    return answers


def post_json(url: str, body: dict | None = None, timeout: float = 600) -> dict:
    """One request to an OpenAI-compatible server (GET without a body); what goes wrong is a one-line error."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    key = os.environ.get("OPENAI_API_KEY")  # (a server started with an API key: vLLM's --api-key, ours)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ValueError(f"--answers-from: {url} answered {e.code}: {e.read()[:500].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"--answers-from: cannot reach {url} ({getattr(e, 'reason', e)})") from None


def remote_batch(cfg: TrainConfig, tokenizer, prompts: list[list[int]], eos: list[int], served: str) -> list[list[int]]:
    """Greedy answers from the server at cfg.answers_from, one request a prompt, all at once: the prompt as
    token ids (OpenAI's form, which vLLM, SGLang and collocate serve read as the model does), the answer's
    text tokenized back, ending in EOS where the server stopped at one."""
    from concurrent.futures import ThreadPoolExecutor

    url = cfg.answers_from.rstrip("/") + "/completions"

    def ask(p: list[int]) -> dict:
        body = post_json(url, {"model": served, "prompt": p, "max_tokens": cfg.max_new_tokens, "temperature": 0})
        if not isinstance(body.get("choices"), list) or not body["choices"] or "text" not in body["choices"][0]:
            raise ValueError(f"--answers-from: {url} answered without a completion's choices: {str(body)[:300]}")
        return body["choices"][0]

    with ThreadPoolExecutor(min(len(prompts), 256)) as pool:
        choices = list(pool.map(ask, prompts))
    answers = []
    for choice in choices:  # (tokenized here, in one thread)
        ids = tokenizer(choice["text"], add_special_tokens=False)["input_ids"][: cfg.max_new_tokens]
        answers.append(ids + eos[:1] if choice.get("finish_reason") == "stop" and len(ids) < cfg.max_new_tokens else ids)
    return answers


def served_model(url: str) -> str:
    """The id of the first model the server lists (a vLLM or SGLang server serves one)."""
    models = post_json(url.rstrip("/") + "/models").get("data") or []
    if not models:
        raise ValueError(f"--answers-from: {url}/models lists no model")
    return models[0]["id"]


def generate_answers(model, tokenizer, cfg: TrainConfig, run: Path) -> dict:
    """Stage 1. Shards are written whole or not at all, so a restart never loses or repeats one. With
    --answers-from a server writes the answers, checked on the first batch before anything is kept."""
    from ..decode import eos_ids

    prompts = prepare_prompts(cfg, tokenizer, run)
    rank, world = rank_world()
    mine = [i for i in range(cfg.n_shards) if i % world == rank]
    todo = [i for i in mine if not shard_path(run, i).exists()]
    eos = eos_ids(model, tokenizer)
    bar = tqdm(total=len(prompts), desc="data: answers", unit="ans", disable=not is_main(),
               initial=(cfg.n_shards - len(todo) * world) * cfg.shard_size if todo else len(prompts))
    start, new_tokens = time.perf_counter(), 0
    served = served_model(cfg.answers_from) if cfg.answers_from and todo else None
    for i in todo:
        chunk = prompts[i * cfg.shard_size:(i + 1) * cfg.shard_size]
        order = sorted(range(len(chunk)), key=lambda j: len(chunk[j]))  # similar lengths batch together
        answers = [None] * len(chunk)
        for b in range(0, len(order), cfg.gen_batch):
            idx = order[b:b + cfg.gen_batch]
            batch = [chunk[j] for j in idx]
            if served is None:
                got = generate_batch(model, tokenizer, batch, cfg, eos)
            else:
                got = remote_batch(cfg, tokenizer, batch, eos, served)
                if i == todo[0] and b == 0:  # the first batch, before its shard is written
                    check_greedy(model, batch, got, cfg, cfg.answers_from)
            for j, ans in zip(idx, got):
                answers[j] = ans
            new_tokens += sum(len(answers[j]) for j in idx)
            bar.update(len(idx) * world)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
        write_shard(run, i, chunk, answers)
    bar.close()
    return write_manifest(cfg, run)


PROMPT_KEYS, ANSWER_KEYS = ("prompt_token_ids", "prompt_ids", "prompt"), ("token_ids", "answer_ids", "answer")
GREEDY_REFUSED, GREEDY_WARNED = 0.5, 0.9  # shares of answer tokens that are the backbone's own greedy choice
CHECKED = 16  # answers the greedy check reads


def read_answers(path: str, tokenizer, cfg: TrainConfig, vocab: int) -> tuple[list[list[int]], list[array], dict]:
    """The first cfg.samples usable lines of a JSONL of answers made elsewhere, as (prompts, answers, counts):
    token ids (vLLM's `prompt_token_ids` and `outputs[0].token_ids`) or texts (the prompt encoded as
    --prompts encodes it, --chat included; the answer as it stands). Prompts over --max-prompt-tokens and
    repeated prompts are skipped, answers cut at --max-new-tokens; a line that cannot be read is an error
    that names it."""
    from ..data import encode

    prompts, answers, seen, skipped, lines = [], [], set(), {"long_prompt": 0, "repeated_prompt": 0, "empty": 0}, 0
    with open(path, encoding="utf-8") as f:
        for lines, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lines}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {lines}: a JSON object per line, got {type(row).__name__}")
            key_p = next((k for k in PROMPT_KEYS if k in row), None)
            key_a = next((k for k in ANSWER_KEYS if k in row), None)
            if key_p is None or key_a is None:
                raise ValueError(f"{path} line {lines}: needs a prompt ({', '.join(PROMPT_KEYS)}) and an answer "
                                 f"({', '.join(ANSWER_KEYS)}); it has {', '.join(row) or 'no keys'}")
            for key in (key_p, key_a):
                value, text = row[key], key in ("prompt", "answer")
                if not (isinstance(value, str) if text else
                        isinstance(value, list) and all(type(t) is int and 0 <= t < vocab for t in value)):
                    raise ValueError(f"{path} line {lines}: '{key}' must be " + (
                        "a text" if text else f"a list of token ids in 0..{vocab - 1} (this backbone's vocabulary)"))
            prompt = encode(tokenizer, row[key_p], chat=cfg.chat) if key_p == "prompt" else row[key_p]
            answer = tokenizer(row[key_a], add_special_tokens=False)["input_ids"] if key_a == "answer" else row[key_a]
            if not prompt or not answer:
                skipped["empty"] += 1
            elif len(prompt) > cfg.max_prompt_tokens:
                skipped["long_prompt"] += 1
            elif tuple(prompt) in seen:
                skipped["repeated_prompt"] += 1
            else:
                seen.add(tuple(prompt))
                prompts.append(prompt)
                answers.append(array("i", answer[: cfg.max_new_tokens]))  # (4 bytes a token: 800K answers fit)
                if len(prompts) == cfg.samples:
                    break
    if len(prompts) < cfg.samples:
        raise ValueError(f"only {len(prompts)} usable answers in {path} for --samples {cfg.samples} (skipped: "
                         + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items()) + ")")
    return prompts, answers, {"lines_read": lines, "skipped": skipped}


@torch.inference_mode()
def greedy_agreement(model, prompts: list[list[int]], answers: list, n: int = CHECKED) -> tuple[float, int]:
    """The share of answer tokens that are the backbone's own argmax after the tokens before them, on n
    answers spread over the list, and how many tokens that was: ~1 for its greedy answers (bf16 near-ties
    aside), far less for sampled ones or another model's."""
    step = max(1, len(prompts) // n)
    same = total = 0
    for p, a in list(zip(prompts, answers))[::step][:n]:
        ids = torch.tensor([p + list(a)], device=model.device)  # (an answer: a list, or read_answers' array)
        guess = model(input_ids=ids).logits[0, len(p) - 1:-1].argmax(-1)
        same += (guess == ids[0, len(p):]).sum().item()
        total += len(a)
    return same / max(total, 1), total


def check_greedy(model, prompts: list[list[int]], answers: list, cfg: TrainConfig, source: str) -> tuple[float, int]:
    """`greedy_agreement`, refused under GREEDY_REFUSED and warned of under GREEDY_WARNED."""
    agree, checked = greedy_agreement(model, prompts, answers)
    if agree < GREEDY_REFUSED:
        raise ValueError(f"{source}: {agree:.0%} of the answer tokens checked ({checked}) are {cfg.model}'s greedy "
                         "choice: these are not its greedy answers (another model or tokenizer, sampled answers, or "
                         "prompts without the chat template that --chat adds); make them with temperature 0 from "
                         "this model")
    if agree < GREEDY_WARNED:
        say(f"warning: only {agree:.0%} of the answer tokens checked are {cfg.model}'s greedy choice: a drafter "
            "trained on them learns to draft something else, and fewer of its drafts will be accepted")
    say(f"data: answers from {source}, {agree:.1%} of {checked} tokens checked are {cfg.model}'s greedy choice")
    return agree, checked


def import_answers(model, tokenizer, cfg: TrainConfig, run: Path) -> dict:
    """Stage 1 from answers made elsewhere (cfg.answers_file): the same prompts.json and shards as
    `generate_answers` writes, so every later stage, a resume and a grown --samples work alike. Nothing is
    written until the lines needed are read and the sample's greedy check has passed."""
    if not is_main():
        return {}
    kept, _ = saved_prompts(cfg, run)
    todo = [i for i in range(cfg.n_shards) if not shard_path(run, i).exists()]
    if todo:
        prompts, answers, counts = read_answers(cfg.answers_file, tokenizer, cfg, model.get_input_embeddings().num_embeddings)
        if prompts[:len(kept)] != kept:  # a resumed or grown run: its shards hold the file's first prompts
            raise ValueError(f"{cfg.answers_file}: its first {len(kept)} usable prompts are not the ones {run}'s "
                             "answers were made from (has the file changed?); use another --out")
        agree, checked = check_greedy(model, prompts, answers, cfg, cfg.answers_file)
        counts.update(file=str(cfg.answers_file), greedy_agreement=round(agree, 4), greedy_checked_tokens=checked)
        prompts_path(run).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(prompts_path(run), json.dumps({"settings": cfg.data_settings(), "ids": prompts}))
        write_atomic(run / "data" / "imported.json", json.dumps(counts, indent=1))
        for i in todo:
            rows = slice(i * cfg.shard_size, (i + 1) * cfg.shard_size)
            write_shard(run, i, prompts[rows], [a.tolist() for a in answers[rows]])
    return write_manifest(cfg, run)


def write_shard(run: Path, i: int, prompts: list[list[int]], answers: list[list[int]]) -> None:
    seqs = [p + a for p, a in zip(prompts, answers)]
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    save_atomic({"tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
                 "offsets": offsets.to(torch.int64),
                 "prompt_lens": torch.tensor([len(p) for p in prompts], dtype=torch.int64)}, shard_path(run, i))


def read_shard(run: Path, i: int) -> list[tuple[list[int], int]]:
    """[(token ids of prompt+answer, prompt length)] of one shard."""
    t = load_file(str(shard_path(run, i)))
    toks, off, plen = t["tokens"].tolist(), t["offsets"].tolist(), t["prompt_lens"].tolist()
    return [(toks[off[j]:off[j + 1]], plen[j]) for j in range(len(plen))]


PIECE = 16  # tokens: a piece this long that a training answer also holds was copied, not predicted


def answer_pieces(tokens: list[int]) -> set[int]:
    return {hash(tuple(tokens[i:i + PIECE])) for i in range(len(tokens) - PIECE + 1)}


def shard_answers(run: Path, ids: list[int]) -> list[list[int]]:
    """The answer tokens (prompts left out) of these shards."""
    return [seq[p:] for i in ids for seq, p in read_shard(run, i)]


def heldout_overlap(train: list[list[int]], held: list[list[int]]) -> dict:
    """How much of the held-out answers the training answers already hold: the share of their 16-token
    pieces found in a training answer, and the share of held-out answers more than half found. Where it is
    high, held-out accuracy measures recall of near-copies, not prediction."""
    seen = set().union(*map(answer_pieces, train))
    shares = [len(p & seen) / len(p) for p in map(answer_pieces, held) if p]
    n = max(len(shares), 1)
    return {"pieces_seen": sum(shares) / n, "answers_half_seen": sum(x > 0.5 for x in shares) / n}


def write_manifest(cfg: TrainConfig, run: Path) -> dict:
    shards = []
    for i in range(cfg.n_shards):
        if shard_path(run, i).exists():
            seqs = read_shard(run, i)
            digest = hashlib.sha256(shard_path(run, i).read_bytes()).hexdigest()[:16]
            shards.append({"index": i, "samples": len(seqs), "answer_tokens": sum(len(s) - p for s, p in seqs),
                           "sha256": digest})
    manifest = {"settings": cfg.data_settings(), "shards": shards,
                "samples": sum(s["samples"] for s in shards), "answer_tokens": sum(s["answer_tokens"] for s in shards),
                "complete": len(shards) == cfg.n_shards}
    if (run / "data" / "imported.json").exists():  # answers made elsewhere: what was read, and the greedy check
        manifest["imported"] = json.loads((run / "data" / "imported.json").read_text())
    if is_main():
        write_atomic(run / "data" / "manifest.json", json.dumps(manifest, indent=1))
    return manifest
