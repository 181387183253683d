"""K calibration (kernels/calibration.py): exact in attention, checked file format."""

import pytest
import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.calibration import KCalibration, fold_query, lse_shift


def _cal(layers=2, heads=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KCalibration(torch.randn(layers, heads, d, generator=g) * 5, torch.rand(layers, heads, d, generator=g) + 0.3)


def test_folded_query_on_calibrated_keys_is_the_same_attention():
    """q*scale . (k - mean)/scale = q.k - q.mean: the same softmax and output; the
    log-sum-exp over these keys alone is off by exactly lse_shift."""
    cal = _cal()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 8, 64, generator=g)  # 8 query heads on 2 KV heads
    k = torch.randn(40, 2, 64, generator=g) * 3 + cal.mean[1]
    v = torch.randn(40, 2, 64, generator=g)
    mul, add = cal.write_affine(1)
    sm = 0.125
    o, lse = ref._attend(q, k, v, sm, 0.0)
    o2, lse2 = ref._attend(fold_query(q, cal.scale[1]), k * mul + add, v, sm, 0.0)
    torch.testing.assert_close(o2, o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse2 + lse_shift(q, cal.mean[1], sm), lse, rtol=1e-4, atol=1e-4)


def test_save_load_heads_and_refusals(tmp_path):
    cal = _cal(layers=3, heads=4)
    cal.save(tmp_path / "c.pt")
    back = KCalibration.load(tmp_path / "c.pt")
    assert torch.equal(back.mean, cal.mean) and torch.equal(back.scale, cal.scale)
    part = cal.heads(2, 2)
    assert part.shape == (3, 2, 64) and torch.equal(part.mean, cal.mean[:, 2:4])
    assert cal.for_logit_cap(30.0).mean.abs().max() == 0 and cal.for_logit_cap(0.0) is cal
    with pytest.raises(ValueError, match="asked for"):
        cal.heads(3, 2)
    with pytest.raises(ValueError, match="scale finite and > 0"):
        KCalibration(cal.mean, -cal.scale)
    torch.save({"version": 99}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="python -m saw_sglang.calibrate"):
        KCalibration.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="cannot read"):
        KCalibration.load(tmp_path / "missing.pt")
