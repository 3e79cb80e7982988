"""One run's shared state, handed from step to step: the arguments, the log, the result dict (written as
gpu_offload.json), the device, the deadline (SIGALRM raises Deadline there) and the current Runner."""
from __future__ import annotations

import signal
import time
import traceback
from pathlib import Path

from .common import H2D_REF_GBps, Deadline, Log


def new_result(args) -> dict:
    """The result dict before anything ran: every headline figure None, the run's configuration."""
    res: dict = {"benchmark": "gpu_offload", "oracle": True,
                 "oracle_note": "draft proposals accepted by a seeded Bernoulli oracle at rate alpha "
                                "(Engine(acceptance_oracle=alpha)): every speculative figure is oracle-driven",
                 "complete": False, "errors": [], "phases_s": {}, "modes": {},
                 "tokens_per_s": {"spec_alpha0.6": None, "spec_alpha0.8": None, "k0": None, "accelerate": None},
                 "h2d_GBps_achieved": None, "h2d_GBps_reference": H2D_REF_GBps, "h2d_busy_fraction": None,
                 "predicted_vs_measured": {}, "iteration_error_pct": None}
    res["config"] = {"smoke": args.cpu_smoke, "layers": args.layers, "prompt_len": args.prompt_len,
                     "gen_len_planned": args.gen_len, "iterations": args.iterations, "seed": args.seed,
                     "time_budget_s": args.time_budget_s}
    return res


class Session:
    """State of one run. The planning steps fill hw_base, tcfg (the slice's target config), dcfg, dspec,
    full (the full model's plans), bud (the slice's budgets), spec, hw_for (mode -> hardware with that
    mode's budgets), plans and plan_notes; the warm-up fills warm_rec and n_warm. The layer fallback
    replaces the slice's fields and the runner."""

    def __init__(self, args, device, out: Path, t_start: float):
        self.args, self.device, self.out = args, device, out
        self.log = Log(t_start)
        self.res = new_result(args)
        self.deadline = t_start + args.time_budget_s - 4.0
        self.runner = None
        self.hw_base = self.tcfg = self.dcfg = self.dspec = self.full = self.bud = None
        self.spec = self.hw_for = self.plans = self.plan_notes = None
        self.warm_rec, self.n_warm = None, 0

    def _on_alarm(self, signum, frame):
        raise Deadline(f"time budget of {self.args.time_budget_s:g} s ran out")

    def arm(self) -> None:
        """SIGALRM at the deadline: a mode in flight stops there (its partial record is kept)."""
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.5, self.deadline - time.perf_counter()))

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def err(self, where: str, e: BaseException) -> None:
        """Record and print an error (called inside its except block: the traceback is kept too)."""
        msg = f"{where}: {type(e).__name__}: {e}"
        self.res["errors"].append(msg)
        self.log(f"ERROR {msg}")
        tb = traceback.format_exc(limit=6)
        self.res.setdefault("tracebacks", []).append(tb)
