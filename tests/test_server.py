"""`moe-offload serve`: the real server (uvicorn on a free localhost port, in a thread) with the shipped model on
the CPU, talked to with the official `openai` client and with raw HTTP (httpx).

What a lone greedy request should answer is computed here without the server (the pipeline's own generate, the
tokenizer's own chat template path); every server answer is compared with it, alone, streamed, or among 8
concurrent clients. The model is loaded once for the module; servers with other options (API key, a queue of 1)
share it, one at a time.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from cdp_pipe import Chromium, chat_once, find_chromium  # noqa: E402

from moe_offload import LLMPipeline  # noqa: E402
from moe_offload.cli import main  # noqa: E402
from moe_offload.server.command import make_server  # noqa: E402
from moe_offload.server.textstream import TextStream  # noqa: E402

MODEL = "small-moe"
USER = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def pipe():
    pipe = LLMPipeline(None, "cpu")
    yield pipe
    pipe.close()


@contextlib.contextmanager
def running(pipe, **options):
    """A real server on 127.0.0.1:<free port> in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server, service = make_server(pipe, log_level="warning", **options)
    running.server = server  # the one running now, for a test that stops it
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        service.worker.close()
        sock.close()


@pytest.fixture(scope="module")
def url(pipe):
    with running(pipe) as base:
        yield base


def client(base: str, key: str = "none"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def lone_chat(pipe, messages, n: int) -> str:
    """The greedy answer to `messages` without the server: the tokenizer's own templating and tokenizing."""
    ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    return pipe.tokenizer.decode(pipe.generate_tokens(ids, max_new_tokens=n, do_sample=False),
                                 skip_special_tokens=True)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_models_health_and_the_page(url):
    assert [m.id for m in client(url).models.list()] == [MODEL]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "text/html" in page.headers[
        "content-type"]


def test_chat_with_the_openai_client_streamed_and_not(pipe, url):
    expected = lone_chat(pipe, USER, 8)
    whole = client(url).chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "length"
    prompt_tokens = len(pipe.tokenizer.apply_chat_template(USER, add_generation_prompt=True,
                                                           return_dict=True)["input_ids"])
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 8)
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=8,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.total_tokens == prompt_tokens + 8


def test_completions_match_the_pipeline(pipe, url):
    prompt = "import os\n"
    expected = pipe.generate(prompt, max_new_tokens=8)
    whole = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert whole.choices[0].text == expected
    streamed = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    ids = pipe.tokenizer(prompt)["input_ids"]
    assert client(url).completions.create(model=MODEL, prompt=ids, max_tokens=8).choices[0].text == expected


def test_sampling_with_a_seed_repeats(url):
    def sample(seed: int) -> str:
        return client(url).completions.create(model=MODEL, prompt="def", max_tokens=8, temperature=1.5, top_p=0.95,
                                              seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1  # it does sample: three seeds, not one answer


def test_a_stop_string_ends_the_text_before_it(pipe, url):
    full = lone_chat(pipe, USER, 12)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    whole = client(url).chat.completions.create(model=MODEL, messages=USER, max_tokens=12, stop=[stop, "\x00"])
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 12
    deltas = [c.choices[0].delta.content or "" for c in client(url).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=12, stop=stop, stream=True)]
    assert "".join(deltas) == expected


def test_text_stream_holds_back_split_characters_and_stop_prefixes():
    pieces = {1: "ab", 2: "c", 3: "\ufffd", 4: "é", 5: "XY", 6: "Zq"}

    def decode(ids):  # 3 then 4: a character split over two tokens (3 alone decodes to U+FFFD)
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")

    stream = TextStream(decode, stop=["XYZ"])
    assert [stream.push([i]) for i in (1, 2, 3, 4, 5)] == ["ab", "c", "", "é", ""]  # "XY" may start "XYZ"
    assert stream.push([6]) == "" and stream.stopped and stream.text() == "abcé"
    unstopped = TextStream(decode, stop=["XYW"])
    assert [unstopped.push([i]) for i in (1, 5, 6)] == ["ab", "", "XYZq"] and unstopped.finish() == ""
    held = TextStream(decode, stop=["XYW"])
    assert held.push([5]) == "" and held.finish() == "XY"


