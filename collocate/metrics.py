"""Quality and speed metrics; docs/metrics.md defines each one.

    rep_n(tokens, 4)                     # 1 - unique 4-grams / 4-grams (seq-rep-4)
    first_divergence(ar_tokens, tokens)  # None when identical
    gsm8k_correct(text, "42")
    humaneval_pass(completion, problem)  # runs the tests in a subprocess with a timeout
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile


def rep_n(tokens: list[int], n: int) -> float:
    """Share of repeated n-grams in one sequence: 1 - unique n-grams / n-grams (0 when too short)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def first_divergence(reference: list[int], tokens: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts), or None if identical."""
    for i, (a, b) in enumerate(zip(reference, tokens)):
        if a != b:
            return i
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# -- task scores ----------------------------------------------------------------------------------
NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_final_number(text: str) -> str | None:
    """The answer in \\boxed{...}, else after '####', else the last number in the text."""
    for pattern in (r"\\boxed\{\s*\$?(" + NUMBER + r")", r"####\s*\$?(" + NUMBER + ")"):
        hits = re.findall(pattern, text)
        if hits:
            return hits[-1].replace(",", "")
    hits = re.findall(NUMBER, text)
    return hits[-1].replace(",", "") if hits else None


def gsm8k_correct(text: str, final: str) -> bool:
    got = extract_final_number(text)
    try:
        return got is not None and abs(float(got) - float(final)) < 1e-6
    except ValueError:
        return False


def extract_code(text: str, prompt: str, entry_point: str) -> str:
    """The program a chat answer proposes: its python code block, completed from the prompt if it
    only holds the body."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)(?:```|$)", text, flags=re.S)
    code = max(blocks, key=len) if blocks else text
    if f"def {entry_point}" not in code:
        code = prompt + code
    elif not re.search(r"^(from|import) ", code, flags=re.M):
        imports = "\n".join(line for line in prompt.splitlines() if re.match(r"(from|import) ", line))
        code = imports + "\n" + code
    return code


def humaneval_pass(completion: str, problem: dict, *, timeout: float = 10.0) -> bool:
    """pass@1 of one greedy answer: the HumanEval tests in a fresh interpreter, never in-process."""
    program = extract_code(completion, problem["prompt"], problem["entry_point"])
    program += "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        try:
            r = subprocess.run([sys.executable, path], cwd=d, capture_output=True, timeout=timeout,
                               env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0
