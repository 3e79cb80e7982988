"""The transformers + accelerate baseline (--run-accelerate): the same slice with accelerate's CPU offload.
Off by default: the report then uses the figure measured earlier (common.ACCEL_REF)."""
from __future__ import annotations

import gc
import time

from .common import ACCEL_REF, Deadline


def run_accelerate(tcfg, device, args, log, remaining_s) -> dict:
    """transformers + accelerate CPU offload of the same slice, batch 64, GPU budget scaled 6 GiB * L/8
    (guarded; off unless --run-accelerate). Decode step: the clock between generation steps (a logits
    processor stamps each step), prefill excluded."""
    import torch

    if remaining_s < (20 if args.cpu_smoke else 90):
        return {"status": f"skipped (only {remaining_s:.0f} s of the budget left)"}
    import accelerate
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = {k: v for k, v in tcfg.items() if k not in ("torch_dtype", "dtype", "architectures")}
    conf = MixtralConfig(**cfg)
    t0 = time.perf_counter()
    gen_dev = "cuda" if device.type == "cuda" else "cpu"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(gen_dev):
            torch.manual_seed(args.seed)
            model = MixtralForCausalLM(conf)
    finally:
        torch.set_default_dtype(prev)
    model = model.to("cpu").eval()
    gpu_GiB = ACCEL_REF["gpu_budget_GiB"] * args.layers / ACCEL_REF["layers"]
    mm = {0: f"{gpu_GiB:.2f}GiB", "cpu": "200GiB"} if device.type == "cuda" else {"cpu": "200GiB"}
    dm = infer_auto_device_map(model, max_memory=mm, no_split_module_classes=list(model._no_split_modules or []))
    model = dispatch_model(model, device_map=dm)
    load_s = time.perf_counter() - t0
    B = 8 if args.cpu_smoke else ACCEL_REF["batch"]
    first = next(iter(dm.values()))
    dev0 = torch.device("cuda", first) if isinstance(first, int) else torch.device("cpu")
    g = torch.Generator().manual_seed(args.seed + 11)
    ids = torch.randint(3, tcfg["vocab_size"], (B, args.prompt_len), generator=g).to(dev0)
    steps = 3
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        """Called once per generated token (after that step's forward): a clock per decode step."""

        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores
    stamp = Stamp()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1 + steps,
                       min_new_tokens=1 + steps, pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
    total_s = time.perf_counter() - t0
    del model
    gc.collect()
    if len(stamp.t) < 2:
        return {"status": f"error: only {len(stamp.t)} generation steps were timed", "load_s": load_s}
    step_s = (stamp.t[-1] - stamp.t[0]) / (len(stamp.t) - 1)   # prefill (first token) excluded
    return {"status": "ok", "tokens_per_s": B / step_s, "step_s": step_s, "batch": B, "gpu_budget_GiB": gpu_GiB,
            "decode_steps_timed": len(stamp.t) - 1, "prefill_and_first_token_s": stamp.t[0] - t0,
            "generate_s": total_s, "load_s": load_s, "accelerate_version": accelerate.__version__,
            "device_map_devices": sorted({str(v) for v in dm.values()})}


def accelerate_step(s) -> None:
    """Run the baseline within what is left of the budget; never fatal (a Deadline included), the outcome
    recorded as res['accelerate_run']."""
    s.log.phase("accelerate baseline (--run-accelerate)")
    try:
        a = run_accelerate(s.tcfg, s.device, s.args, s.log, s.remaining())
    except BaseException as e:  # noqa: BLE001  Deadline included: never fatal
        a = {"status": f"error: {type(e).__name__}: {e}"}
        if not isinstance(e, Deadline):
            s.err("accelerate", e)
    s.res["accelerate_run"] = a
