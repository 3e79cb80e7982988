"""The prompts of a job: JSON lines with a "prompt" field (plain text: one prompt per line) or a
Parquet file with a `prompt` column. A row's index is its place among the file's rows (blank lines
are not rows), the index `specmoe run` gives the same prompt. A bad row (not JSON, no string
prompt, an empty prompt, a lone surrogate) is reported by its line (Parquet: its row number from
1) and refused, or skipped when asked: never dropped silently."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from specmoe.planner.errors import SpecError

BAD_ROWS = ("refuse", "skip")


@dataclass(frozen=True)
class Row:
    index: int
    line: int
    prompt: str


@dataclass
class Dataset:
    path: str
    rows: list[Row]
    bad: list[tuple[int, int, str]] = field(default_factory=list)   # (line, index, why)
    sha256: str = ""

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.bad)


def read_dataset(path: str | Path, bad_rows: str = "refuse") -> Dataset:
    """The rows of `path`; bad rows refused (SpecError naming the first line) or kept in `bad`."""
    if bad_rows not in BAD_ROWS:
        raise SpecError("--bad-rows", f"{bad_rows!r} is not a choice", "refuse or skip")
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError("--prompts", f"cannot read {p}: {e.strerror or e}", "give an existing file") from None
    items = _parquet_items(p) if raw[:4] == b"PAR1" else _text_items(p, raw)
    ds = Dataset(str(p), [], sha256=hashlib.sha256(raw).hexdigest())
    for index, (line, prompt, why) in enumerate(items):
        if why is None:
            ds.rows.append(Row(index, line, prompt))
        else:
            ds.bad.append((line, index, why))
    if not ds.size:
        raise SpecError("--prompts", f"{p} holds no prompts", "one JSON object with a 'prompt' per line")
    if ds.bad and bad_rows == "refuse":
        line, _, why = ds.bad[0]
        more = f" (and {len(ds.bad) - 1} more bad rows)" if len(ds.bad) > 1 else ""
        raise SpecError("--prompts", f"{p} line {line}: {why}{more}", "fix the rows, or pass --bad-rows skip")
    return ds


def _check_prompt(prompt) -> str | None:
    """Why `prompt` cannot be a prompt, None when it can."""
    if not isinstance(prompt, str):
        return f"the prompt is {'missing' if prompt is None else 'a ' + type(prompt).__name__}, not a string"
    if not prompt:
        return "the prompt is empty"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        return "the prompt holds a lone surrogate (a \\ud800-\\udfff escape without its pair): not text"
    return None


def _text_items(p: Path, raw: bytes) -> list[tuple[int, str | None, str | None]]:
    """(line, prompt, why bad) per non-blank line."""
    if b"\x00" in raw:
        raise SpecError("--prompts", f"{p} is neither text nor Parquet", "give JSON lines or a Parquet file")
    text = raw.decode("utf-8", errors="replace")
    lines = [(i, s) for i, s in enumerate(text.splitlines(), start=1) if s.strip()]
    if lines and not lines[0][1].lstrip().startswith("{"):
        return [(i, s, _check_prompt(s) or ("not UTF-8 text" if "\ufffd" in s else None)) for i, s in lines]
    out = []
    for i, s in lines:
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            out.append((i, None, f"not valid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            out.append((i, None, "not a JSON object"))
            continue
        why = _check_prompt(obj.get("prompt"))
        out.append((i, obj.get("prompt") if why is None else None, why))
    return out


def _parquet_items(p: Path) -> list[tuple[int, str | None, str | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SpecError("--prompts", f"{p} is Parquet and pyarrow is not installed",
                        "pip install 'specmoe[ray]'") from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # noqa: BLE001 (pyarrow's errors have no common base)
        raise SpecError("--prompts", f"cannot read Parquet {p}: {str(e)[:200]}", "give a valid file") from None
    if "prompt" not in table.column_names:
        raise SpecError("--prompts", f"{p} has no 'prompt' column (columns: {', '.join(table.column_names)})",
                        "name the prompt column 'prompt'")
    return [(i, v if _check_prompt(v) is None else None, _check_prompt(v))
            for i, v in enumerate(table.column("prompt").to_pylist(), start=1)]
