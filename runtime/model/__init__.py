"""The models the engine runs, split into the design's stages: the target MoE (`target.py`), the dense
draft (`draft.py`), the layer math they share (`layers.py`), the routed experts in host memory with
their device cache and streaming buffers (`expert_store.py`), and the KV caches split by sequence
between the device and host memory (`kv_cache.py`)."""
