"""The measured modes, in order: spec_alpha0.8, k0, spec_alpha0.6, then spec_alpha0.8 again with
per-stage synchronisation unless --quick. Each is skipped when its projected time does not fit what is
left, rerun once with direct host transfers when pinned/zero-copy ones fail, recorded in res['modes'],
and followed by a rewrite of the JSON (a killed run still leaves a file)."""
from __future__ import annotations

from .common import ORACLE, Deadline, fmt
from .prepare import project
from .report import write_json
from .runner import summarize


def mode_order(s) -> list[tuple[str, float | None, bool]]:
    """(mode, alpha, per-stage sync) in the order they run; the profiled rerun is recorded as not run
    under --quick."""
    order = [("spec_alpha0.8", 0.8, False), ("k0", None, False), ("spec_alpha0.6", 0.6, False)]
    if not s.args.quick:
        order.append(("spec_alpha0.8_profiled", 0.8, True))
    else:
        s.res["modes"]["spec_alpha0.8_profiled"] = {"status": "not run (--quick)", "oracle": True}
    return order


def run_modes(s) -> None:
    """Every mode in order until the budget runs out; a mode never reached is recorded as not run."""
    order = mode_order(s)
    prev_wall: dict[str, float] = {}
    for name, alpha, prof in order:
        if not run_mode(s, name, alpha, prof, prev_wall):
            break
    for name, _, _ in order:
        s.res["modes"].setdefault(name, {"status": "not run (time budget)"})
    s.runner.release()


def run_mode(s, name, alpha, prof, prev_wall: dict) -> bool:
    """Run one mode (or skip it when it would not fit) and record it; False when the time budget ran out
    (no later mode runs). A failed mode is recorded and the next one still runs."""
    res, log = s.res, s.log
    plan = s.plans[name.replace("_profiled", "")]
    guess = max(prev_wall.values()) if prev_wall else project(s, plan, s.args.iterations)
    if s.remaining() < 0.8 * guess + 2:
        res["modes"][name] = {"status": f"skipped (needs ~{guess:.0f} s, {s.remaining():.0f} s left)",
                              "oracle": alpha is not None}
        log.phase(f"{name}: skipped, ~{guess:.0f} s needed, {s.remaining():.0f} s left")
        return True
    log.phase(f"{name}: batch {plan.batch}, k={plan.draft_len}, m={plan.micro_batches}"
              + (f", {ORACLE} acceptance {alpha}" if alpha else "") + (", per-stage sync" if prof else ""))
    try:
        rec, st, build_s, wall = run_with_host_io_fallback(s, name, plan, alpha, prof)
        prev_wall[name] = wall
        record_mode(s, name, alpha, prof, plan, rec, st, build_s, wall)
        if st.startswith("deadline"):
            return False
    except Deadline as e:
        res["modes"][name] = {"status": f"deadline: {e}", "oracle": alpha is not None}
        log.phase(f"{name}: time budget ran out")
        return False
    except Exception as e:  # noqa: BLE001  a failed mode is reported, the rest still run
        res["modes"][name] = {"status": f"error: {type(e).__name__}: {e}", "oracle": alpha is not None}
        s.err(name, e)
        s.runner.release()
    finally:
        write_json(res, s.out, s.log.elapsed())
    return True


def run_with_host_io_fallback(s, name, plan, alpha, prof):
    """Runner.run; when it fails with pinned or zero-copy host transfers (untried on this GPU) and 20 s are
    left, once more with host_io=direct, which this and later modes then keep."""
    runner, log, res = s.runner, s.log, s.res
    try:
        return runner.run(plan, alpha, prof, s.args.iterations)
    except Exception as e:  # noqa: BLE001  untried host transfers on this GPU: once more, direct
        if runner.host_io == "direct" or s.remaining() < 20:
            raise
        s.err(f"{name} with host_io={runner.host_io}", e)
        log.phase(f"{name}: failed with host_io={runner.host_io}; this and later modes use host_io=direct")
        res["host_io_fallback"] = f"{runner.host_io} failed in {name}: {type(e).__name__}: {e}"
        runner.host_io = "direct"
        res["config"]["host_io"] = "direct"
        runner.release()
        return runner.run(plan, alpha, prof, s.args.iterations)


def record_mode(s, name, alpha, prof, plan, rec, st, build_s, wall) -> None:
    """res['modes'][name]: the summary of the mode's record with its plan note, status and times (and its
    tokens/s as the headline figure unless profiled); or why no iteration was measured."""
    res, log = s.res, s.log
    if rec is None or rec.iterations == 0:
        res["modes"][name] = {"status": st + " (no decode iteration measured)",
                              "oracle": alpha is not None, "wall_s": wall}
        log.phase(f"{name}: no decode iteration measured ({st})")
        return
    base = name.replace("_profiled", "")
    d = summarize(rec, plan, alpha, s.spec, s.dspec, s.hw_for(base), s.args)
    if base in s.plan_notes:
        d.update(s.plan_notes[base])
    d.update(status=st, build_s=build_s, wall_s=wall)
    res["modes"][name] = d
    if not prof:
        res["tokens_per_s"][name] = d["tokens_per_s"]
    log.phase(f"{name}: {d['tokens_per_s']:.1f} tok/s" + (f" [{ORACLE}]" if alpha else "")
              + f", iteration {d['iteration_s'] * 1e3:.1f} ms (predicted "
              f"{fmt((d.get('predicted_iteration_s') or 0) * 1e3)} ms), prefill "
              f"{d['prefill_s']:.1f} s, H2D {fmt(d['h2d_GBps'])} GB/s busy "
              f"{fmt((d['h2d_busy_fraction'] or 0) * 100, '.0f')}%, wall {wall:.1f} s")
