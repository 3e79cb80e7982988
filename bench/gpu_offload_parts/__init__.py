"""The parts of bench/gpu_offload.py (the entry script, whose docstring describes the benchmark), in the
order a run uses them:

    common.py               constants, the Deadline / StopAfter exceptions, the Log, number formatting
    session.py              one run's shared state: arguments, log, result dict, deadline alarm, runner
    machine.py              machine description, the CUDA copy-overlap probe, the --host-io choice
    planning.py             the full model's plans, the slice's budgets and plans (planner.optimize, or
                            planner.estimate by enumeration where there is no solver)
    prepare.py              the steps before the modes: machine, transfers, plans, weights and warm-up,
                            the projection and the layer fallback
    runner.py               engines (built once per placement) running one mode, and its summary
    modes.py                the measured modes in order, each recorded and the JSON rewritten after it
    accelerate_baseline.py  the transformers + accelerate baseline (--run-accelerate)
    report.py               the headline figures, the table, the goals and the summary line; the JSON

The entry script puts the bench folder on sys.path, so these import the same whether it runs as a script
or a test loads it by path.
"""
