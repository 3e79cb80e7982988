"""A job's outputs: JSON lines in shards under --outputs DIR (part-00000.jsonl, ...), one row per
prompt: index, prompt, text, token_ids (generated tokens only), finish_reason, worker.

Only the driver writes them (planner/atomic_file.py's LineWriter: whole lines, a lock per shard),
as the rows stream back from the workers, and only once per index: a row whose index is already
on disk is dropped (a batch retried after a lost worker). A resumed job reads what is on disk
(`scan`), checks that it is the same job (`job.manifest.json`: the dataset's hash, the plan's and
the generation settings) and writes new shards after the old ones; a shard cut in half a line by a
killed driver is rewritten with its whole lines (atomic_write_text), the prompt of the half line
run again."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from specmoe.planner.atomic_file import LineWriter, atomic_write_text
from specmoe.planner.errors import SpecError

SHARD = re.compile(r"^part-(\d{5,})\.jsonl$")
MANIFEST = "job.manifest.json"


@dataclass
class OnDisk:
    """What an outputs directory holds: the indices written and the shards."""

    done: set[int] = field(default_factory=set)
    shards: list[Path] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)    # shards whose half line was cut

    @property
    def next_shard(self) -> int:
        nums = [int(SHARD.match(s.name).group(1)) for s in self.shards]
        return max(nums) + 1 if nums else 0


def check_directory(path: str | Path, create: bool = True) -> Path:
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise SpecError("--outputs", f"{d} exists and is not a directory", "give a directory (created if missing)")
    if not d.parent.is_dir():
        raise SpecError("--outputs", f"directory {d.parent} does not exist", "create it first")
    if create:
        d.mkdir(exist_ok=True)
    return d


def scan(directory: Path, repair: bool = True) -> OnDisk:
    """The indices on disk (whole lines with an integer index); a torn last line is cut off (`repair`)."""
    found = OnDisk()
    for s in sorted(p for p in directory.iterdir() if SHARD.match(p.name)):
        found.shards.append(s)
        text = s.read_text(encoding="utf-8", errors="surrogateescape")
        whole, _, tail = text.rpartition("\n")
        if tail and repair:
            atomic_write_text(s, whole + "\n" if whole else "")
            found.repaired.append(s.name)
        for line in whole.splitlines():
            try:
                found.done.add(int(json.loads(line)["index"]))
            except (ValueError, KeyError, TypeError):
                raise SpecError("--outputs", f"{s} holds a line that is not an output row", "give a job's own "
                                "outputs directory, or a new one") from None
    return found


def check_manifest(directory: Path, manifest: dict, resuming: bool) -> None:
    """Write the job's manifest; on resume, refuse a directory holding another job's outputs."""
    path = directory / MANIFEST
    if resuming and path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        for key, value in manifest.items():
            if old.get(key) != value:
                raise SpecError("--outputs", f"{directory} holds the outputs of another job ({key} differs: "
                                f"{str(old.get(key))[:40]} there, {str(value)[:40]} now)",
                                "give a new directory, or the same prompts, plan and settings to resume")
    atomic_write_text(path, json.dumps(manifest, indent=1))


class ShardWriter:
    """Rows appended to part-NNNNN.jsonl, a new shard every `rows_per_shard` rows; each index once."""

    def __init__(self, directory: Path, first_shard: int, done: set[int], rows_per_shard: int = 10000):
        self.directory, self.number, self.rows_per_shard = directory, first_shard, int(rows_per_shard)
        self.done = done
        self.writer: LineWriter | None = None
        self.written = 0
        self.duplicates = 0
        self.shards: list[str] = []

    def add(self, row: dict) -> bool:
        """Write `row` unless its index is on disk already; True when written."""
        if row["index"] in self.done:
            self.duplicates += 1
            return False
        if self.writer is None or self.writer.lines >= self.rows_per_shard:
            self.close()
            path = self.directory / f"part-{self.number:05d}.jsonl"
            self.number += 1
            self.writer = LineWriter(path, "--outputs")
            self.shards.append(path.name)
        self.writer.write_line(json.dumps(row))
        self.done.add(row["index"])
        self.written += 1
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