def test_text_stream_token_by_token_is_the_whole_decode(pipe):
    """Multi-byte characters split over byte-level tokens, through the shipped tokenizer."""
    tokenizer = pipe.tokenizer
    ids = tokenizer("naïve café — 東京 🙂 def f(x):\n    return x")["input_ids"]
    whole = tokenizer.decode(ids, skip_special_tokens=True)

    def stream_out(stop=()):
        stream = TextStream(lambda window: tokenizer.decode(window, skip_special_tokens=True), stop)
        pieces = [stream.push([i]) for i in ids] + [stream.finish()]
        assert "\ufffd" not in "".join(pieces)
        return "".join(pieces)

    assert stream_out() == whole
    assert stream_out(["東京", "🙂"]) == whole[:whole.index("東京")]


BAD_BODIES = [  # (body, status, param)
    (b'{"messages": [', 400, None),
    (b'[1, 2]', 400, None),
    (json.dumps({"messages": USER, "max_tokens": "5"}), 400, "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": 2.5}), 400, "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"messages": "hi"}), 400, "messages"),
    (json.dumps({"messages": []}), 400, "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages.0.role"),
    (json.dumps({"messages": USER, "temperature": "hot"}), 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    (json.dumps({"messages": USER, "temperature": 3}), 400, "temperature"),
    (json.dumps({"messages": USER, "top_p": 0}), 400, "top_p"),
    (json.dumps({"messages": USER, "seed": -1}), 400, "seed"),
    (json.dumps({"messages": USER, "seed": 2**70}), 400, "seed"),
    (json.dumps({"messages": USER, "n": 2}), 400, "n"),
    (json.dumps({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
    (json.dumps({"messages": USER, "stop": [""]}), 400, "stop"),
    (json.dumps({"messages": USER, "tools": []}), 400, "tools"),
    (json.dumps({"messages": USER, "presence_penalty": 1}), 400, "presence_penalty"),
    (json.dumps({"messages": USER, "model": "gpt-4"}), 404, "model"),
    (json.dumps({"messages": USER, "max_tokens": 5000}), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x " * 3000}]}), 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD_BODIES)
def test_bad_chat_bodies_are_openai_errors(url, body, status, param):
    answer = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "\n" not in error["message"] and "Traceback" not in error["message"]


def test_bad_completion_bodies_and_routes(url):
    for body, param in (({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 99999]}, "prompt"),
                        ({"prompt": "x", "echo": True}, "echo"), ({}, "prompt")):
        answer = httpx.post(f"{url}/v1/completions", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    assert httpx.get(f"{url}/v1/chat/completions").json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="other", messages=USER, max_tokens=2)


def test_eight_concurrent_clients_get_what_a_lone_request_gets(pipe, url):
    conversations = [[{"role": "user", "content": f"def f{i}(x):"}] for i in range(8)]
    expected = [lone_chat(pipe, messages, 6) for messages in conversations]
    answers: list[str | None] = [None] * 8

    def ask(i: int) -> None:
        kwargs = dict(model=MODEL, messages=conversations[i], max_tokens=6, temperature=0)
        if i % 2:
            answers[i] = "".join(c.choices[0].delta.content or "" for c in client(url).chat.completions.create(
                **kwargs, stream=True))
        else:
            answers[i] = client(url).chat.completions.create(**kwargs).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == expected


def wait_idle(base: str) -> str:
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(f"{base}/metrics").text
        if metric(text, "moe_offload_requests_running") == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_a_disconnect_mid_stream_stops_its_generation(pipe, url):
    before = metric(wait_idle(url), "moe_offload_completion_tokens_total")
    body = {"model": MODEL, "messages": USER, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
        lines = answer.iter_lines()
        assert next(lines).startswith("data: ") and next(lines) == ""  # generating now
    # leaving the block closes the connection mid-stream
    text = wait_idle(url)
    assert metric(text, "moe_offload_requests_running") == 0
    assert 'moe_offload_requests_total{endpoint="chat",outcome="cancelled"} 1' in text
    assert metric(text, "moe_offload_completion_tokens_total") - before < 1500
    answer = client(url).chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0)
    assert answer.choices[0].message.content == lone_chat(pipe, USER, 6)


def test_metrics_are_prometheus_text_with_offload_counters_per_tier(url):
    client(url).completions.create(model=MODEL, prompt="class A:", max_tokens=3)
    answer = httpx.get(f"{url}/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = answer.text
    for name in ("requests_total", "prompt_tokens_total", "decode_tokens_per_second", "expert_hits_total",
                 "time_to_first_token_seconds", "experts_resident", "experts_computed_on_cpu_total"):
        assert f"# TYPE moe_offload_{name} " in text, name
    assert 'moe_offload_experts_streamed_total{tier="host"} ' in text
    assert 'moe_offload_bytes_streamed_total{tier="disk"} ' in text
    assert metric(text, "moe_offload_completion_tokens_total") >= 3
    assert metric(text, "moe_offload_time_to_first_token_seconds_count") >= 1
    assert metric(text, "moe_offload_experts_resident") == metric(text, "moe_offload_experts_total") == 96
    assert metric(text, "moe_offload_expert_hits_total") > 0


def test_an_api_key_is_demanded(pipe):
    with running(pipe, api_key="sekrit") as base:
        with pytest.raises(openai.AuthenticationError):
            client(base).models.list()
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert client(base, "sekrit").completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200  # liveness stays open


def test_a_full_queue_answers_429(pipe):
    with running(pipe, queue_size=1) as base:
        slow = {"model": MODEL, "prompt": "def", "max_tokens": 1500, "stream": True}
        waiting: list = []
        with httpx.stream("POST", f"{base}/v1/completions", json=slow) as answer:
            lines = answer.iter_lines()  # kept: dropping the iterator would close the connection
            assert next(lines).startswith("data: ")  # the slow one is generating
            queued = threading.Thread(target=lambda: waiting.append(client(base).completions.create(
                model=MODEL, prompt="import os\n", max_tokens=4, temperature=0)))
            queued.start()
            deadline = time.monotonic() + 10
            while httpx.get(f"{base}/health").json()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError):
                client(base).completions.create(model=MODEL, prompt="x", max_tokens=1)
        queued.join(30)  # the slow stream is closed: its generation stops and the waiting one runs
        assert waiting[0].choices[0].text == pipe.generate("import os\n", max_new_tokens=4)


def test_stopping_the_server_ends_a_running_stream_at_once(pipe):
    with running(pipe) as base:
        body = {"model": MODEL, "prompt": "def", "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body) as answer:
            lines = answer.iter_lines()
            assert next(lines).startswith("data: ")
            started = time.monotonic()
            running.server.handle_exit(signal.SIGINT, None)  # what Ctrl-C calls
            events = [line for line in lines if line]
        assert time.monotonic() - started < 5  # not uvicorn's graceful wait for the stream to end by itself
        assert json.loads(events[-2].removeprefix("data: "))["error"]["message"] == "the server is shutting down"
        assert events[-1] == "data: [DONE]"


def test_a_client_gone_while_queued_is_skipped(pipe):
    with running(pipe, queue_size=2) as base:
        port = int(base.rsplit(":", 1)[1])
        slow = {"model": MODEL, "prompt": "def", "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=slow) as answer:
            lines = answer.iter_lines()
            assert next(lines).startswith("data: ")
            body = json.dumps({"prompt": "x", "max_tokens": 1000}).encode()
            with socket.create_connection(("127.0.0.1", port)) as raw:  # waits behind the slow one, then leaves
                raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                deadline = time.monotonic() + 10
                while httpx.get(f"{base}/health").json()["queued"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            deadline = time.monotonic() + 10
            while 'outcome="cancelled"} 1' not in httpx.get(f"{base}/metrics").text:
                assert time.monotonic() < deadline, "the disconnect of a waiting client went unseen"
                time.sleep(0.02)
        text = wait_idle(base)
        assert 'moe_offload_requests_total{endpoint="completions",outcome="cancelled"} 2' in text
        assert metric(text, "moe_offload_prompt_tokens_total") == 1  # only the slow one ran ("def": one token)


@pytest.mark.parametrize("argv,message", [
    (["serve", "--port", "70000"], "not a port number"),
    (["serve", "--queue-size", "0"], "--queue-size"),
    (["serve", "--host", "no.such.host.invalid"], "cannot listen"),
])
def test_serve_flags_fail_in_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_busy_port_fails_in_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_the_chat_page_in_a_headless_browser(pipe, url):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium installed (apt-get install chromium) to drive the chat page")
    browser = Chromium(binary)
    try:
        answer = chat_once(browser, f"{url}/", "def add(a, b):", max_tokens=10)
    finally:
        browser.close()
    assert answer == lone_chat(pipe, USER, 10)
