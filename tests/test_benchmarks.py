"""The analytic MAC count behind the benchmarks' GFLOP/s, and the targets' ratios and PASS/FAIL in the report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conversion_helpers import REPO
from cvt_core import CvtConfig
from cvt_core.macs import cvt_macs

TINY_VARIANTS = dict(  # tests/conftest.py's "tiny-variants": cls token on the last stage only, strided keys
    embed_dim=[24, 40], num_heads=[2, 4], depth=[1, 3], patch_sizes=[5, 3], patch_stride=[3, 2], patch_padding=[1, 0],
    mlp_ratio=[2.0, 1.5], qkv_bias=[False, True], cls_token=[False, True], qkv_projection_method=["dw_bn", "dw_bn"],
    kernel_qkv=[5, 3], padding_q=[2, 1], stride_q=[1, 1], stride_kv=[1, 2], padding_kv=[2, 0],
    attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.1], num_labels=1)


def test_cvt13_at_224_counts_the_4_566_gmac_the_benchmark_prints():
    macs = cvt_macs(CvtConfig.from_preset("cvt-13", num_labels=1000), 224, 224)
    assert macs == {"embedding": 246263808, "qkv_conv": 16934400, "qkv_linear": 543916032,
                    "attention": 508365824, "out_proj": 361136128, "mlp": 2889089024, "head": 384000,
                    "total": 4566089216}
    assert f"{macs['total'] / 1e9:.3f} GMAC = {2 * macs['total'] / 1e9:.2f} GFLOP" == "4.566 GMAC = 9.13 GFLOP"


@pytest.mark.parametrize("config, height, width", [
    (dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=5), 64, 80),
    (TINY_VARIANTS, 71, 53),
], ids=["tiny-nonsquare", "tiny-variants"])
def test_mac_count_equals_half_the_flops_torch_counts_in_transformers_model(config, height, width):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    model = transformers.CvtForImageClassification(transformers.CvtConfig(**config)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, height, width))
    assert cvt_macs(CvtConfig(**config), height, width)["total"] * 2 == counter.get_total_flops()


def test_mac_counter_imports_no_framework():
    code = ("import sys, cvt_core.macs; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _row(section, candidate, times, batch=8, variant="fp32"):
    return {"section": section, "batch": batch, "candidate": candidate, "variant": variant, "times_s": times,
            "images_per_s": batch / sorted(times)[len(times) // 2], "gflops_per_s": None}


def test_targets_compare_median_rates_pair_rounds_and_mark_pass_fail_or_missing():
    from benchmarks.report import summarise

    rows = [_row("pt-fp32", "hf-pt:fp32", [1.0, 1.0, 4.0]), _row("pt-fp32", "ours-pt:fp32", [0.5, 0.5, 1.0]),
            _row("tf-fp32", "hf-tf:fp32", [1.0, 1.0, 1.0]), _row("tf-fp32", "ours-keras:fp32", [0.5, 0.5, 0.5])]
    result = summarise(rows, {}, {}, {"total": 1}, 2e-9, {}, {}, [8], 4, quick=True)
    targets = {t["id"]: t for t in result["targets"]}
    assert targets["pt-fp32-b8"]["ratio"] == pytest.approx(2.0)
    assert targets["pt-fp32-b8"]["paired_ratio"] == pytest.approx(2.0)  # rounds 1.0/0.5, 1.0/0.5, 4.0/1.0
    assert targets["pt-fp32-b8"]["status"] == "PASS"  # needs 1.5
    assert targets["tf-fp32-b8"]["status"] == "FAIL"  # 2.0, needs 2.5
    assert targets["pt-train"]["status"] == "n/a" and targets["pt-train"]["ratio"] is None
