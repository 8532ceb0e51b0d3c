"""The OpenAI-compatible server, run for real on 127.0.0.1 and called with the official `openai` client
(SmolLM2 with its shipped bundle) and with raw HTTP for what a client library would never send."""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from collocate.api import Generator
from collocate.bundle import MTPBundle
from collocate.step import StepRunner
from collocate.engine import build_decoder
from collocate.serve import build_app
from conftest import tiny_llama, tiny_tokenizer, with_rank_probs


class Server:
    """uvicorn in a thread, on a free port; stopped as SIGTERM would stop it (graceful shutdown)."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def smol_server():
    gen = Generator.from_pretrained("smollm2-135m", engine="eager", dtype="float32", device="cpu")
    server = Server(build_app(gen, name="smollm2-135m"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_server():
    model = tiny_llama()
    bundle = with_rank_probs(MTPBundle.for_backbone(model, k=4, base_model="tiny"))
    gen = Generator(build_decoder(model, tiny_tokenizer(), bundle, engine="eager", eos_token_ids=[2]))
    server = Server(build_app(gen, name="tiny", default_max_tokens=16))
    yield server
    server.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.mark.integration
def test_openai_client_chat_stream_and_completion(smol_server):
    c = client(smol_server)
    assert [m.id for m in c.models.list().data] == ["smollm2-135m"]
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colours."}]
    kw = dict(model="smollm2-135m", messages=messages, max_tokens=24, temperature=0)
    ar = c.chat.completions.create(**kw, extra_body={"mode": "ar"})
    text = ar.choices[0].message.content
    assert text and ar.choices[0].finish_reason in ("stop", "length") and ar.usage.completion_tokens > 0
    verify = c.chat.completions.create(**kw, extra_body={"mode": "verify", "tree_size": 8})
    assert verify.choices[0].message.content == text  # greedy verify through the server is ar's answer
    assert verify.usage.model_extra["tau"] > 1.0  # drafts were accepted
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(**kw, stream=True, extra_body={"mode": "verify"}) if ch.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    done = c.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=12, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=12, temperature=0, stream=True))
    assert done.choices[0].text and streamed == done.choices[0].text
    sampled = [c.chat.completions.create(**{**kw, "temperature": 0.8}, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed repeats


def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=60, **kw)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(tiny_server):
    chat = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 4}
    cases = [
        (b"{not json", "malformed JSON"),
        ({"max_tokens": 4}, "messages"),
        ({**chat, "mode": "turbo"}, "unknown mode 'turbo'"),
        ({**chat, "max_tokens": 0}, "max_tokens must be >= 1"),
        ({"messages": [{"role": "user", "content": " ".join(["w7"] * 300)}]}, "does not fit"),
        ({**chat, "n": 2}, "n must be 1"),
        ({**chat, "temperature": -0.5}, "temperature must be >= 0"),
        ({**chat, "tree_size": 0}, "tree size"),
        ({**chat, "mode": "clp", "clp_features": "tokens"}, "unknown CLP features"),
        ({**chat, "mode": "clp", "argmax": True, "threshold": 0.5}, "--argmax"),
        ({**chat, "messages": []}, "messages"),
    ]
    for body, message in cases:
        r = post(tiny_server, "/v1/chat/completions", body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert message in err["message"] and err["type"] == "invalid_request_error", (body, err)
    r = post(tiny_server, "/v1/chat/completions", {**chat, "model": "gpt-9"})
    assert r.status_code == 404 and "serves 'tiny'" in r.json()["error"]["message"]
    assert post(tiny_server, "/v1/completions", {"prompt": ["a", "b"]}).status_code == 400
    assert httpx.get(tiny_server.url + "/v1/nothing").status_code == 404
    ok = post(tiny_server, "/v1/chat/completions", {**chat, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_load_8_clients_x_20_requests(tiny_server):
    """Every request of 8 concurrent clients (half of them streaming) completes, in one engine's turns,
    and the process grows by less than 64 MB over the run."""
    c = client(tiny_server)

    def one(i: int) -> int:
        kw = dict(model="tiny", messages=[{"role": "user", "content": f"w{3 + i % 90} w9"}], max_tokens=8,
                  temperature=0 if i % 3 else 0.7, seed=i)
        if i % 2:
            return len("".join(ch.choices[0].delta.content or "" for ch in
                               c.chat.completions.create(**kw, stream=True) if ch.choices)) >= 0
        return c.chat.completions.create(**kw).usage.completion_tokens > 0

    for i in range(8):  # warm-up
        one(i)
    before = rss_mb()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(160)))
    assert all(results) and len(results) == 160
    assert rss_mb() - before < 64


def test_a_client_that_disconnects_frees_the_engine(tiny_server, monkeypatch):
    steps = []
    run_step = StepRunner.run_step
    monkeypatch.setattr(StepRunner, "run_step", lambda self, *a, **k: (steps.append(1), run_step(self, *a, **k))[1])
    body = {"model": "tiny", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 200, "stream": True,
            "temperature": 0.9, "seed": 1, "mode": "ar"}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content": "' in line:
                break  # the first text, then hang up
    time.sleep(0.5)
    after_hangup = len(steps)
    ok = post(tiny_server, "/v1/chat/completions", {**body, "stream": False, "max_tokens": 3})
    assert ok.status_code == 200
    assert after_hangup < 100  # the abandoned answer stopped long before its 200 tokens


def test_collocate_serve_prints_where_it_listens_and_stops_cleanly_on_sigterm(tmp_path):
    """The CLI server in its own process: it says what it serves, answers, and on SIGTERM lets the
    in-flight streamed answer finish before it exits with status 0."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import save_tiny

    model = save_tiny(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "collocate.cli", "serve", "--model", model, "--name", "tiny",
                             "--port", str(port), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        lines = []
        while not any("serving" in x for x in lines) and len(lines) < 50:  # after any loading messages
            lines.append(proc.stdout.readline())
        line = lines[-1]
        assert "serving 'tiny'" in line and f"http://127.0.0.1:{port}/v1" in line, lines
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        body = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 120, "stream": True,
                "temperature": 0.9, "seed": 3}
        text = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for i, line in enumerate(r.iter_lines()):
                if i == 2:
                    os.kill(proc.pid, signal.SIGTERM)  # mid-answer
                text.append(line)
        assert "data: [DONE]" in text  # the answer in flight was finished
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
