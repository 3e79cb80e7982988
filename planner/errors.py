"""Errors for bad input. Each names the field at fault and what would fix it.

The CLI turns every `SpecError` into one line on stderr and exit code 2.
"""
from __future__ import annotations


class SpecError(ValueError):
    """A bad input: a config, spec, workload, plan, checkpoint or CLI argument."""

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class InfeasibleError(SpecError):
    """No plan fits: names the constraint that fails and by how much."""


def check_known_keys(mapping: dict, known, where: str) -> None:
    """Refuse a key of `mapping` that is not in `known`, naming it and the nearest valid key (a typo such
    as `h2d_GBs` for `h2d_GBps` would otherwise read as a missing value)."""
    import difflib

    extra = sorted(str(k) for k in mapping if k not in known)
    if not extra:
        return
    key = extra[0]
    near = difflib.get_close_matches(key, [str(k) for k in known], n=1, cutoff=0.6)
    raise SpecError(f"{where}.{key}", "unknown key",
                    f"did you mean `{near[0]}`?" if near else f"valid keys: {', '.join(sorted(map(str, known)))}")
