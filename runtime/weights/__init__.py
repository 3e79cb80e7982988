"""Where the engine's weights come from: Hugging Face checkpoint directories read with safetensors
(`checkpoint.py`), seeded random weights for benchmarks (`sources.py`), and the architecture the
forward needs, built from the planner's config.json parser (`arch.py`)."""
