"""GPU: the ways users drive saw-sglang besides raw /generate, on SmolLM2-135M-Instruct
(docs/frontends.md).

    SAW_FACES_OUT=/tmp/faces pytest -m gpu -q -rs -s tests/gpu/test_frontends_gpu.py

1. SGLang frontend programs (`sgl.function` on `RuntimeEndpoint`, greedy): multi-turn
   chat, fork / join, `sgl.select`, regex- and JSON-schema-constrained `sgl.gen`
   (xgrammar) and `run_batch`, each on our INT4 server and on a stock BF16 server.
   Every program completes and its constrained outputs parse; agreement with BF16 is
   reported (printed and in summary.json), not asserted.
2. The offline `saw_sglang.Engine(kv_cache_dtype="int4")`: batched generate, streaming
   (the same text as without), shutdown (its processes gone), a second Engine in the
   same process, a bad flag refused with a ValueError before anything is spawned, and
   the frontend programs on SGLang's in-process `sgl.Runtime` with the INT4 cache (the
   frontend language has no Engine backend).
3. The `openai` client on the INT4 server started with `--api-key`: models, chat and
   completions, streaming, n > 1 sampling, logprobs, stop strings, max_tokens, and a
   request without the key (or with a wrong one) refused.

The two servers start together for the module (python -m saw_sglang.launch_server
--kv-cache-dtype int4, python -m sglang.launch_server --kv-cache-dtype bf16; triton
backend, no CUDA graphs, capped pools: tests/gpu/frontends.py); logs and summary.json go
to $SAW_FACES_OUT (default: a pytest temporary folder). About 3 minutes on one H200.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frontends as F  # noqa: E402

pytestmark = pytest.mark.gpu
SUMMARY: dict = {}
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "What is 12 times 7?",
           "List three primary colors."]
GREEDY = {"temperature": 0, "max_new_tokens": 24}


def _children() -> set:
    """Live processes under this one (the module's servers included), but not
    multiprocessing's resource tracker, which the first spawned process starts for the
    life of this one."""
    import psutil

    live = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                live.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return live


def _wait_gone(before: set, timeout_s: float = 60.0) -> set:
    deadline = time.monotonic() + timeout_s
    while (left := _children() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = Path(os.environ.get("SAW_FACES_OUT") or tmp_path_factory.mktemp("faces"))
    d.mkdir(parents=True, exist_ok=True)
    yield d
    (d / "summary.json").write_text(json.dumps(SUMMARY, indent=2))
    rows = SUMMARY.get("frontend", {})
    print(f"\nfrontend programs, INT4 vs BF16 (greedy), identical outputs; summary: {d / 'summary.json'}")
    for name, r in rows.items():
        print(f"  {name:12s} {r['identical']}/{r['of']}")


@pytest.fixture(scope="module")
def model():
    if not os.path.isdir(F.MODEL):
        pytest.skip(f"no model at {F.MODEL}: dev/gpu/run_all.sh OUT --only models builds it")
    return F.MODEL


@pytest.fixture(scope="module")
def servers(out, model):
    from saw_sglang.bench.server import ManagedServer, reserve_port, wait_all_healthy

    srv = {}
    for kind in ("int4", "bf16"):
        port = reserve_port()
        key = F.API_KEY if kind == "int4" else None
        srv[kind] = ManagedServer(F.server_cmd(kind, F.MODEL, port, key), "127.0.0.1", port,
                                  str(out / f"server-{kind}.log"), start_timeout_s=300, name=kind)
    try:
        for s in srv.values():
            s.start()
        SUMMARY["server_start_s"] = {k: round(v, 1) for k, v in wait_all_healthy(srv).items()}
        yield srv
    finally:
        for s in srv.values():
            s.stop()


def test_int4_server_runs_int4_and_needs_its_key(servers):
    from saw_sglang.bench.server import http_json

    url = servers["int4"].url
    status, info = http_json(url + "/get_server_info", headers={"Authorization": f"Bearer {F.API_KEY}"})
    assert status == 200 and info["kv_cache_dtype"] == "int4" and "saw_int4" in info
    SUMMARY["int4_server"] = info["saw_int4"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, _ = http_json(url + "/v1/chat/completions", headers=headers, payload={
            "model": F.MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert status == 401, headers
    status, info = http_json(servers["bf16"].url + "/get_server_info")
    assert status == 200 and "saw_int4" not in info


# ---------------------------------------------------------------- 1. frontend programs
@pytest.fixture(scope="module")
def backends(servers):
    import sglang as sgl

    return {"int4": sgl.RuntimeEndpoint(servers["int4"].url, api_key=F.API_KEY,
                                        chat_template_name=F.CHAT_TEMPLATE),
            "bf16": sgl.RuntimeEndpoint(servers["bf16"].url, chat_template_name=F.CHAT_TEMPLATE)}


@pytest.mark.parametrize("name", list(F.PROGRAMS))
def test_frontend_program_int4_and_bf16(backends, name):
    outs = {kind: F.run_program(name, be) for kind, be in backends.items()}
    for kind, o in outs.items():
        assert F.check(name, o) == [], f"{kind}: {o}"
    same, total = F.agreement(outs["int4"], outs["bf16"])
    SUMMARY.setdefault("frontend", {})[name] = {"identical": same, "of": total, **outs}
    print(f"\n{name}: INT4 {outs['int4']}\n{' ' * len(name)}  BF16 {outs['bf16']}  ({same}/{total} identical)")


def test_frontend_run_batch(backends):
    outs = {kind: F.run_batch(be) for kind, be in backends.items()}
    for kind, batch in outs.items():
        assert len(batch) == len(F.BATCH) and all(F.check("multi_turn", o) == [] for o in batch), outs
    pairs = [F.agreement(a, b) for a, b in zip(outs["int4"], outs["bf16"])]
    SUMMARY.setdefault("frontend", {})["run_batch"] = {
        "identical": sum(p[0] for p in pairs), "of": sum(p[1] for p in pairs), **outs}


# ---------------------------------------------------------------- 3. OpenAI client
@pytest.fixture(scope="module")
def client(servers):
    import openai

    return openai.OpenAI(base_url=servers["int4"].url + "/v1", api_key=F.API_KEY, max_retries=0)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_openai_models_chat_and_completions(client):
    assert [m.id for m in client.models.list().data] == [F.MODEL]
    r = client.chat.completions.create(model=F.MODEL, messages=CHAT, temperature=0, max_tokens=16)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content.strip()
    assert c.finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 16
    r = client.completions.create(model=F.MODEL, prompt="The capital of France is", temperature=0,
                                  max_tokens=8)
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 8
    SUMMARY["openai_chat"] = c.message.content


def test_openai_streaming(client):
    full = client.chat.completions.create(model=F.MODEL, messages=CHAT, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model=F.MODEL, messages=CHAT, temperature=0,
                                                 max_tokens=24, stream=True))
    parts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sum(bool(p) for p in parts) > 1 and finish and "".join(parts).strip()
    # The second request reads its prompt back from the INT4 radix cache, the first
    # computed it: a lossy cache may answer differently (README, known behaviour).
    SUMMARY["openai_stream_same_as_plain"] = "".join(parts) == full.choices[0].message.content
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=F.MODEL, prompt="Once upon a time", temperature=0, max_tokens=16, stream=True)
        if c.choices)
    assert text.strip()


def test_openai_n_samples(client):
    r = client.chat.completions.create(model=F.MODEL, messages=CHAT, n=3, temperature=1.0,
                                       max_tokens=16, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content.strip() for c in r.choices)
    SUMMARY["openai_n3_distinct"] = len({c.message.content for c in r.choices})


def test_openai_logprobs(client):
    r = client.chat.completions.create(model=F.MODEL, messages=CHAT, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens
    for t in lps:
        assert math.isfinite(t.logprob) and t.logprob <= 1e-4 and len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert t.logprob == pytest.approx(tops[0], abs=1e-3)  # greedy: the chosen token is the top one
    r = client.completions.create(model=F.MODEL, prompt="The capital of France is", temperature=0,
                                  max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens
    assert all(math.isfinite(x) and len(top) == 2 for x, top in zip(lp.token_logprobs, lp.top_logprobs))


def test_openai_stop_and_max_tokens(client):
    r = client.completions.create(model=F.MODEL, prompt="Counting: 1, 2, 3, 4, 5, 6,", temperature=0,
                                  max_tokens=16, stop=[","])
    c = r.choices[0]
    assert c.finish_reason == "stop" and "," not in c.text and c.text.strip(), c
    r = client.completions.create(model=F.MODEL, prompt="Once upon a time", temperature=0,
                                  max_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = client.chat.completions.create(model=F.MODEL, messages=CHAT, temperature=0, max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_openai_wrong_key_refused(servers):
    import openai

    bad = openai.OpenAI(base_url=servers["int4"].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=F.MODEL, messages=CHAT, max_tokens=4)


# ---------------------------------------------------------------- 2. offline Engine
def test_engine_refuses_a_bad_flag_before_spawning(model):
    from saw_sglang import Engine

    before = _children()
    with pytest.raises(ValueError, match=r"group size 7 .*head_dim 64 \(e\.g\. 64 or 32\)"):
        Engine(model_path=F.MODEL, kv_cache_dtype="int4", saw_group_size=7, **F.ENGINE_KW)
    with pytest.raises(ValueError, match="fa3 attention backend"):
        Engine(model_path=F.MODEL, kv_cache_dtype="int4", **{**F.ENGINE_KW, "attention_backend": "fa3"})
    assert _children() == before


def test_engine_generate_stream_shutdown_and_a_second_engine(model):
    from saw_sglang import Engine

    before = _children()
    e1 = Engine(model_path=F.MODEL, kv_cache_dtype="int4", **F.ENGINE_KW)
    try:
        assert "saw_int4" in e1.get_server_info()
        batch = e1.generate(prompt=PROMPTS, sampling_params=GREEDY)
        # raw completions (no chat template): a greedy one may stop at once (an empty text)
        assert len(batch) == len(PROMPTS) and batch[0]["text"].strip()
        assert all(o["meta_info"]["finish_reason"]["type"] in ("stop", "length") for o in batch)
        e1.flush_cache()  # both requests below compute their prompt (no radix hit)
        ref = e1.generate(prompt=PROMPTS[0], sampling_params=GREEDY)["text"]
        e1.flush_cache()
        chunks = list(e1.generate(prompt=PROMPTS[0], sampling_params=GREEDY, stream=True))
        assert len(chunks) > 1 and F.stream_text(chunks) == ref
    finally:
        e1.shutdown()
    assert not _wait_gone(before), "the first Engine's processes outlived shutdown()"
    e2 = Engine(model_path=F.MODEL, kv_cache_dtype="int4", **F.ENGINE_KW)
    try:
        again = e2.generate(prompt=PROMPTS[0], sampling_params=GREEDY)["text"]
        assert again.strip()
        SUMMARY["engine"] = {"batch": [o["text"] for o in batch], "second_engine_same": again == ref}
    finally:
        e2.shutdown()
    assert not _wait_gone(before), "the second Engine's processes outlived shutdown()"


def test_frontend_programs_on_an_int4_sgl_runtime(model):
    import sglang as sgl
    from sglang.lang.chat_template import get_chat_template

    import saw_sglang.engine  # noqa: F401  (patches this process: ServerArgs takes int4)
    from saw_sglang.bench.server import release_port, reserve_port

    before = _children()
    # sgl.Runtime scans for a free port from `port` up to 40000 only, and takes the
    # first free one: the block is released just before it looks
    port = reserve_port(below=40000)
    release_port(port)
    rt = sgl.Runtime(model_path=F.MODEL, kv_cache_dtype="int4", port=port, **F.ENGINE_KW)
    try:
        be = rt.endpoint
        be.chat_template = get_chat_template(F.CHAT_TEMPLATE)
        server_outs = SUMMARY.get("frontend", {})
        same = total = 0
        for name in F.PROGRAMS:
            o = F.run_program(name, be)
            assert F.check(name, o) == [], f"{name}: {o}"
            if name in server_outs:
                s, t = F.agreement(o, server_outs[name]["int4"])
                same, total = same + s, total + t
        SUMMARY["runtime_vs_int4_server"] = {"identical": same, "of": total}
    finally:
        rt.shutdown()
    assert not _wait_gone(before), "sgl.Runtime's processes outlived shutdown()"
