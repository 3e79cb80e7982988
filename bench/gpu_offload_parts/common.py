"""What every part of the GPU offload bench shares: the run's constants, its two control-flow exceptions,
the log that prints and keeps every line, and number formatting."""
from __future__ import annotations

import math
import time

FULL_LAYERS = 32
FULL_GPU_GiB, FULL_CPU_GB = 24.0, 128.0          # the full model's machine (issue 6)
H2D_REF_GBps = 55.0                              # pinned H2D measured on the H200 host
ACCEL_REF = {"tokens_per_s": 17.0, "step_s": 3.76, "batch": 64, "layers": 8, "gpu_budget_GiB": 6,
             "source": "reference (measured earlier, not re-run): transformers + accelerate CPU offload of the "
                       "same 8-layer Mixtral-8x7B slice on the H200 host, 6 GiB GPU budget, batch 64, 3.76 s per "
                       "decode step (DESIGN.md); batch 256 ran out of GPU memory"}
GOALS = {"spec0.8_over_k0": 2.5, "spec0.8_over_accelerate": 20.0, "h2d_busy_fraction": 0.90,
         "iteration_error_pct": 10.0}
ORACLE = "oracle-driven"
STREAMING = {"auto": None, "next": "next", "predict": "predict", "off": "off"}   # --streaming -> Engine
OPT = dict(cpu_expert_mode="off", gpu_attention=False, target_kv_gpu=False, timeline=False, alternatives=0)
GiB = 1024 ** 3
WARMUP_ITERATIONS = 2            # each mode's first iterations, left out of its iteration time and tokens/s
MODES = (("spec_alpha0.8", 0.8), ("spec_alpha0.6", 0.6), ("k0", None))


class Deadline(BaseException):
    """The time budget ran out (raised by SIGALRM; the engine keeps its partial record)."""


class StopAfter(Exception):
    """Raised by the k policy after the wanted number of decode iterations."""


class Log:
    """Prints each line and keeps it (written to gpu_offload.txt); phase lines carry the seconds since
    t_start, the moment the entry script started."""

    def __init__(self, t_start: float):
        self.t_start = t_start
        self.lines: list[str] = []

    def __call__(self, msg: str = "") -> None:
        for line in str(msg).split("\n"):
            print(line, flush=True)
            self.lines.append(line)

    def phase(self, msg: str) -> None:
        self(f"[{self.elapsed():7.1f} s] {msg}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


def fmt(x, spec=".1f", none="n/a"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)
