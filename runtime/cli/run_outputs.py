"""What `specmoe run` writes, kept safe: every output path checked before any weight is loaded, the
--outputs lines written whole under a lock, and the run record kept through a second Ctrl-C,
SIGTERM or a full disk (complete: false, with the count of outputs really on disk)."""
from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from specmoe.planner.atomic_file import LineWriter, check_distinct, check_writable


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops the run like Ctrl-C (what finished is kept), exit 143."""


def run_plan_path(out_path: Path) -> Path:
    """Where `specmoe run -o RUN.json` writes the plan it ran when an override changed it: RUN.plan.json."""
    return out_path.with_name(out_path.stem + ".plan.json")


def check_run_paths(args, replans: bool) -> None:
    """Before any work: every output writable, none of them an input or another output."""
    check_writable(args.output, "-o")
    outputs = {"-o": args.output}
    if args.outputs is not None:
        check_writable(args.outputs, "--outputs")
        outputs["--outputs"] = args.outputs
    if replans:
        plan_out = run_plan_path(Path(args.output))
        check_writable(plan_out, "-o (its .plan.json)")
        outputs["-o (its .plan.json)"] = plan_out
    check_distinct(outputs, {"plan": args.plan, "--prompts": args.prompts, "--target": args.target,
                             "--draft": args.draft})


class Outputs:
    """The --outputs file, opened (locked, emptied) at the first finished sequence: an input error
    before that leaves no file behind."""

    def __init__(self, path: str | None):
        self.path = path
        self.writer: LineWriter | None = None

    def add(self, out) -> None:
        if self.path is None:
            return
        if self.writer is None:
            self.writer = LineWriter(self.path, "--outputs")
        try:
            self.writer.write_line(json.dumps(out.to_dict()))
        except OSError as e:       # a full disk: name the file (the line was cut back)
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    @property
    def lines(self) -> int | None:
        return None if self.path is None else (self.writer.lines if self.writer else 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextmanager
def stop_signals():
    """SIGTERM stops the run as Ctrl-C does; once one has (or the run has ended: the caller sets
    state["stopped"]), further Ctrl-C and SIGTERM are noted and ignored, so the run record is still
    written (complete: false when the run was stopped)."""
    state = {"stopped": False}      # set once the run has stopped: later signals only wait for the record
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["stopped"]:
            print("specmoe run: stopping; writing the run record first", file=sys.stderr)
            return
        state["stopped"] = state["signalled"] = True
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in old.items():       # a stopped run's process only exits now: later signals wait for it
            signal.signal(s, signal.SIG_IGN if state.get("signalled") else h)


def save_record(record, out_path: Path) -> str | None:
    """Write the run record; the reason it could not be written (a full disk), None when it was."""
    try:
        record.to_json(out_path)
    except OSError as e:
        return f"the run record could not be written to {out_path} ({e.strerror or e})"
    return None
