"""`specmoe calibrate` and `specmoe profile-acceptance`: the machine's measured curves (`measure.py`),
the engine's fixed costs timed (`overhead.py`) and fitted (`overhead_fit.py`), the spec written from
them with its cache (`spec.py`, driven by `run.py`), the machine-speed probe (`speed_probe.py`) and
the draft's measured acceptance (`acceptance.py`)."""
