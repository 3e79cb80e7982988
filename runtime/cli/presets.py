"""`specmoe presets`: the bundled model and hardware presets."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    import json

    from specmoe.planner.hardware_spec import HardwareSpec, list_hardware
    from specmoe.planner.model_spec import ModelSpec, list_presets

    models = []
    for n in list_presets():
        m = ModelSpec.preset(n)
        models.append({"name": n, "family": m.family, "total_params_B": round(m.total_params / 1e9, 2),
                       "active_params_B": round(m.active_params / 1e9, 2), "experts": m.num_experts, "top_k": m.top_k})
    hws = []
    for n in list_hardware():
        h = HardwareSpec.preset(n)
        hws.append({"name": n, "gpu": h.gpu.name, "gpu_mem_GiB": round(h.gpu.mem_bytes / 2**30, 1),
                    "cpu_mem_GiB": round(h.cpu.mem_bytes / 2**30, 1), "h2d_GBps": h.link.h2d_Bps / 1e9,
                    "measured": not h.measured.empty})
    if args.json:
        print(json.dumps({"models": models, "hardware": hws}, indent=1))
        return 0
    print(f"{'model preset':24s} {'family':12s} {'total':>8s} {'active':>8s} {'E':>4s} {'top-k':>5s}")
    for m in models:
        print(f"{m['name']:24s} {m['family']:12s} {m['total_params_B']:7.2f}B {m['active_params_B']:7.2f}B "
              f"{m['experts']:4d} {m['top_k']:5d}")
    print()
    print(f"{'hardware preset':22s} {'gpu':26s} {'GPU GiB':>8s} {'CPU GiB':>8s} {'H2D GB/s':>9s} measured")
    for h in hws:
        print(f"{h['name']:22s} {h['gpu'][:26]:26s} {h['gpu_mem_GiB']:8.1f} {h['cpu_mem_GiB']:8.1f} "
              f"{h['h2d_GBps']:9.1f} {'yes' if h['measured'] else 'no'}")
    return 0
