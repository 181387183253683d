"""The GPU end-to-end script's checks (dev/gpu/e2e_serve.py), run against a stub server:
the radix-hit logprob check fails on null/NaN logprobs or a miss, and the agreement step
reports the mean logprob gap to BF16."""

import math

import e2e_serve
import pytest


class StubServer:
    def __init__(self, hit_lps, hit_cached=1248):
        self.hit_lps, self.hit_cached, self.asked = hit_lps, hit_cached, []

    def generate(self, texts, max_new=32):
        return [{"text": " Paris.", "output_ids": [7, 8, 9][:max_new],
                 "meta_info": {"prompt_tokens": 1249, "cached_tokens": 1248}} for _ in texts]

    def chat(self, content):
        return "Paris."

    def info(self):
        return {"max_total_num_tokens": 1000}

    def prompt_logprobs(self, text, start):
        self.asked.append((text, start))
        return self.hit_lps, self.hit_cached


@pytest.mark.parametrize("lps, cached, ok", [
    ([-0.5, -1.25, -0.1], 1248, True),
    ([-0.5, None, -0.1], 1248, False),          # JSON null: the server's NaN
    ([-0.5, float("nan"), -0.1], 1248, False),
    ([-0.5, float("-inf")], 1248, False),
    ([], 1248, False),
    ([-0.5, -1.0], 0, False),                   # no radix hit: the check proves nothing
])
def test_radix_hit_logprobs_check(lps, cached, ok):
    srv, result = StubServer(lps, cached), {}
    checks = e2e_serve.serve_checks(srv, result)
    assert checks["radix_hit_logprobs_finite"] is ok
    assert checks["chat_answers"] and checks["long_prompt_chunked"] and checks["radix_hit_answers"]
    # asked from the last prompt token on, so the cached prefix is reused
    assert srv.asked == [(e2e_serve.RADIX_Q + e2e_serve.RADIX_TAIL, 1248)]


def test_agreement_reports_hit_logprob_gap():
    summary = {}
    for name, lps in (("bf16", [-0.5, -1.0, -2.0]), ("int4-had", [-0.7, -1.0, -1.5]),
                      ("int4-none", [-0.5, None, -2.0])):
        res = summary[name] = {}
        e2e_serve.serve_checks(StubServer(lps), res)
    e2e_serve.add_agreement(summary)
    assert summary["int4-had"]["hit_dlogprob"] == pytest.approx((0.2 + 0.0 + 0.5) / 3)
    assert "hit_dlogprob" not in summary["int4-none"]  # a null is a failed check, not a gap
    assert summary["int4-had"]["agree_exact"] == 1.0
    assert math.isfinite(summary["int4-had"]["agree_prefix"])
