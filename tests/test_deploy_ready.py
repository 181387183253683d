"""The readiness check (saw_sglang.deploy.ready) against a stand-in server: not ready
until /health answers 200; then a warm-up of real /generate calls (a prompt, a radix
hit on it, a batch of eight) once per server start; one line saying why not."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saw_sglang.deploy import entrypoint as ep
from saw_sglang.deploy import ready


class FakeServer:
    """SGLang's /health, /model_info, /server_info and /generate (input_ids, single or
    batched), with a radix cache: cached_tokens is the longest prefix seen before."""

    def __init__(self, health=200, generate=200, is_generation=True, max_input=40960,
                 api_key=None, generate_delay=0.0):
        self.health, self.generate, self.is_generation = health, generate, is_generation
        self.max_input, self.api_key, self.generate_delay = max_input, api_key, generate_delay
        self.calls, self.seen = [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def answer(self, status, body):
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the check gave up waiting (the timeout test)

            def handle_any(self, body):
                fake.calls.append((self.path, self.headers.get("Authorization"), body))
                authorized = fake.api_key is None or \
                    self.headers.get("Authorization") == f"Bearer {fake.api_key}"
                if self.path == "/health":
                    return self.answer(fake.health, {})
                if not authorized:
                    return self.answer(401, {"error": "Unauthorized"})
                if self.path == "/model_info":
                    return self.answer(200, {"is_generation": fake.is_generation})
                if self.path == "/server_info":
                    return self.answer(200, {"max_req_input_len": fake.max_input})
                if self.path == "/generate":
                    time.sleep(fake.generate_delay)
                    if fake.generate != 200:
                        return self.answer(fake.generate, {"error": "boom"})
                    ids = body["input_ids"]
                    batch = ids if isinstance(ids[0], list) else [ids]
                    outs = [fake.run(p, body["sampling_params"]) for p in batch]
                    return self.answer(200, outs if isinstance(ids[0], list) else outs[0])
                return self.answer(404, {})

            def do_GET(self):
                self.handle_any(None)

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                self.handle_any(json.loads(self.rfile.read(n)))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def run(self, prompt, params):
        assert len(prompt) <= self.max_input
        cached = max((_common(prompt, s) for s in self.seen), default=0)
        self.seen.append(prompt)
        return {"text": "x", "meta_info": {"prompt_tokens": len(prompt), "cached_tokens": cached,
                                           "completion_tokens": params["max_new_tokens"]}}

    def generates(self):
        return [body for path, _, body in self.calls if path == "/generate"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture
def server():
    servers = []

    def make(**kw):
        servers.append(FakeServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv(ep.STATE_DIR_ENV, str(tmp_path))
    return tmp_path


def run(capsys, *argv):
    rc = ready.main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return rc, out[0]


def test_no_server_is_not_ready(capsys, state):
    rc, line = run(capsys, "--url", "http://127.0.0.1:9")
    assert rc == 1 and line.startswith("not ready: ") and "refused" in line


def test_starting_server_is_not_ready_and_gets_no_requests(capsys, server, state):
    srv = server(health=503)
    rc, line = run(capsys, "--url", srv.url)
    assert rc == 1 and "503" in line
    assert [c[0] for c in srv.calls] == ["/health"]


def test_warm_up_covers_plain_prefill_a_radix_hit_and_a_batch(capsys, server, state):
    srv = server()
    rc, line = run(capsys, "--url", srv.url)
    assert rc == 0, line
    first, hit, batch = srv.generates()
    prompt = first["input_ids"]
    assert len(prompt) == ready.PROMPT_TOKENS
    assert hit["input_ids"][: len(prompt)] == prompt and len(hit["input_ids"]) > len(prompt)
    prompts = batch["input_ids"]
    assert len(prompts) == ready.BATCH
    assert len({len(p) for p in prompts}) == ready.BATCH, "different lengths in one batch"
    shared = [_common(p, prompt) for p in prompts]
    assert len(set(shared)) == ready.BATCH and max(shared) > 0, "cached prefixes of several lengths"
    for body in (first, hit, batch):
        sp = body["sampling_params"]
        assert sp["temperature"] == 0 and sp["ignore_eos"] and sp["max_new_tokens"] >= 8
    # The summary counts what the server reported, radix hits included.
    cached = sum(_common(p, prompt) for p in prompts) + len(prompt)
    assert f"{cached} of them from the radix cache" in line


def test_prompts_fit_the_servers_longest_input(capsys, server, state):
    srv = server(max_input=300)
    assert run(capsys, "--url", srv.url)[0] == 0
    assert max(len(p) for b in srv.generates() for p in
               (b["input_ids"] if isinstance(b["input_ids"][0], list) else [b["input_ids"]])) <= 300 - 64
    tiny = server(max_input=100)
    rc, line = run(capsys, "--url", tiny.url)
    assert rc == 1 and "at most 100 input tokens" in line and not tiny.generates()


def test_with_url_every_call_warms_up(capsys, server, state):
    srv = server()
    for _ in range(2):
        assert run(capsys, "--url", srv.url)[0] == 0
    assert len(srv.generates()) == 6


def test_after_the_entry_point_it_warms_up_once_per_server_start(capsys, server, state):
    srv = server(api_key="s3cret")
    port = srv.url.rsplit(":", 1)[1]
    ep.write_state(["--host", "0.0.0.0", "--port", port, "--api-key", "s3cret"], str(state))
    assert run(capsys)[0] == 0
    rc, line = run(capsys)
    assert rc == 0 and "earlier" in line
    assert len(srv.generates()) == 3
    assert {auth for _, auth, _ in srv.calls} == {"Bearer s3cret"}
    ep.write_state(["--host", "0.0.0.0", "--port", port, "--api-key", "s3cret"], str(state))
    assert run(capsys)[0] == 0, "a new start warms up again"
    assert len(srv.generates()) == 6


def test_failed_warm_up_is_not_ready_and_is_tried_again(capsys, server, state):
    srv = server(generate=500)
    port = srv.url.rsplit(":", 1)[1]
    ep.write_state(["--port", port], str(state))
    rc, line = run(capsys)
    assert rc == 1 and "/generate answered 500" in line
    assert not (state / "warm").exists()
    srv.generate = 200
    assert run(capsys)[0] == 0 and (state / "warm").exists()


def test_wrong_api_key_is_not_ready(capsys, server, state):
    srv = server(api_key="right")
    rc, line = run(capsys, "--url", srv.url, "--api-key", "wrong")
    assert rc == 1 and "401" in line


def test_no_warmup_only_checks_health(capsys, server, state):
    srv = server()
    assert run(capsys, "--url", srv.url, "--no-warmup")[0] == 0
    assert [c[0] for c in srv.calls] == ["/health"]


def test_embedding_model_needs_no_warm_up(capsys, server, state):
    srv = server(is_generation=False)
    rc, line = run(capsys, "--url", srv.url)
    assert rc == 0 and not srv.generates() and "no warm-up" in line


def test_a_warm_up_that_hangs_fails_within_the_timeout(capsys, server, state):
    srv = server(generate_delay=3.0)
    t0 = time.monotonic()
    rc, line = run(capsys, "--url", srv.url, "--timeout", "1")
    assert rc == 1 and "timed out" in line
    assert time.monotonic() - t0 < 2.5
