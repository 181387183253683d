"""CPU side of the GPU frontend tests (tests/gpu/frontends.py): the programs run through
SGLang's own frontend interpreter on a fake backend, the output checks, the grammar
constraints compiled by xgrammar (the bundle's grammar backend), and the server
commands parsed by SGLang's own argument parser."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
import frontends as F  # noqa: E402
from sglang.lang.backend.base_backend import BaseBackend  # noqa: E402
from sglang.lang.chat_template import get_chat_template  # noqa: E402
from sglang.lang.choices import ChoicesDecision  # noqa: E402

CITY = {"name": "Paris", "country": "France", "population": 2100000, "capital": True}


class FakeBackend(BaseBackend):
    """Answers like a well-behaved model and records every request."""

    def __init__(self, answers=None):
        super().__init__()
        self.chat_template = get_chat_template(F.CHAT_TEMPLATE)
        self.calls, self.n = [], 0
        self.answers = answers or {F.NUMBER_RE: "84", F.DATE_RE: "1969-07-20"}

    def generate(self, s, sampling_params):
        self.calls.append((s.text_, sampling_params))
        self.n += 1
        if sampling_params.regex:
            return self.answers[sampling_params.regex], {}
        if sampling_params.json_schema:
            return self.answers.get("json", json.dumps(CITY)), {}
        return f"answer {self.n}.", {}

    def select(self, s, choices, temperature, choices_method=None):
        self.calls.append((s.text_, choices))
        return ChoicesDecision(decision=choices[0])


@pytest.mark.parametrize("name", list(F.PROGRAMS))
def test_programs_run_through_sglangs_interpreter(name):
    be = FakeBackend()
    out = F.run_program(name, be)
    assert F.check(name, out) == []
    assert set(out) == set(F.PROGRAMS[name][2])
    gens = [p for _, p in be.calls if not isinstance(p, list)]
    assert all(p.temperature == 0 for p in gens)  # greedy
    prompts = [t for t, _ in be.calls]
    assert all("<|im_start|>user\n" in t for t in prompts)  # chatml role markers
    if name == "multi_turn":
        assert out == {"a1": "answer 1.", "a2": "answer 2."}
        assert "answer 1." in prompts[1] and "And of Italy?" in prompts[1]
    if name == "fork_join":
        assert sorted(out["fact"]) == ["answer 1.", "answer 2."] and out["summary"] == "answer 3."
        assert sorted(t[-7:] for t in prompts[:2]) == ["Fact 1:", "Fact 2:"]
        assert all(p.max_new_tokens == 24 for p in gens[:2])
        assert "answer 1." in prompts[2] and "answer 2." in prompts[2]
    if name == "select":
        assert be.calls[0][1] == F.CHOICES and out["city"] == F.CHOICES[0]
    if name == "regex":
        assert [p.regex for p in gens] == [F.NUMBER_RE, F.DATE_RE]
    if name == "json":
        assert json.loads(gens[0].json_schema) == F.CITY_SCHEMA


class FailingBackend(FakeBackend):
    def generate(self, s, sampling_params):
        raise ConnectionError("server gone")


@pytest.mark.parametrize("run", [lambda be: F.run_program("multi_turn", be), F.run_batch])
def test_a_failed_request_is_raised(run):
    with pytest.warns(UserWarning), pytest.raises(ConnectionError, match="server gone"):
        run(FailingBackend())


def test_run_batch_keeps_each_conversation():
    out = F.run_batch(FakeBackend())
    assert len(out) == len(F.BATCH) and all(o["a1"] and o["a2"] for o in out)


@pytest.mark.parametrize("name,answers,problem", [
    ("regex", {F.NUMBER_RE: "eighty-four", F.DATE_RE: "1969-07-20"}, "does not match"),
    ("regex", {F.NUMBER_RE: "84", F.DATE_RE: "1969-13-20"}, "date '1969-13-20'"),
    ("json", {"json": json.dumps(CITY)[:-9]}, "not JSON"),
    ("json", {"json": json.dumps({**CITY, "population": "many"})}, "population='many' is not a integer"),
    ("json", {"json": json.dumps({**CITY, "capital": 1})}, "capital=1 is not a boolean"),
    ("json", {"json": json.dumps({**CITY, "population": True})}, "is not a integer"),
    ("json", {"json": json.dumps({"name": "Paris"})}, "keys ['name'] are not"),
])
def test_checks_catch_bad_outputs(name, answers, problem):
    out = F.run_program(name, FakeBackend(answers))
    assert any(problem in p for p in F.check(name, out)), F.check(name, out)


def test_checks_catch_empty_and_unlisted():
    assert F.check("multi_turn", {"a1": " ", "a2": "x"}) == ["a1 is empty"]
    assert "not one of" in F.check("select", {"city": "Rome"})[0]
    assert "did not both answer" in F.check("fork_join", {"fact": ["x", ""], "summary": "y"})[0]


xgr = pytest.importorskip("xgrammar")
from xgrammar.testing import _is_grammar_accept_string as accepts  # noqa: E402


@pytest.mark.parametrize("obj,ok", [
    (CITY, True),
    ({**CITY, "name": "P" * 25}, False),
    ({**CITY, "population": 100_000_000}, False),
    ({**CITY, "population": -1}, False),
    ({**CITY, "extra": 1}, False),
    ({k: v for k, v in CITY.items() if k != "capital"}, False),
])
def test_json_schema_under_xgrammar_agrees_with_the_check(obj, ok):
    # --constrained-json-disable-any-whitespace: xgrammar's compact form is json.dumps's.
    grammar = xgr.Grammar.from_json_schema(json.dumps(F.CITY_SCHEMA), any_whitespace=False)
    text = json.dumps(obj)
    assert accepts(grammar, text) is ok
    assert (F.json_problems(text) == []) is ok
    assert len(json.dumps({**CITY, "name": "N" * 24, "country": "C" * 24, "population": 99999999})) < 128


@pytest.mark.parametrize("regex,good,bad", [
    (F.NUMBER_RE, ["84", "7", "1000"], ["", "12345", "8.4", "84 "]),
    (F.DATE_RE, ["1969-07-20", "2024-12-31"], ["1969-7-20", "1969-13-01", "1969-07-32", "69-07-20"]),
])
def test_regexes_under_xgrammar(regex, good, bad):
    grammar = xgr.Grammar.from_regex(regex)
    assert all(accepts(grammar, s) for s in good)
    assert not any(accepts(grammar, s) for s in bad)


def test_agreement_and_stream_text():
    a = {"a1": "x", "fact": ["p", "q"]}
    assert F.agreement(a, a) == (3, 3)
    assert F.agreement(a, {"a1": "y", "fact": ["p", "r"]}) == (1, 3)
    assert F.stream_text([{"text": "The"}, {"text": "The cap"}, {"text": "The capital."}]) == "The capital."
    with pytest.raises(AssertionError, match="does not extend"):
        F.stream_text([{"text": "The"}, {"text": " cap"}])


def test_server_commands_parse_with_sglangs_parser():
    from sglang.srt.server_args import ServerArgs

    from saw_sglang.patches import apply_all

    apply_all()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    int4 = F.server_cmd("int4", "/m", 12345, api_key=F.API_KEY)
    assert int4[1:3] == ["-m", "saw_sglang.launch_server"]
    ns = parser.parse_args(int4[3:])
    assert (ns.kv_cache_dtype, ns.api_key, ns.port, ns.grammar_backend) == ("int4", F.API_KEY, 12345, "xgrammar")
    assert ns.constrained_json_disable_any_whitespace and ns.disable_cuda_graph
    bf16 = F.server_cmd("bf16", "/m", 1)
    assert bf16[1:3] == ["-m", "sglang.launch_server"] and "--api-key" not in bf16
    assert parser.parse_args(bf16[3:]).kv_cache_dtype == "bf16"
    fields = set(ServerArgs.__dataclass_fields__)
    assert set(F.ENGINE_KW) <= fields
    with pytest.raises(ValueError):
        F.server_cmd("fp8", "/m", 1)
