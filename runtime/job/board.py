"""The job's board, a named Ray actor: the workers register (with their own actor handle, so the
driver and the tests can reach them) and post each batch's run record. Records outlive a worker
that dies; the job record keeps those of the batches whose rows were written."""
from __future__ import annotations


class JobBoard:
    def __init__(self):
        self.workers: dict[str, dict] = {}
        self.records: dict[str, dict] = {}

    def register(self, worker: str, info: dict, handle) -> None:
        self.workers[worker] = {**info, "handle": handle}

    def post(self, batch_id: str, record: dict) -> None:
        self.records[batch_id] = record

    def handles(self) -> dict:
        return {w: v["handle"] for w, v in self.workers.items()}

    def snapshot(self) -> tuple[dict, dict]:
        """(workers without handles, records)."""
        return {w: {k: v for k, v in d.items() if k != "handle"} for w, d in self.workers.items()}, self.records


def start_board(name: str):
    """The board actor, named `name` in the job's namespace."""
    import ray

    return ray.remote(num_cpus=0)(JobBoard).options(name=name).remote()


def worker_handles(name: str) -> dict:
    """{worker id: actor handle} of the job whose board is `name` (the tests kill one with ray.kill)."""
    import ray

    return ray.get(ray.get_actor(name).handles.remote())
