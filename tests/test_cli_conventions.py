"""The CLI conventions of the field: llama-bench style sweeps in `specmoe estimate`, `--version`, `plan
--json` without `-o`, `--objective latency` printing what it optimised, lower-case unit flags with the old
spelling kept, and `--model` taking a Hugging Face model id from the local cache (offline)."""
from __future__ import annotations

import csv
import io
import json
import shutil

import pytest

from specmoe.planner.model_spec import PRESET_DIR, hf_cache_config, load_model
from specmoe.runtime.cli.main import main

EST = ["estimate", "--model", "mixtral-8x7b", "--hardware", "a30-xeon6426y", "--prompt-len", "566", "--gen-len", "1024"]


def test_estimate_sweep_as_csv_one_row_per_combination(capsys):
    assert main(EST + ["--batch", "64,128", "--draft-len", "0,2", "--acceptance", "0.8", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["batch"], r["draft_len"]) for r in rows] == [("64", "0"), ("64", "2"), ("128", "0"), ("128", "2")]
    # each row is the single estimate of its combination
    assert main(EST + ["--batch", "128", "--draft-len", "2", "--acceptance", "0.8", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert float(rows[3]["decode_tokens_per_s"]) == pytest.approx(one["decode_tokens_per_s"], rel=1e-9)
    assert float(rows[3]["iteration_ms"]) == pytest.approx(one["iteration_time_s"] * 1e3, rel=1e-9)


@pytest.mark.parametrize("fmt, check", [
    ("md", lambda out: out.splitlines()[1].startswith("|---:") and len(out.splitlines()) == 2 + 3),
    ("json", lambda out: [r["micro_batches"] for r in json.loads(out)] == [1, 2, 4]),
    ("table", lambda out: out.split()[:3] == ["batch", "m", "k"] and len(out.splitlines()) == 4)])
def test_estimate_sweep_formats(capsys, fmt, check):
    assert main(EST + ["--batch", "64", "--micro-batches", "1,2,4", "--format", fmt]) == 0
    assert check(capsys.readouterr().out)


def test_estimate_sweep_errors_name_the_flag(capsys):
    assert main(EST + ["--batch", "64,x"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert main(EST + ["--draft-len", "0,2,2", "--acceptance", "0.8"]) == 2
    assert "--draft-len: repeats a value" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip().startswith("specmoe 0.")


def test_plan_json_without_output_and_latency_objective(capsys, tmp_path):
    args = ["plan", "--model", "mixtral-8x7b", "--hardware", "a30-xeon6426y", "--prompt-len", "566",
            "--gen-len", "1024", "--acceptance", "0.8", "--max-draft-len", "2", "--micro-batches", "2"]
    assert main(args + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["draft_len"] <= 2 and plan["schema_version"] >= 2 and not list(tmp_path.iterdir())
    assert main(args + ["--objective", "latency", "--min-throughput", "50"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "optimised: per-token latency" in x)
    assert "not written" in out
    assert float(line.split("latency ")[1].split(" ms")[0]) > 0


def test_unit_flags_lower_case_with_the_old_spelling_kept(capsys):
    assert main(EST + ["--gpu-mem-gib", "48", "--json"]) == 0
    new = json.loads(capsys.readouterr().out)
    assert main(EST + ["--gpu-mem-GiB", "48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == new
    assert main(EST + ["--gpu-mem-gib", "-1"]) == 2 and "--gpu-mem-gib" in capsys.readouterr().err


def test_model_id_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--mistralai--Mixtral-8x7B-v0.1" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    shutil.copy(PRESET_DIR / "mixtral-8x7b.json", snap / "config.json")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hf_cache_config("mistralai/Mixtral-8x7B-v0.1") == snap / "config.json"
    m = load_model("mistralai/Mixtral-8x7B-v0.1")
    assert m.name == "Mixtral-8x7B-v0.1" and m.num_experts == load_model("mixtral-8x7b").num_experts
    assert hf_cache_config("mistralai/not-there") is None and hf_cache_config("../../etc/passwd") is None
    assert main(["estimate", "--model", "mistralai/Mixtral-8x7B-v0.1", "--hardware", "a30-xeon6426y",
                 "--prompt-len", "64", "--gen-len", "64", "--json"]) == 0


def test_a_typo_in_a_spec_or_plan_names_the_nearest_key(tmp_path):
    import yaml

    from specmoe.planner.errors import SpecError
    from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware
    from specmoe.planner.optimizer import optimize
    from specmoe.planner.plan import Plan
    from specmoe.planner.workload import Workload, load_acceptance

    raw = json.loads(json.dumps(HardwareSpec.preset("a30-xeon6426y").raw))
    raw["link"]["h2d_GBs"] = raw["link"].pop("h2d_GBps")
    with pytest.raises(SpecError, match=r"link\.h2d_GBs: unknown key \(did you mean `h2d_GBps`\?\)"):
        parse_hardware(raw, "box.yaml")
    raw = json.loads(json.dumps(HardwareSpec.preset("a30-xeon6426y").raw))
    raw["gpu"]["colour"] = "green"
    with pytest.raises(SpecError, match=r"gpu\.colour: unknown key \(valid keys: hbm_GBps"):
        parse_hardware(raw, "box.yaml")
    for f in sorted((PRESET_DIR.parent.parent / "hw_specs").glob("*.yaml")):     # every bundled spec still parses
        parse_hardware(yaml.safe_load(f.read_text()), str(f))
    plan = optimize("mixtral-8x7b", "a30-xeon6426y", Workload(64, 32, acceptance=load_acceptance(0.5)),
                    k_values=(0,), micro_batch_values=(1,), alternatives=0, timeline=False)
    d = plan.to_dict()
    d["micro_batch"] = d.pop("micro_batches")
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(SpecError, match=r"plan\.micro_batch: unknown key \(did you mean `micro_batches`\?\)"):
        Plan.from_json(tmp_path / "p.json")
