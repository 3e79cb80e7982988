"""specmoe runtime: the engine that executes a planner Plan.

Importing this package never imports torch. It sets the thread environment (OMP_WAIT_POLICY=PASSIVE,
unless already set; runtime/thread_env.py) before torch can be imported: torch and the verify-attention
kernel share one OpenMP runtime that reads this setting once, and spinning OpenMP threads on a shared
or small machine made small operations up to 10x slower (a 2-thread call took 21 ms instead of 1.7 ms
under load).
"""
from specmoe.runtime.thread_env import apply_thread_env as _apply_thread_env

_apply_thread_env()
