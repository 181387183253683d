"""The pieces of tests/gpu/test_frontends_gpu.py that need no GPU: server commands,
the SGLang frontend programs, the checks of their outputs and the agreement report.
CPU-tested by tests/test_frontends.py (the programs through SGLang's interpreter on a
fake backend, the constraints through xgrammar)."""

from __future__ import annotations

import json
import os
import re
import sys

import sglang as sgl

MODEL = os.environ.get("SAW_TEST_MODEL", "/tmp/models/smollm2-135m-instruct")
API_KEY = "saw-test-key"
CHAT_TEMPLATE = "chatml"  # SmolLM2-Instruct's template, for the frontend's role markers

# Fast and still real: no CUDA graphs (a start of well under a minute), a capped pool
# so that several servers and engines share the GPU, the bundle's grammar backend,
# compact JSON (bounded length under the schema below).
COMMON = ["--attention-backend", "triton", "--disable-cuda-graph", "--mem-fraction-static", "0.85",
          "--max-total-tokens", "20000", "--grammar-backend", "xgrammar",
          "--constrained-json-disable-any-whitespace", "--log-level", "info"]
ENGINE_KW = dict(attention_backend="triton", disable_cuda_graph=True, mem_fraction_static=0.85,
                 max_total_tokens=20000, grammar_backend="xgrammar",
                 constrained_json_disable_any_whitespace=True)


def server_cmd(kind: str, model: str, port: int, api_key: str | None = None) -> list[str]:
    """`int4`: python -m saw_sglang.launch_server --kv-cache-dtype int4; `bf16`: stock SGLang."""
    if kind == "int4":
        cmd = [sys.executable, "-m", "saw_sglang.launch_server", "--kv-cache-dtype", "int4"]
    elif kind == "bf16":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--kv-cache-dtype", "bf16"]
    else:
        raise ValueError(f"server kind {kind!r}: int4 or bf16")
    cmd += ["--model-path", model, "--host", "127.0.0.1", "--port", str(port), *COMMON]
    return cmd + (["--api-key", api_key] if api_key else [])


# ---------------------------------------------------------------- programs
NUMBER_RE = r"[0-9]{1,4}"
DATE_RE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        "capital": {"type": "boolean"},
    },
    "required": ["name", "country", "population", "capital"],
    "additionalProperties": False,
}
CHOICES = ["Paris", "London", "Berlin", "Madrid"]


@sgl.function
def multi_turn(s, q1, q2):
    s += sgl.system("You are a helpful assistant. Answer in one short sentence.")
    s += sgl.user(q1)
    s += sgl.assistant(sgl.gen("a1", max_tokens=32))
    s += sgl.user(q2)
    s += sgl.assistant(sgl.gen("a2", max_tokens=32))


@sgl.function
def fork_join(s, topic):
    s += sgl.user(f"Give two short facts about {topic}.")
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += sgl.assistant(f"Fact {i + 1}:" + sgl.gen("fact", max_tokens=24))
    forks.join()
    s += sgl.user("Fact 1:" + forks[0]["fact"] + "\nFact 2:" + forks[1]["fact"] +
                  "\nSum both facts up in one sentence.")
    s += sgl.assistant(sgl.gen("summary", max_tokens=32))


@sgl.function
def choose(s):
    s += sgl.user("What is the capital of France?")
    s += sgl.assistant(sgl.select("city", choices=CHOICES))


@sgl.function
def regex_constrained(s):
    s += sgl.user("What is 12 times 7? Answer with the number only.")
    s += sgl.assistant(sgl.gen("number", max_tokens=8, regex=NUMBER_RE))
    s += sgl.user("On which date did the first person land on the Moon? Answer as YYYY-MM-DD.")
    s += sgl.assistant(sgl.gen("date", max_tokens=16, regex=DATE_RE))


@sgl.function
def json_constrained(s):
    # the shape spelled out: a 135M model otherwise wanders (a string cut by the
    # chat template's stop text was seen on the H100)
    s += sgl.user('Describe Paris as JSON, like {"name": "Rome", "country": "Italy", '
                  '"population": 2800000, "capital": true}.')
    s += sgl.assistant(sgl.gen("city", max_tokens=128, json_schema=json.dumps(CITY_SCHEMA)))


