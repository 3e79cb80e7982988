"""`specmoe job`: one plan's prompts over a Ray cluster with Ray Data (README "Finite jobs").

    dataset.py   the prompt rows (JSONL or Parquet), bad rows reported by line
    outputs.py   the sharded JSONL outputs: written once per prompt, read back to resume
    worker.py    the Ray Data actor: one Engine per worker, a batch of prompts per call
    board.py     the job's board (a Ray actor): the workers and their batches' run records
    record.py    the job record: the per-worker run records merged, predicted against measured
    driver.py    run_job(): the stream, the retries after a lost worker, Ctrl-C
"""
