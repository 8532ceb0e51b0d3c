import json

from collocate.bench import parse_mode
from collocate.metrics import extract_final_number, first_divergence, gsm8k_correct, humaneval_pass, rep_n

PROBLEM = {
    "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_rep_n():
    assert rep_n([1, 2, 3, 4], 2) == 0.0
    assert rep_n([1, 1, 1, 1, 1], 2) == 1 - 1 / 4
    assert rep_n([1, 2, 1, 2, 1, 2], 4) == 1 - 2 / 3
    assert rep_n([1, 2], 4) == 0.0


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2


def test_gsm8k_answer_extraction():
    assert extract_final_number("so the answer is \\boxed{1,234}.") == "1234"
    assert extract_final_number("48 + 24 = 72\n#### 72") == "72"
    assert extract_final_number("She has 5 apples and eats 2, leaving 3") == "3"
    assert extract_final_number("no digits") is None
    assert gsm8k_correct("\\boxed{10.0}", "10") and not gsm8k_correct("\\boxed{11}", "10")


def test_humaneval_runs_tests_in_a_subprocess():
    good = "Here you go:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```"
    body_only = "```python\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    hang = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    assert humaneval_pass(good, PROBLEM)
    assert humaneval_pass(body_only, PROBLEM)
    assert not humaneval_pass(wrong, PROBLEM)
    assert not humaneval_pass(hang, PROBLEM, timeout=2)


def test_mode_specs():
    assert parse_mode("clp@0.8", None).threshold == 0.8
    v = parse_mode("verify-adaptive", None)
    assert v.mode == "verify" and v.adaptive
    assert parse_mode("ar", 0.5).threshold is None
    c = parse_mode("verify-c5", None)
    assert (c.mode, c.candidates, c.adaptive) == ("verify", 5, False)
    import pytest

    with pytest.raises(ValueError, match="unknown bench mode"):
        parse_mode("turbo", None)


def test_prompts_from_jsonl(tmp_path):
    from collocate.data import suite_prompts

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(3)) + "\n")
    ps = suite_prompts(str(f))
    assert [p.text for p in ps] == ["question 0", "question 1", "question 2"]


def test_humaneval_sandbox_contains_destructive_candidates(tmp_path):
    """Model-written code that deletes a file outside its folder, forks without end, or opens a socket
    fails harmlessly: the file stays, no process is left over, nothing connects, and it scores a failure."""
    import os
    import socket
    import subprocess

    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    attacks = {
        "delete": f"import os, shutil\nos.remove({str(victim)!r})\nshutil.rmtree({str(tmp_path)!r})\n",
        "fork": "import os\nwhile True:\n    os.fork()\n",
        "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'sleep 30'])\n",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'hi')\n",
        "raw socket": f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
    }
    before = subprocess.run(["pgrep", "-c", "-f", "collocate-sandbox"], capture_output=True, text=True).stdout
    for name, attack in attacks.items():
        completion = f"def add(a, b):\n{''.join('    ' + line + chr(10) for line in attack.splitlines())}    return a + b\n"
        assert not humaneval_pass(completion, PROBLEM, timeout=5), name
    assert victim.read_text() == "precious" and os.path.isdir(tmp_path)
    try:
        listener.accept()
        connected = True
    except OSError:
        connected = False
    assert not connected
    after = subprocess.run(["pgrep", "-c", "-f", "collocate-sandbox"], capture_output=True, text=True).stdout
    assert after == before
    assert humaneval_pass("def add(a, b):\n    return a + b\n", PROBLEM)  # and an honest answer still passes
