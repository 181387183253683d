"""The server engine against a fake SGLang /generate endpoint on loopback (real HTTP)."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saw_sglang.eval import server


def fake_logprob(prefix_len: int, token: int) -> float:
    """The fake model: a deterministic log-probability for token at position prefix_len."""
    return -0.05 * ((token * 7 + prefix_len) % 13) - 0.01


def fake_top(prefix_len: int) -> int:
    return (prefix_len * 3) % 11


class FakeSGLang(BaseHTTPRequestHandler):
    requests_seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/generate" and body["return_logprob"]
        assert body["sampling_params"]["max_new_tokens"] == 1
        ids, s = body["input_ids"], body["logprob_start_len"]
        FakeSGLang.requests_seen.append((len(ids), s))
        # SGLang's shape: entries for tokens s.., the first None; [logprob, token id, text]
        lps = [[None, ids[s], None]] + [[fake_logprob(i, ids[i]), ids[i], None] for i in range(s + 1, len(ids))]
        meta = {"input_token_logprobs": lps}
        if body.get("top_logprobs_num"):
            meta["input_top_logprobs"] = [None] + [[[-0.1, fake_top(i), None]] for i in range(s + 1, len(ids))]
        out = json.dumps({"text": "x", "meta_info": meta}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):  # /get_server_info, shaped like ours (INT4) or stock (kv_cache_dtype)
        assert self.path == "/get_server_info"
        info = dict(FakeSGLang.server_info)
        out = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    server_info: dict = {"kv_cache_dtype": "auto"}

    def log_message(self, *a):
        pass


@pytest.fixture
def url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    FakeSGLang.requests_seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("step", [1, 5, 64])
def test_server_perplexity_from_logprobs(url, step):
    import random

    rng = random.Random(step)
    wins = [[rng.randrange(1000) for _ in range(n)] for n in (17, 30)]
    tally, tops = server.score(url, wins, step, concurrency=1)
    want = [fake_logprob(i, w[i]) for w in wins for i in range(1, len(w))]
    m = tally.metrics()
    assert m["tokens"] == len(want)
    assert m["ppl"] == pytest.approx(math.exp(-sum(want) / len(want)), rel=1e-12)
    assert tops == [[fake_top(i) for i in range(1, len(w))] for w in wins]
    # every request extends the previous by `step` tokens and asks only for the new ones
    expected = []
    for w in wins:
        for done in range(1, len(w), step):
            expected.append((min(len(w), done + step), done - 1))
    assert FakeSGLang.requests_seen == expected
    # windows scored concurrently: same figures, same requests (interleaved across windows)
    FakeSGLang.requests_seen = []
    tally2, tops2 = server.score(url, wins, step, concurrency=2)
    assert tally2.metrics()["ppl"] == m["ppl"] and tally2.metrics()["tokens"] == m["tokens"] and tops2 == tops
    assert sorted(FakeSGLang.requests_seen) == sorted(expected)


@pytest.mark.parametrize("info, want", [
    ({"kv_cache_dtype": "auto"}, 1.0),
    ({"kv_cache_dtype": "fp8_e4m3"}, 2.0),
    ({"kv_cache_dtype": "int4", "saw_int4": {"bytes_per_token": 19584, "bf16_bytes_per_token": 73728}},
     73728 / 19584),
    ({"kv_cache_dtype": "int4", "internal_states": [{"saw_int4": {"bytes_per_token": 36,
                                                                  "bf16_bytes_per_token": 128}}]}, 128 / 36),
    ({"kv_cache_dtype": "something_new"}, None),
])
def test_kv_compression_from_server_info(url, info, want):
    FakeSGLang.server_info = info
    try:
        got = server.kv_compression(url)
    finally:
        FakeSGLang.server_info = {"kv_cache_dtype": "auto"}
    assert got == (pytest.approx(want) if want else None)
    assert server.kv_compression("http://127.0.0.1:9") is None  # nothing listening: unknown


def test_server_top1_agreement(url):
    wins = [list(range(40, 60))]
    ref = [[fake_top(i) if i % 4 else -1 for i in range(1, 20)]]  # 4, 8, 12, 16 differ
    tally, _ = server.score(url, wins, 19, ref_tops=ref)
    assert tally.metrics()["top1_agree"] == pytest.approx(15 / 19)
    assert math.isnan(tally.metrics()["kl"])


def test_cli_scores_servers_concurrently_against_the_bf16_one(url, tmp_path):
    """`--server` end to end: every server scored (at once), the bf16-labelled one first
    and the top-1 reference; the fake answers alike, so agreement is 1."""
    import json

    import torch

    from saw_sglang.eval.__main__ import main
    from test_eval_cli import _tiny_model_dir

    words = _tiny_model_dir(tmp_path / "m")
    g = torch.Generator().manual_seed(2)
    (tmp_path / "t.txt").write_text(" ".join(words[i] for i in torch.randint(0, len(words), (200,), generator=g).tolist()))
    rc = main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--tokens", "60",
               "--ctx", "20", "--no-sim", "--server-step", "7", "--server", f"int4={url}",
               "--server", f"bf16={url}", "--out", str(tmp_path / "o")])
    assert rc == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert [r["label"] for r in rows] == ["bf16", "int4"]
    assert all(r["tokens"] == 60 and r["top1_agree"] == 1 for r in rows)
    assert rows[1]["dppl"] == 0  # same answers as the reference


def test_simulation_kept_when_the_server_phase_fails(tmp_path):
    import json

    import requests
    import torch

    from saw_sglang.bench.server import reserve_port
    from saw_sglang.eval.__main__ import main
    from test_eval_cli import _tiny_model_dir

    words = _tiny_model_dir(tmp_path / "m")
    g = torch.Generator().manual_seed(3)
    (tmp_path / "t.txt").write_text(" ".join(words[i] for i in torch.randint(0, len(words), (200,), generator=g).tolist()))
    dead = f"http://127.0.0.1:{reserve_port()}"  # nothing listens there
    with pytest.raises(requests.ConnectionError):
        main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--tokens", "40",
              "--ctx", "20", "--modes", "bf16,int4", "--server", f"int4={dead}", "--out", str(tmp_path / "o")])
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    naive = "int4:rotation=none:scale-fit=minmax"  # always scored: the far end of the gap
    assert res["meta"]["partial"] and [r["spec"] for r in res["results"]] == ["bf16", naive, "int4"]
    assert res["results"][0]["dppl"] == 0
