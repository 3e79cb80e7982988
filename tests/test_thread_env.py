"""The thread environment (runtime/thread_env.py): set before torch in every entry point, one OpenMP
runtime shared by torch and the verify kernel, recorded by runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from specmoe.runtime.thread_env import openmp_runtimes, thread_env_record

REPO = Path(__file__).resolve().parent.parent


def test_openmp_runtimes_from_maps_by_hand():
    maps = ("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n"
            "7f02-7f03 r--p 0 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n"
            "7f04-7f05 r-xp 0 08:01 2 /opt/torch/lib/libgomp-a34b3233.so.1\n"
            "7f06-7f07 r-xp 0 08:01 3 /usr/lib/libc.so.6\n")
    assert openmp_runtimes(maps) == ["/opt/torch/lib/libgomp-a34b3233.so.1",
                                     "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0"]
    assert openmp_runtimes("") == []


def test_torch_and_the_verify_kernel_share_one_openmp_runtime():
    import torch
    from specmoe.runtime.kernels.verify_attention import verify_attention_backend

    torch.ones(4) @ torch.ones(4)
    verify_attention_backend()                     # loads the compiled kernel where it builds
    libs = openmp_runtimes()
    if Path("/proc/self/maps").exists():
        assert len([x for x in libs if "gomp" in x or "iomp" in x]) == 1, libs
    rec = thread_env_record()
    assert rec["torch_threads"] == torch.get_num_threads() and rec["openmp_runtimes"] == libs


def test_every_entry_point_sets_the_policy_before_torch():
    """A fresh interpreter: importing the CLI, a bench script's header or specmoe.runtime sets the policy,
    and a value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for code in ("import specmoe.runtime", "import specmoe.runtime.cli.main",
                 "import runpy, sys; sys.argv = ['x', '--help']\ntry:\n    runpy.run_path('bench/gpu_offload.py', "
                 "run_name='__main__')\nexcept SystemExit:\n    pass"):
        p = subprocess.run([sys.executable, "-c", code + "\nimport os, sys; print(os.environ.get('OMP_WAIT_POLICY'), "
                            "'torch' in sys.modules)"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip().splitlines()[-1].startswith("PASSIVE"), (code, p.stdout)
    p = subprocess.run([sys.executable, "-c", "import specmoe.runtime, os; print(os.environ['OMP_WAIT_POLICY'])"],
                       env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "ACTIVE"


def test_the_run_record_keeps_the_thread_environment(tmp_path):
    import torch

    from engine_fixtures import make_pair
    from specmoe.runtime.engine import Engine, plan_for_checkpoint

    t, d = make_pair(tmp_path, "mixtral", "llama", seed=2)
    rec = Engine(plan_for_checkpoint(t, d, "devbox-2core", batch=2, draft_len=1), t, d).generate(
        [[5, 6], [7]], max_new_tokens=3).record
    te = rec.thread_env
    assert te["env"]["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"
    assert te["torch_threads"] == torch.get_num_threads() and te["openmp_runtimes"] == openmp_runtimes()
