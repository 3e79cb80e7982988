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
