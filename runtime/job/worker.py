"""The Ray Data actor of a job: one Engine per worker (host or GPU), loaded once, given a batch of
prompts per call. Each call is one Engine.generate over the batch (continuous batching inside it:
min(plan batch, prompts) rows, refilled); the rows go back to the driver, the batch's run record to
the job's board."""
from __future__ import annotations

import json
import os
import socket
import uuid

import numpy as np

RECORD_FIELDS = ("finished_sequences", "generated_tokens", "decode_tokens", "prompt_tokens", "prefill_time_s",
                 "decode_time_s", "total_time_s", "iterations", "acceptance_histogram", "token_flips", "draft_len",
                 "rows", "batch", "device", "dtype", "calibration_warnings")


class EngineWorker:
    """fn_constructor_kwargs of map_batches: the plan (as JSON), the checkpoints, Engine options,
    generate() options and the board's name."""

    def __init__(self, plan_json: str, target: str, draft: str | None, engine_options: dict, generate_options: dict,
                 board: str):
        import ray

        from specmoe.planner.plan import Plan
        from specmoe.runtime.engine import Engine

        self.engine = Engine(Plan.from_dict(json.loads(plan_json)), target, draft, **engine_options)
        self.engine.warm_up()      # one-time costs out of the first batch's record
        self.generate_options = dict(generate_options)
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.board = ray.get_actor(board)
        info = {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.engine.device), "plan_batch": self.engine.plan.batch,
                "predicted_decode_tokens_per_s": self.engine.plan.predicted.decode_tokens_per_s}
        ray.get(self.board.register.remote(self.id, info, ray.get_runtime_context().current_actor))

    def __call__(self, batch: dict) -> dict:
        import ray

        indices = [int(i) for i in batch["index"]]
        prompts = [str(p) for p in batch["prompt"]]
        res = self.engine.generate(prompts, **self.generate_options)
        batch_id = uuid.uuid4().hex
        rec = res.record.to_dict()
        ray.get(self.board.post.remote(batch_id, {"worker": self.id, "indices": len(indices),
                                                  **{k: rec.get(k) for k in RECORD_FIELDS}}))
        outs = res.outputs                       # in prompt order: out.index is the place in this batch
        return {"index": np.array([indices[o.index] for o in outs], dtype=np.int64),
                "prompt": np.array([prompts[o.index] for o in outs], dtype=object),
                "text": np.array([o.text if o.text is not None else "" for o in outs], dtype=object),
                "token_ids": np.array([np.array(o.token_ids, dtype=np.int64) for o in outs] + [None],
                                      dtype=object)[:-1],
                "finish_reason": np.array([o.finish_reason for o in outs], dtype=object),
                "worker": np.array([self.id] * len(outs), dtype=object),
                "batch_id": np.array([batch_id] * len(outs), dtype=object)}