# name -> (program, arguments, captured variables)
PROGRAMS = {
    "multi_turn": (multi_turn, dict(q1="What is the capital of France?", q2="And of Italy?"), ("a1", "a2")),
    "fork_join": (fork_join, dict(topic="the Moon"), ("fact", "summary")),  # fact: one per fork
    "select": (choose, {}, ("city",)),
    "regex": (regex_constrained, {}, ("number", "date")),
    "json": (json_constrained, {}, ("city",)),
}
BATCH = [dict(q1="Name a primary color.", q2="Name another one."),
         dict(q1="What is 2 + 2?", q2="And 3 + 3?")]


def run_program(name: str, backend) -> dict:
    """Run one program greedily: {variable: text, or the list of the forks' texts}."""
    program, kwargs, names = PROGRAMS[name]
    state = program.run(**kwargs, backend=backend, temperature=0)
    state.sync()
    if state.error():  # a failed request: raise it, not a KeyError for its variable
        raise state.error()
    return {k: state[k] for k in names}


def run_batch(backend) -> list[dict]:
    states = multi_turn.run_batch(BATCH, backend=backend, temperature=0)
    for st in states:
        st.sync()
        if st.error():
            raise st.error()
    return [{"a1": st["a1"], "a2": st["a2"]} for st in states]


def check(name: str, out: dict) -> list[str]:
    """What is wrong with one program's outputs ([] when nothing): everything completed,
    constrained outputs parse and obey their constraints."""
    bad = [f"{k} is empty" for k, v in out.items() if isinstance(v, str) and not v.strip()]
    if name == "fork_join" and (len(out["fact"]) != 2 or not all(f.strip() for f in out["fact"])):
        bad.append(f"the two forks did not both answer: {out['fact']}")
    if name == "select" and out["city"] not in CHOICES:
        bad.append(f"select returned {out['city']!r}, not one of {CHOICES}")
    if name == "regex":
        for k, rx in (("number", NUMBER_RE), ("date", DATE_RE)):
            if not re.fullmatch(rx, out[k]):
                bad.append(f"{k} {out[k]!r} does not match {rx}")
    if name == "json":
        bad += json_problems(out["city"])
    return bad


def json_problems(text: str) -> list[str]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        return [f"not JSON ({e}): {text!r}"]
    if not isinstance(obj, dict) or set(obj) != set(CITY_SCHEMA["required"]):
        return [f"keys {sorted(obj) if isinstance(obj, dict) else type(obj).__name__} are not "
                f"{sorted(CITY_SCHEMA['required'])}"]
    bad = []
    for key, rule in CITY_SCHEMA["properties"].items():
        v = obj[key]
        want = {"string": str, "integer": int, "boolean": bool}[rule["type"]]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            bad.append(f"{key}={v!r} is not a {rule['type']}")
        elif want is str and len(v) > rule["maxLength"]:
            bad.append(f"{key}={v!r} is longer than {rule['maxLength']}")
        elif want is int and not rule["minimum"] <= v <= rule["maximum"]:
            bad.append(f"{key}={v!r} is out of range")
    return bad


def agreement(a: dict, b: dict) -> tuple[int, int]:
    """(identical, compared) over the captured outputs of one program (lists item by item)."""
    same = total = 0
    for k in a:
        x, y = a[k], b.get(k)
        pairs = list(zip(x, y)) if isinstance(x, list) and isinstance(y, list) else [(x, y)]
        same += sum(p == q for p, q in pairs)
        total += len(pairs)
    return same, total


def stream_text(chunks: list[dict]) -> str:
    """The text of a streamed Engine.generate: SGLang streams the text so far in each
    chunk (incremental_streaming_output off); raises if a chunk does not extend it."""
    text = ""
    for c in chunks:
        if not c["text"].startswith(text):
            raise AssertionError(f"chunk {c['text']!r} does not extend {text!r}")
        text = c["text"]
    return text
