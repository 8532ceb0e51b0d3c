"""The OpenAI-compatible server, run for real on 127.0.0.1 and called with the official `openai` client
(SmolLM2 with its shipped bundle) and with raw HTTP for what a client library would never send."""
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from collocate.api import Generator
from collocate.bundle import MTPBundle
from collocate.step import StepRunner
from collocate.engine import build_decoder
from collocate.serve import build_app
from conftest import Server, tiny_llama, tiny_tokenizer, with_rank_probs


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
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=kw.pop("timeout", 60), **kw)


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


def test_a_prompt_of_token_ids_is_answered_as_its_text_is(tiny_server):
    """/v1/completions takes OpenAI's token-id prompts (vLLM and SGLang do too): the ids as the model reads
    them, answered as the text that encodes to them; empty, out-of-vocabulary or several prompts get a 400."""
    c = client(tiny_server)
    text = c.completions.create(model="tiny", prompt="w5 w9 w17", max_tokens=6, temperature=0)
    for prompt in ([5, 9, 17], [[5, 9, 17]]):
        ids = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        assert ids.choices[0].text == text.choices[0].text and ids.usage.prompt_tokens == 3
    for prompt, word in (([], "at least one"), ([5, 96], "0..95"), ([[5], [6]], "one list of token ids"),
                         (["w5", 6], "")):
        r = post(tiny_server, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400 and word in r.json()["error"]["message"], (prompt, r.text)
    assert c.completions.create(model="tiny", prompt=[5], max_tokens=2).usage.completion_tokens == 2


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
        results = list(pool.map(one, range(320)))
    assert all(results) and len(results) == 320
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


def tiny_app(**config):
    """The tiny model behind a server with these ServeConfig settings; it never stops early (no EOS), so a
    request's length is its max_tokens."""
    from collocate.serve import ServeConfig

    model = tiny_llama()
    gen = Generator(build_decoder(model, tiny_tokenizer(), None, engine="eager", eos_token_ids=[]))
    return build_app(gen, config=ServeConfig(name="tiny", **config))


@pytest.fixture
def strict_server():
    server = Server(tiny_app(max_queue=2, request_timeout=30, max_body=64 << 10, api_key="sekret"))
    yield server
    server.stop()


def auth(key="sekret") -> dict:
    return {"authorization": f"Bearer {key}"}


def test_a_key_guards_every_v1_route_and_health_stays_open(strict_server):
    chat = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 3}
    for headers in ({}, auth("wrong")):
        r = post(strict_server, "/v1/chat/completions", chat, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert httpx.get(strict_server.url + "/v1/models", headers=headers).status_code == 401
    assert httpx.get(strict_server.url + "/health").status_code == 200
    c = openai.OpenAI(base_url=strict_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    c = openai.OpenAI(base_url=strict_server.url + "/v1", api_key="sekret", max_retries=0)
    models = c.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].object == "model" and models[0].created > 0
    assert c.models.retrieve("tiny").id == "tiny"
    assert c.chat.completions.create(model="tiny", messages=chat["messages"], max_tokens=3).usage.completion_tokens == 3
    chunks = list(c.chat.completions.create(model="tiny", messages=chat["messages"], max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices  # usage on the last chunk, alone
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_a_second_server_on_a_busy_port_says_so_before_anything_else(tmp_path):
    import subprocess
    import sys

    from conftest import save_tiny

    model = save_tiny(tmp_path / "tiny")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "collocate.cli", "serve", "--model", model, "--port", str(port),
                            "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "serving" not in r.stdout, r.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr, r.stderr


def test_a_burst_over_the_queue_gets_429s_and_every_accepted_request_completes(strict_server, monkeypatch):
    """Twelve requests at once against one running and two waiting: the others hear 429 at once, with
    OpenAI's error body and Retry-After; every accepted one gets its whole answer."""
    slow_steps(monkeypatch, 0.002)
    body = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 120, "temperature": 0}

    def one(i):
        r = post(strict_server, "/v1/chat/completions", {**body, "stream": i % 2 == 1}, headers=auth())
        return r

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    ok = [r for r in answers if r.status_code == 200]
    busy = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(busy) == 12 and len(ok) >= 3 and busy, [r.status_code for r in answers]
    for r in busy:
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
    for r in ok:
        if r.headers["content-type"].startswith("application/json"):
            assert r.json()["usage"]["completion_tokens"] == 120
        else:
            assert r.text.rstrip().endswith("data: [DONE]")
    assert post(strict_server, "/v1/chat/completions", {**body, "max_tokens": 2}, headers=auth()).status_code == 200


def slow_steps(monkeypatch, seconds: float) -> None:
    """Every decode step takes at least this long (the tiny model's steps take a millisecond)."""
    run_step = StepRunner.run_step
    monkeypatch.setattr(StepRunner, "run_step", lambda self, *a, **k: (time.sleep(seconds), run_step(self, *a, **k))[1])


def test_a_request_that_waits_past_its_timeout_gets_503_and_frees_its_place(monkeypatch):
    slow_steps(monkeypatch, 0.005)  # ~1.2 s for the first answer
    server = Server(tiny_app(request_timeout=0.3))
    try:
        long = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 240, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, server, "/v1/chat/completions", long)
            time.sleep(0.2)
            late = post(server, "/v1/chat/completions", {**long, "max_tokens": 2})
            assert late.status_code == 503 and "request-timeout" in late.json()["error"]["message"]
            assert int(late.headers["retry-after"]) >= 1
            assert first.result().status_code == 200
        assert post(server, "/v1/chat/completions", {**long, "max_tokens": 2}).status_code == 200
        assert server.server.config.app.state.service.admitted == 0  # nothing left counted
    finally:
        server.stop()


def test_metrics_are_prometheus_text_and_move_with_requests(tiny_server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(tiny_server.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    r = post(tiny_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 5,
                                                    "temperature": 0})
    assert r.status_code == 200
    post(tiny_server, "/v1/chat/completions", {"messages": []})  # a 400
    after = scrape()
    key = ("collocate_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    assert after[key] == before.get(key, 0) + 1
    bad = ("collocate_requests_total", (("route", "/v1/chat/completions"), ("status", "400")))
    assert after[bad] == before.get(bad, 0) + 1
    grew = lambda name: after[(name, ())] - before.get((name, ()), 0)  # noqa: E731
    assert grew("collocate_completion_tokens_total") == r.json()["usage"]["completion_tokens"]
    assert grew("collocate_prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert grew("collocate_time_to_first_token_seconds_count") == 1 and grew("collocate_tokens_per_step_count") == 1
    assert after[("collocate_queue_depth", ())] == 0


def test_hostile_requests_get_4xx_and_the_connection_goes_on(strict_server):
    """A body over the limit (413, and /health answers meanwhile), fields that would change the answer,
    images, unknown roles, a lone surrogate, an empty stop string, a blank prompt, a max_tokens past the
    context: each a 4xx naming the problem; the same keep-alive connection then serves a good request."""
    chat = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 3}
    with httpx.Client(base_url=strict_server.url, headers=auth(), timeout=30) as h:
        big = h.post("/v1/chat/completions", content=b'{"messages": [' + b" " * (1 << 20) + b"]}",
                     headers={"content-type": "application/json"})
        assert big.status_code == 413 and "max-body" in big.json()["error"]["message"]
        cases = [({**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                 ({**chat, "tool_choice": "auto"}, "tool_choice"),
                 ({**chat, "response_format": {"type": "json_object"}}, "response_format"),
                 ({**chat, "logit_bias": {"5": 100}}, "logit_bias"), ({**chat, "top_logprobs": 3}, "top_logprobs"),
                 ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                  "image_url"),
                 ({**chat, "messages": [{"role": "wizard", "content": "w5"}]}, "role 'wizard'"),
                 ({**chat, "stop": ""}, "stop"), ({**chat, "max_tokens": 10 ** 30}, "max_tokens")]
        for body, word in cases:
            r = h.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and word in r.json()["error"]["message"], (body, r.text)
        for body, word in (({"prompt": "   ", "max_tokens": 4}, "empty"), ({"prompt": "w5", "echo": True}, "echo"),
                           ({"prompt": "w5", "suffix": "x"}, "suffix"), ({"prompt": "w5", "best_of": 3}, "best_of")):
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 400 and word in r.json()["error"]["message"], (body, r.text)
        surrogate = b'{"messages": [{"role": "user", "content": "w5 \\ud800"}], "max_tokens": 3}'
        r = h.post("/v1/chat/completions", content=surrogate, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
        assert h.post("/v1/chat/completions", json=chat).status_code == 200  # the same connection goes on


def test_a_large_body_is_refused_without_stalling_the_server(tiny_server):
    """10 MB: 413 from the size alone (the default limit is 4 MiB), and /health answers at once meanwhile."""
    body = b'{"messages": [{"role": "user", "content": "' + b"w5 " * ((10 << 20) // 3) + b'"}]}'
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(post, tiny_server, "/v1/chat/completions", body)
        start = time.perf_counter()
        assert httpx.get(tiny_server.url + "/health", timeout=10).status_code == 200
        assert time.perf_counter() - start < 2
        assert big.result().status_code == 413


def test_a_non_streaming_client_that_hangs_up_frees_the_engine(monkeypatch):
    server = Server(tiny_app())
    try:
        steps = []
        run_step = StepRunner.run_step
        monkeypatch.setattr(StepRunner, "run_step", lambda self, *a, **k: (steps.append(1), time.sleep(0.01),
                                                                           run_step(self, *a, **k))[2])
        body = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 240, "temperature": 0, "mode": "ar"}
        with pytest.raises(httpx.TimeoutException):
            post(server, "/v1/chat/completions", body, timeout=0.5)
        time.sleep(0.5)
        after_hangup = len(steps)
        start = time.perf_counter()
        assert post(server, "/v1/chat/completions", {**body, "max_tokens": 3}).status_code == 200
        assert time.perf_counter() - start < 1.5 and after_hangup < 120  # freed long before its 240 tokens
    finally:
        server.stop()


@pytest.mark.integration
def test_a_4000_token_prompt_is_answered_and_one_over_the_window_is_refused(smol_server):
    """SmolLM2's window is 8,192 tokens: a prompt of 4,000+ (real source code) is answered; one past the
    window gets a 400 that names the limit; a max_tokens past what is left names --max-len."""
    import inspect

    from collocate import decode, fast, step

    code = "\n".join(inspect.getsource(m) for m in (decode, fast, step))
    c = client(smol_server)
    r = c.completions.create(model="smollm2-135m", prompt=code[:16000], max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens > 4000 and r.usage.completion_tokens == 8, r.usage
    with pytest.raises(openai.BadRequestError, match="8192"):
        c.completions.create(model="smollm2-135m", prompt=code * 3, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="max-len"):
        c.completions.create(model="smollm2-135m", prompt=code[:16000], max_tokens=8000)
