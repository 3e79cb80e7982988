"""Workload: batch, prompt and output lengths, dtypes, and the draft's acceptance profile.

acc(k) = expected number of accepted draft tokens when the draft proposes k tokens (0 <= acc(k) <= k).
Either a measured table (k -> acc) or derived from an i.i.d. per-token acceptance rate alpha:
acc(k) = alpha + alpha^2 + ... + alpha^k = alpha (1 - alpha^k) / (1 - alpha).
Each iteration then yields acc(k) + 1 tokens per sequence (the +1 is the target's bonus/correction).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specmoe.planner.errors import SpecError
from specmoe.planner.paths import is_file

# The longest draft the planner searches and the engine's dynamic k may reach by default (the paper's
# best k on its hosts is 4-6; acceptance falls geometrically past that).
MAX_DRAFT_LEN = 8
MAX_PROFILE_K = 64     # the longest draft an acceptance table may describe
# The levels of the across-sequence quantiles a measured profile may carry (CSV columns accepted_p1 ..
# accepted_p99): of each sequence's mean accepted drafts per iteration, at the sample's plotting positions
# i/(m+1) (runtime/calibrate/acceptance.py). Their lower tail, which a Beta of the same mean and spread
# thins out, sets how long a finite job's slowest sequences keep the batch (planner/batch_drain.py).
QUANTILE_LEVELS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99)
QUANTILE_COLUMNS = tuple(f"accepted_p{round(q * 100)}" for q in QUANTILE_LEVELS)
KV_DTYPES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class AcceptanceProfile:
    """acc(k) for k = 0..max_k. `alpha` is set when derived from a per-token rate."""

    table: tuple[float, ...]          # table[k] = expected accepted drafts at draft length k; table[0] = 0
    alpha: float | None = None
    source: str = ""
    # spread[k]: standard deviation across sequences of a sequence's mean accepted drafts per iteration
    # at draft length k (spread[0] = 0); None when unmeasured. Sets how unevenly a batch finishes
    # (planner/batch_drain.py).
    spread: tuple[float, ...] | None = None
    # quantiles[k]: that quantity's quantiles at QUANTILE_LEVELS at draft length k (quantiles[0] all 0); None
    # when unmeasured
    quantiles: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        if not self.table or self.table[0] != 0:
            raise SpecError("acceptance", "acc(0) must be 0", "start the table at k=0 with 0, or omit k=0")
        prev = 0.0
        for k, a in enumerate(self.table):
            if not (0 <= a <= k + 1e-9):
                raise SpecError("acceptance", f"acc({k}) = {a} is outside [0, {k}]", "expected accepted drafts lie in [0, k]")
            if a + 1e-9 < prev:
                raise SpecError("acceptance", f"acc({k}) = {a} is below acc({k-1}) = {prev}",
                                "acceptance must not fall as k grows")
            prev = a
        if self.spread is not None:
            if len(self.spread) != len(self.table):
                raise SpecError("acceptance", f"spread has {len(self.spread)} entries for {len(self.table)} k values",
                                "give one accepted_sd per k")
            for k, sd in enumerate(self.spread):
                if not (sd >= 0 and math.isfinite(sd)):
                    raise SpecError("acceptance", f"accepted_sd at k={k} is {sd}", "a standard deviation is >= 0")
        if self.quantiles is not None:
            self._check_quantiles()

    def _check_quantiles(self) -> None:
        if len(self.quantiles) != len(self.table):
            raise SpecError("acceptance", f"quantiles has {len(self.quantiles)} rows for {len(self.table)} k values",
                            f"give the columns {', '.join(QUANTILE_COLUMNS)} on every row")
        for k, row in enumerate(self.quantiles):
            if len(row) != len(QUANTILE_LEVELS) or not all(math.isfinite(x) and -1e-9 <= x <= k + 1e-9 for x in row):
                raise SpecError("acceptance", f"the quantiles at k={k} are {list(row)}",
                                f"{len(QUANTILE_LEVELS)} values in [0, {k}], one per column {', '.join(QUANTILE_COLUMNS)}")
            if any(b + 1e-9 < a for a, b in zip(row, row[1:])):
                raise SpecError("acceptance", f"the quantiles at k={k} fall: {list(row)}",
                                "quantiles rise with their level (accepted_p1 <= accepted_p2 <= ...)")

    def spread_at(self, k: int) -> float | None:
        """Across-sequence standard deviation of accepted drafts per iteration at k (None: unmeasured)."""
        if self.spread is None or k <= 0:
            return None if self.spread is None else 0.0
        return self.spread[min(k, len(self.spread) - 1)]

    def quantiles_at(self, k: int) -> tuple[float, ...] | None:
        """Across-sequence quantiles (QUANTILE_LEVELS) of accepted drafts per iteration at k (None: unmeasured)."""
        if self.quantiles is None or k <= 0:
            return None
        return self.quantiles[min(k, len(self.quantiles) - 1)]

    @property
    def max_k(self) -> int:
        return len(self.table) - 1

    def acc(self, k: int) -> float:
        if k < 0:
            raise SpecError("draft_len", f"must be >= 0, got {k}", "use 0 for no speculation")
        if k <= self.max_k:
            return self.table[k]
        if self.alpha is not None:
            return _alpha_acc(self.alpha, k)
        # beyond a measured table: no further gain assumed (conservative)
        return self.table[-1]

    def tokens_per_iteration(self, k: int) -> float:
        """Tokens each sequence gains per iteration: acc(k) + 1."""
        return self.acc(k) + 1.0

    @classmethod
    def from_alpha(cls, alpha: float, max_k: int = 16) -> "AcceptanceProfile":
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 <= alpha < 1):
            raise SpecError("acceptance", f"rate alpha = {alpha!r} is outside [0, 1)",
                            "give a per-token acceptance rate such as 0.8, or a CSV table k,accepted")
        return cls(tuple(_alpha_acc(float(alpha), k) for k in range(max_k + 1)), alpha=float(alpha),
                   source=f"alpha={alpha}")

    @classmethod
    def from_csv(cls, path: str | Path) -> "AcceptanceProfile":
        p = Path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError("acceptance", f"cannot read {p}: {e}", "give a CSV with columns k,accepted") from None
        return cls.from_csv_text(text, source=str(p))

    @classmethod
    def from_csv_text(cls, text: str, source: str = "csv") -> "AcceptanceProfile":
        text = text.removeprefix("\ufeff")     # a byte-order mark (spreadsheets write one) is not data
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "k" not in rows[0]:
            raise SpecError("acceptance", f"{source} has no header with columns k,accepted",
                            "write a CSV whose header is `k,accepted` (accepted = expected accepted drafts)")
        col = "accepted" if "accepted" in rows[0] else None
        if col is None:
            raise SpecError("acceptance", f"{source} lacks an `accepted` column", "header must be `k,accepted`")
        has_sd = "accepted_sd" in rows[0]
        has_q = _quantile_columns(rows[0], source)
        pts: dict[int, float] = {0: 0.0}
        sds: dict[int, float] = {0: 0.0}
        qs: dict[int, tuple[float, ...]] = {0: (0.0,) * len(QUANTILE_LEVELS)}
        seen: dict[int, int] = {}
        for i, r in enumerate(rows, start=2):
            try:
                k, a = int(r["k"]), float(r[col])
                if has_sd:
                    sds[k] = float(r["accepted_sd"])
                if has_q:
                    qs[k] = tuple(float(r[c]) for c in QUANTILE_COLUMNS)
            except (TypeError, ValueError):
                raise SpecError("acceptance", f"{source} line {i}: k={r.get('k')!r} accepted={r.get(col)!r}"
                                + (f" accepted_sd={r.get('accepted_sd')!r}" if has_sd else "")
                                + (" or an accepted_p* column" if has_q else "")
                                + " is not numeric", "fix the row") from None
            if k < 0:
                raise SpecError("acceptance", f"{source} line {i}: k={k} is negative", "k must be >= 0")
            if k > MAX_PROFILE_K:
                raise SpecError("acceptance", f"{source} line {i}: k={k} exceeds {MAX_PROFILE_K}",
                                "k is a draft length: 1, 2, ...")
            if k in seen:
                raise SpecError("acceptance", f"{source} line {i}: k={k} repeats line {seen[k]}",
                                "give one row per k")
            if not (math.isfinite(a) and math.isfinite(sds.get(k, 0.0)) and all(map(math.isfinite, qs.get(k, ())))):
                raise SpecError("acceptance", f"{source} line {i}: a value is not finite", "fix the row")
            seen[k] = i
            pts[k] = a
        ks = sorted(pts)
        if ks != list(range(ks[-1] + 1)):
            raise SpecError("acceptance", f"{source} must list every k from 1 to {ks[-1]}", "add the missing rows")
        return cls(tuple(pts[k] for k in ks), alpha=None, source=source,
                   spread=tuple(sds.get(k, 0.0) for k in ks) if has_sd else None,
                   quantiles=tuple(qs[k] for k in ks) if has_q else None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"table": list(self.table), "alpha": self.alpha, "source": self.source}
        if self.spread is not None:
            d["spread"] = list(self.spread)
        if self.quantiles is not None:
            d["quantiles"] = [list(row) for row in self.quantiles]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AcceptanceProfile":
        sp, qs = d.get("spread"), d.get("quantiles")
        return cls(tuple(float(x) for x in d["table"]), d.get("alpha"), d.get("source", ""),
                   tuple(float(x) for x in sp) if sp is not None else None,
                   tuple(tuple(float(x) for x in row) for row in qs) if qs is not None else None)


def _quantile_columns(header: dict, source: str) -> bool:
    """Whether a profile CSV's header has the quantile columns: all of them or none."""
    present = [c for c in QUANTILE_COLUMNS if c in header]
    if present and len(present) < len(QUANTILE_COLUMNS):
        missing = [c for c in QUANTILE_COLUMNS if c not in header]
        raise SpecError("acceptance", f"{source} has {', '.join(present)} but lacks {', '.join(missing)}",
                        "give every quantile column or none")
    return bool(present)


