import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

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


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="the HumanEval sandbox is bubblewrap (make installs it: "
                    "apt-get install bubblewrap); without it collocate refuses to run model-written code")
def test_humaneval_sandbox_contains_hostile_candidates(tmp_path, monkeypatch):
    """Model-written code that tries to escape scores a failure and leaves no trace: it cannot delete or
    write outside its folder, read the caller's files (a secret, /etc/shadow) or environment (/proc of its
    parent), run a shell (subprocess, os.posix_spawn), leave processes behind (a fork bomb through libc, or
    80 sleepers), or reach any socket (TCP on the host, a Unix socket in the host's filesystem). Each
    escape is written so that the candidate passes only if the escape worked."""
    import os
    import socket
    import subprocess

    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    os.chmod(tmp_path, 0o755)
    monkeypatch.setenv("COLLOCATE_TEST_SECRET", "hunter2")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "host.sock"))
    unix.listen()
    unix.settimeout(0.5)
    os.chmod(tmp_path / "host.sock", 0o777)
    outside = tmp_path / "escaped.txt"
    attacks = {
        "delete": f"import os, shutil\nos.remove({str(victim)!r})\nshutil.rmtree({str(tmp_path)!r})\n",
        "write outside": f"open({str(outside)!r}, 'w').write('out')\n",
        "read a secret": f"assert open({str(secret)!r}).read() == 's3cret'\n",
        "read /etc/shadow": "assert open('/etc/shadow').read()\n",
        "parent environment": "import os\nfound = False\nfor pid in os.listdir('/proc'):\n"
                              "    try:\n        found |= b'hunter2' in open(f'/proc/{pid}/environ', 'rb').read()\n"
                              "    except Exception:\n        pass\nassert found\n",
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "libc fork": "import ctypes, time\nlibc = ctypes.CDLL(None)\nfor _ in range(80):\n    if libc.fork() == 0:\n"
                     "        time.sleep(60)\nassert False\n",
        "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'sleep 30'])\n",
        "posix_spawn": "import os\npid = os.posix_spawn('/bin/sh', ['sh', '-c', 'exit 0'], {})\n"
                       "assert os.waitpid(pid, 0)[1] == 0\n",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'hi')\n",
        "raw socket": f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
        "unix socket": f"import _socket\ns = _socket.socket(_socket.AF_UNIX)\ns.connect({str(tmp_path / 'host.sock')!r})\n",
    }
    before = subprocess.run(["pgrep", "-c", "-u", "65534"], capture_output=True, text=True).stdout.strip() or "0"
    for name, attack in attacks.items():
        completion = f"def add(a, b):\n{''.join('    ' + line + chr(10) for line in attack.splitlines())}    return a + b\n"
        assert not humaneval_pass(completion, PROBLEM, timeout=5), name
    assert victim.read_text() == "precious" and secret.exists() and not outside.exists()
    for sock in (listener, unix):
        try:
            sock.accept()
            connected = True
        except OSError:
            connected = False
        assert not connected
    time.sleep(0.5)
    after = subprocess.run(["pgrep", "-c", "-u", "65534"], capture_output=True, text=True).stdout.strip() or "0"
    assert after == before  # nothing it started outlived it
    assert not list(Path(tempfile.gettempdir()).glob("collocate-sandbox-*"))
    assert humaneval_pass("def add(a, b):\n    return a + b\n", PROBLEM)  # and an honest answer still passes
