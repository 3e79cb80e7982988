"""A fleet plan: one job's prompts shared among host kinds, and when the job will finish.

    from specmoe.planner.fleet import FleetJob, fleet
    f = fleet("mixtral-8x7b", [("h200-host", 64), ("a30-xeon6426y", 256)],
              FleetJob(num_prompts=1_000_000, prompt_len=566, gen_len=1024, acceptance=0.8))
    f.completion_time_s, f.tokens_per_s, [(k.name, k.prompts_per_host) for k in f.kinds]

Each host kind runs its own plan (planner.optimize for its spec, or a Plan given for it). A host
given n prompts finishes them in (planner/batch_drain.py, through estimate() at num_prompts = n)

  T(n) = prefill(n) + iterations(n) x iteration(mean live batch(n))

so T is nearly affine in n: n prompts at the steady rate plus the batch's drain at the end. The
prompts are shared in proportion to each kind's job rate at its share (prompts per second with its
drain priced in), counts included,

  n_i = N r_i / sum_j c_j r_j,      r_i = n_i / T_i(n_i),

iterated to its fixed point, where every kind's hosts finish together: n_i / r_i is the same for
all i. The kinds' plans are chosen at the even share first and chosen again at the shares found
(a host with few prompts may prefer a smaller batch or another draft length). The job completes at
max_i T_i(ceil(n_i)) (a kind's prompts split over its hosts, the busiest host taking the ceiling),
and its throughput is N gen_len over that.

`call_size`: prompts per engine call. A job streamed to its hosts in batches of S prompts drains
the batch at the end of every call: a host's n prompts then take T(S) per full call plus T(the rest).
None: one continuous stream per host.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Plan
from specmoe.planner.workload import Workload, load_acceptance

ROUNDS = 12              # share iterations at most (the fixed point is reached in 3 to 5)


@dataclass(frozen=True)
class FleetJob:
    """The job: its prompts, their mean lengths in tokens, and the draft's acceptance (a rate in
    [0, 1), a CSV path or an AcceptanceProfile)."""

    num_prompts: int
    prompt_len: int
    gen_len: int
    acceptance: Any = 0.0

    def __post_init__(self):
        for name in ("num_prompts", "prompt_len", "gen_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"job.{name}", f"must be a positive integer, got {v!r}", "give an integer >= 1")

    def workload(self, num_prompts: int) -> Workload:
        return Workload(self.prompt_len, self.gen_len, acceptance=load_acceptance(self.acceptance),
                        num_prompts=num_prompts)


@dataclass(frozen=True)
class HostKind:
    """One kind of host in the fleet and its share of the job."""

    name: str
    count: int
    batch: int
    draft_len: int
    micro_batches: int
    prompts: int                  # the kind's share of the job, over all its hosts
    prompts_per_host: int         # the busiest host's (ceil(prompts / count))
    time_s: float                 # T(prompts_per_host): when the kind's busiest host finishes
    tokens_per_s: float           # one host's job rate at its share: prompts_per_host gen_len / time_s
    steady_tokens_per_s: float    # one host's rate on an open stream (the full batch, no drain)


@dataclass(frozen=True)
class FleetPlan:
    kinds: tuple[HostKind, ...]
    num_prompts: int
    gen_len: int
    completion_time_s: float
    tokens_per_s: float           # num_prompts gen_len / completion_time_s
    call_size: int | None = None
    plans: tuple[Plan, ...] = ()  # each kind's plan, in the order of kinds

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in ("num_prompts", "gen_len", "completion_time_s", "tokens_per_s",
                                            "call_size")}
        d["kinds"] = [asdict(k) for k in self.kinds]
        return d


def host_time(plan: Plan, num_prompts: int, prompt_len: int | None = None, gen_len: int | None = None,
              call_size: int | None = None) -> float:
    """Seconds one host running `plan` takes for `num_prompts` prompts (0 for none): T(n) of the
    module doc, by calls of `call_size` prompts when given."""
    if num_prompts <= 0:
        return 0.0
    if call_size is not None and num_prompts > call_size:
        full, rest = divmod(num_prompts, call_size)
        return full * host_time(plan, call_size, prompt_len, gen_len) + host_time(plan, rest, prompt_len, gen_len)
    from specmoe.planner.estimator import estimate

    wl = replace(plan.workload_spec(), num_prompts=int(num_prompts), batch=plan.batch,
                 **({"prompt_len": prompt_len} if prompt_len else {}), **({"gen_len": gen_len} if gen_len else {}))
    k = plan.draft_len
    est = estimate(plan.model_spec(), plan.hardware_spec(), wl, draft=plan.draft_spec() if k else None, draft_len=k,
                   micro_batches=plan.micro_batches, placement=plan.placement, batch=plan.batch,
                   schedule=plan.schedule, timeline=False,
                   use_measured=bool(plan.solver.get("use_measured", True)) if isinstance(plan.solver, dict) else True)
    return float(est.job["prefill_time_s"] + est.job["decode_time_s"])


def split(num_prompts: int, rates: Sequence[float], counts: Sequence[int]) -> list[int]:
    """Each kind's prompts, in proportion to count x rate (rates per host), summing to num_prompts
    exactly (largest remainders)."""
    weights = [c * r for c, r in zip(counts, rates)]
    total = sum(weights)
    if total <= 0:
        raise SpecError("hosts", "no host kind has a positive predicted rate", "check the hosts' plans")
    exact = [num_prompts * w / total for w in weights]
    out = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (out[i] - exact[i], i))
    for i in by_remainder[: num_prompts - sum(out)]:
        out[i] += 1
    return out


def _per_host(prompts: int, count: int) -> int:
    return -(-prompts // count)


def share(plans: Sequence[Plan], counts: Sequence[int], job: FleetJob, call_size: int | None = None,
          time_of: Callable[..., float] = host_time) -> list[int]:
    """The kinds' prompts at the fixed point of the module doc (plans fixed)."""
    n = [job.num_prompts // sum(counts) * c for c in counts]
    n[0] += job.num_prompts - sum(n)
    for _ in range(ROUNDS):
        rates = []
        for plan, c, ni in zip(plans, counts, n):
            per = max(1, _per_host(ni, c))
            rates.append(per / time_of(plan, per, job.prompt_len, job.gen_len, call_size))
        new = split(job.num_prompts, rates, counts)
        if new == n:
            break
        n = new
    return n


def _check_hosts(hosts) -> list[tuple[Any, int]]:
    out = []
    if not hosts:
        raise SpecError("hosts", "no hosts given", "give (hardware spec, count) pairs, e.g. h200-host:64")
    for spec, count in hosts:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise SpecError("hosts", f"{_name(spec)}: count must be a positive integer, got {count!r}",
                            "e.g. h200-host:64")
        out.append((spec, count))
    return out


def _name(spec) -> str:
    if isinstance(spec, Plan):
        return str(spec.hardware.get("name", "plan"))
    return str(getattr(spec, "name", spec))


def fleet(model, hosts: Sequence[tuple[Any, int]], job: FleetJob, draft=None, call_size: int | None = None,
          optimize_fn: Callable[..., Plan] | None = None, time_of: Callable[..., float] = host_time) -> FleetPlan:
    """The fleet plan of `job` on `hosts`: [(hardware spec, preset name or Plan, count)]. A Plan is run
    as given; a spec gets planner.optimize(model, spec, ...) (or `optimize_fn`) at its share."""
    hosts = _check_hosts(hosts)
    if optimize_fn is None:
        from specmoe.planner.optimizer import optimize as optimize_fn
    counts = [c for _, c in hosts]

    def plans_at(shares: list[int]) -> list[Plan]:
        return [spec if isinstance(spec, Plan) else
                optimize_fn(model, spec, job.workload(max(1, _per_host(ni, c))), draft=draft)
                for (spec, c), ni in zip(hosts, shares)]

    even = [max(1, job.num_prompts * c // sum(counts)) for c in counts]
    plans = plans_at(even)
    n = share(plans, counts, job, call_size, time_of)
    if any(not isinstance(spec, Plan) for spec, _ in hosts):
        plans = plans_at(n)
        n = share(plans, counts, job, call_size, time_of)
    kinds = []
    for (spec, c), plan, ni in zip(hosts, plans, n):
        per = _per_host(ni, c)
        t = time_of(plan, per, job.prompt_len, job.gen_len, call_size)
        kinds.append(HostKind(_name(spec), c, plan.batch, plan.draft_len, plan.micro_batches, ni, per, t,
                              per * job.gen_len / t if t > 0 else 0.0, float(plan.predicted.job.get(
                                  "steady_decode_tokens_per_s", plan.predicted.decode_tokens_per_s))))
    done = max(k.time_s for k in kinds)
    return FleetPlan(tuple(kinds), job.num_prompts, job.gen_len, done,
                     job.num_prompts * job.gen_len / done if done > 0 else 0.0, call_size, tuple(plans))


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """`h200-host:64,a30-xeon6426y:256` -> [("h200-host", 64), ("a30-xeon6426y", 256)] (a missing
    count is 1)."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, _, count = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            n = int(count)
        except ValueError:
            raise SpecError("--fleet", f"{part!r}: the count {count!r} is not an integer", "e.g. h200-host:64") \
                from None
        out.append((name, n))
    return _check_hosts(out)