def _alpha_acc(alpha: float, k: int) -> float:
    if alpha == 0:
        return 0.0
    return alpha * (1 - alpha**k) / (1 - alpha)


def load_acceptance(spec: str | float | AcceptanceProfile | None, max_k: int = 16) -> AcceptanceProfile:
    """From a rate (float or numeric string), a CSV path, or a profile; None means no accepted drafts."""
    if isinstance(spec, AcceptanceProfile):
        return spec
    if spec is None:
        return AcceptanceProfile.from_alpha(0.0, max_k)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return AcceptanceProfile.from_alpha(float(spec), max_k)
    s = str(spec)
    try:
        return AcceptanceProfile.from_alpha(float(s), max_k)
    except ValueError as e:
        if isinstance(e, SpecError):
            raise
    if is_file(s):
        return AcceptanceProfile.from_csv(s)
    raise SpecError("acceptance", f"{s!r} is neither a rate in [0, 1) nor an existing CSV file",
                    "give e.g. 0.8, or a CSV with columns k,accepted")


@dataclass(frozen=True)
class Workload:
    """What is served: prompt and output lengths, batch, dtypes, acceptance.

    batch: a positive int, or None for "the most that fits" (the planner decides).
    num_prompts: the job's number of prompts, or None for an open stream (the batch stays full).
      A finite job's batch thins out at its end under speculation (planner/batch_drain.py), and a
      batch above it only costs memory.
    """

    prompt_len: int
    gen_len: int
    batch: int | None = None
    acceptance: AcceptanceProfile = field(default_factory=lambda: AcceptanceProfile.from_alpha(0.0))
    kv_dtype: str = "bf16"
    weight_dtype: str = "bf16"
    name: str = ""
    num_prompts: int | None = None

    def __post_init__(self):
        for f in ("prompt_len", "gen_len"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f, f"must be a positive integer, got {v!r}", f"pass --{f.replace('_', '-')} N with N >= 1")
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch <= 0):
            raise SpecError("batch", f"must be a positive integer or 'max', got {self.batch!r}", "pass --batch B or --batch max")
        if self.num_prompts is not None and (isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int)
                                             or self.num_prompts <= 0):
            raise SpecError("num_prompts", f"must be a positive integer, got {self.num_prompts!r}",
                            "pass --num-prompts N, or leave it out for an open stream")
        if self.kv_dtype not in KV_DTYPES:
            raise SpecError("kv_dtype", f"unknown dtype {self.kv_dtype!r}", f"one of {', '.join(KV_DTYPES)}")
        if self.weight_dtype not in KV_DTYPES:
            raise SpecError("weight_dtype", f"unknown dtype {self.weight_dtype!r}", f"one of {', '.join(KV_DTYPES)}")

    @property
    def kv_bytes_per_elem(self) -> int:
        return KV_DTYPES[self.kv_dtype]

    @property
    def weight_bytes_per_elem(self) -> int:
        return KV_DTYPES[self.weight_dtype]

    @property
    def max_context(self) -> int:
        """Longest context a sequence reaches (prompt + generated)."""
        return self.prompt_len + self.gen_len

    @property
    def mean_context(self) -> float:
        """Mean context over decoding: prompt + half the output."""
        return self.prompt_len + self.gen_len / 2

    def to_dict(self) -> dict[str, Any]:
        d = {"prompt_len": self.prompt_len, "gen_len": self.gen_len, "batch": self.batch,
             "acceptance": self.acceptance.to_dict(), "kv_dtype": self.kv_dtype,
             "weight_dtype": self.weight_dtype, "name": self.name}
        if self.num_prompts is not None:
            d["num_prompts"] = self.num_prompts
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        return cls(prompt_len=d["prompt_len"], gen_len=d["gen_len"], batch=d.get("batch"),
                   acceptance=AcceptanceProfile.from_dict(d["acceptance"]), kv_dtype=d.get("kv_dtype", "bf16"),
                   weight_dtype=d.get("weight_dtype", "bf16"), name=d.get("name", ""),
                   num_prompts=d.get("num_prompts"))
