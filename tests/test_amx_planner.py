"""The planner's CPU verify-attention roof follows the kernel's path: AMX tiles (cpu.amx_bf16) or
AVX512-BF16 dot products (cpu.avx512_bf16) for bf16/fp16 KV, fp32 FMAs otherwise; and the A30 what-if spec with the datasheet AMX rate."""
from __future__ import annotations

from dataclasses import replace

import pytest

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import load_hardware, parse_hardware
from specmoe.planner.roofline import compute_rate
from specmoe.planner.workload import Workload, load_acceptance

A30, A30_AMX = "a30-xeon6426y", "a30-xeon6426y-amx"


def test_amx_host_costs_bf16_kv_attention_at_the_bf16_peak():
    hw = load_hardware(A30_AMX)
    assert hw.cpu.amx_bf16
    assert compute_rate(hw, "cpu", "bf16", kind="attention") == (41.0e12, "peak")
    assert compute_rate(hw, "cpu", "fp16", kind="attention") == (41.0e12, "peak")  # rounded to bf16, same tiles
    assert compute_rate(hw, "cpu", "fp32", kind="attention") == (2.43e12, "peak")  # fp32 KV: FMAs


def test_host_without_amx_keeps_the_fp32_roof_and_its_profiled_rate():
    hw = load_hardware(A30)
    assert not hw.cpu.amx_bf16
    assert compute_rate(hw, "cpu", "bf16", kind="attention") == (pytest.approx(0.678e12), "measured")
    amx = replace(hw, cpu=replace(hw.cpu, amx_bf16=True, peak_flops={"bf16": 41.0e12, "fp32": 2.43e12}))
    # a profiled kernel rate still caps the roof: it is what the kernel was measured doing
    assert compute_rate(amx, "cpu", "bf16", kind="attention") == (pytest.approx(0.678e12), "measured")
    assert compute_rate(amx, "cpu", "bf16", kind="attention", use_measured=False) == (41.0e12, "peak")


def test_avx512_bf16_host_costs_bf16_kv_attention_at_the_bf16_peak():
    """A Zen 4 host: no AMX, but the kernel's avx512bf16 path multiplies bf16 pairs, so bf16 and fp16
    KV are roofed by the bf16 peak and fp32 KV still by the fp32 one."""
    hw = load_hardware(A30)
    zen4 = replace(hw, cpu=replace(hw.cpu, avx512_bf16=True, peak_flops={"bf16": 4.8e12, "fp32": 2.4e12}))
    assert not zen4.cpu.amx_bf16 and zen4.cpu.bf16_attention
    for dtype in ("bf16", "fp16"):
        assert compute_rate(zen4, "cpu", dtype, kind="attention", use_measured=False) == (4.8e12, "peak")
    assert compute_rate(zen4, "cpu", "fp32", kind="attention", use_measured=False) == (2.4e12, "peak")
    without = replace(zen4, cpu=replace(zen4.cpu, avx512_bf16=False))
    assert compute_rate(without, "cpu", "bf16", kind="attention", use_measured=False) == (2.4e12, "peak")


def test_amx_flag_must_be_a_boolean():
    import yaml

    from specmoe.planner.hardware_spec import HW_SPEC_DIR
    raw = yaml.safe_load((HW_SPEC_DIR / f"{A30_AMX}.yaml").read_text())
    raw["cpu"]["amx_bf16"] = "yes"
    with pytest.raises(SpecError, match=r"cpu\.amx_bf16"):
        parse_hardware(raw, "x.yaml")
    raw["cpu"]["amx_bf16"] = True
    assert parse_hardware(raw, "x.yaml").cpu.amx_bf16
    raw["cpu"]["avx512_bf16"] = 1
    with pytest.raises(SpecError, match=r"cpu\.avx512_bf16"):
        parse_hardware(raw, "x.yaml")
    raw["cpu"]["avx512_bf16"] = True
    assert parse_hardware(raw, "x.yaml").cpu.avx512_bf16


def test_amx_moves_the_best_draft_length_and_throughput_up():
    """Verify attention is the A30 host's largest stage (the paper's Table 3); at the AMX rate it
    is bound by DRAM instead, so the plan drafts further and decodes faster."""
    from specmoe.planner.optimizer import optimize

    wl = Workload(prompt_len=512, gen_len=128, acceptance=load_acceptance(0.8))
    base, amx = optimize("mixtral-8x7b", A30, wl), optimize("mixtral-8x7b", A30_AMX, wl)
    assert amx.predicted.decode_tokens_per_s > 1.2 * base.predicted.decode_tokens_per_s
    assert amx.draft_len > base.draft_len
