"""`specmoe` command line. Each subcommand lives in its own module and is imported only when used,
so `specmoe estimate` and `specmoe plan` start fast and work where torch is not installed.

Every `SpecError` (bad input) becomes one line on stderr and exit code 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("specmoe.runtime.cli.estimate", "predict stage times, throughput and memory of one configuration"),
    "plan": ("specmoe.runtime.cli.plan", "choose batch, micro-batches, draft length and placement (MILP) and write plan.json"),
    "run": ("specmoe.runtime.cli.run", "execute a plan on local checkpoints and write run.json"),
    "job": ("specmoe.runtime.cli.job", "run a plan's prompts over a Ray cluster (Ray Data), or predict a fleet's job"),
    "presets": ("specmoe.runtime.cli.presets", "list the bundled model and hardware presets"),
    "calibrate": ("specmoe.runtime.cli.calibrate", "measure this machine and write a hardware spec with measured curves"),
    "profile-acceptance": ("specmoe.runtime.cli.profile", "measure acc(k) of a draft against a target on real prompts"),
    "convert-eagle": ("specmoe.runtime.cli.convert_eagle", "convert a PyTorch .bin EAGLE head to safetensors "
                      "(read with weights_only=True)"),
    "report": ("specmoe.runtime.cli.report", "predicted against measured, per stage, as a table and an HTML report"),
    "demo": ("specmoe.runtime.cli.demo", "calibrate, profile, plan, run and report on the bundled tiny model pair"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: exit 2 with one line, like ours
        self.print_usage(sys.stderr)
        print(f"specmoe: error: {message}", file=sys.stderr)
        sys.exit(2)


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in SUBCOMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, help_)
    return out


def version_text() -> str:
    """`specmoe X.Y.Z` of the installed distribution (the source tree's pyproject.toml when not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return f"specmoe {version('specmoe')}"
    except PackageNotFoundError:
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        return f"specmoe {m.group(1) if m else 'unknown'} (source tree)"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="specmoe", description="Plan and run speculative decoding of offloaded MoE models.")
    p.add_argument("--version", action="version", version=version_text())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (mod, help_) in _available().items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if only is None or only == name:
            importlib.import_module(mod).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    from specmoe.planner.errors import SpecError

    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=cmd if cmd in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(mod.run(args) or 0)
    except SpecError as e:
        print(f"specmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `specmoe ... | head`
        return 0
    except KeyboardInterrupt:
        print(f"specmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
