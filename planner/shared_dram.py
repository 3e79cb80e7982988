"""Host DRAM shared by the expert stream and the CPU's reads (DESIGN.md: 67 -> 53 GB/s of CPU DRAM read
on the H200 host while H2D streamed). The pinned expert copies are DMA reads of host DRAM, and so are the
KV reads of CPU verify attention; where a spec measures their contention (hardware_spec.DramContention)
each slows the other while both run.

Per kind of CPU event the cost model derives (roofline.dram_sharing):
    stretch   how much longer the event runs for the time a copy runs beside it: its DRAM reads get
              f_cpu of their rate, so a DRAM-bound event stretches by 1 / f_cpu, a compute-bound one less
    pressure  the share of its time it reads DRAM at the full rate (what slows the copies)
and a copy runs 1 + (1/f_h2d - 1) x pressure times longer beside a CPU event of that pressure.

The simulator (planner/simulator.py) advances a running event at 1/stretch of its rate while the other
side runs. The closed form and the MILP pair a layer's CPU work t_c with its copies t_h: they run side
by side until the first is done, then the other alone. With r_c, r_h the two stretches and
1/r_c + 1/r_h >= 1 (running together is no slower than taking turns; the spec parser checks it), the pair
takes exactly
    max(t_c + (1 - 1/r_c) r_h t_h,  t_h + (1 - 1/r_h) r_c t_c)
(the first line when the copies finish first: their r_h t_h of overlap cost the CPU (1 - 1/r_c) of that
time; the second the other way round; the lines differ by (r_c t_c - r_h t_h)(1/r_c + 1/r_h - 1)), a max
of lines, as the MILP's epigraph rows need.
"""
from __future__ import annotations

from dataclasses import dataclass

from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.roofline import OpCost, cpu_dram_sharing

# one CPU operation: its OpCost and the keyword arguments of roofline.time_on that time it (dtype, kind, ...)
CpuOp = tuple[OpCost, dict]


@dataclass(frozen=True)
class SharedDram:
    """The stretches and pressures of one configuration's events (module docstring). The stretch applies
    to an event's whole time, its fixed cost too."""

    attn_cpu: tuple[float, float]                  # target verify attention on the CPU: (stretch, pressure)
    moe_cpu: tuple[float, float]                   # non-resident experts computed on the CPU
    draft_cpu: tuple[tuple[float, float], ...]     # [K] the draft's CPU attention, per step
    pcie_stretch: float                            # a copy beside a CPU event of pressure 1: 1 / f_h2d

    def pcie_beside(self, pressure):
        """How much longer a copy runs beside a CPU event of this pressure."""
        return 1.0 + (self.pcie_stretch - 1.0) * pressure

    def pair_coefficients(self, cpu: tuple) -> tuple:
        """(a, b) of the pair's lines T >= t_c + a t_h and T >= t_h + b t_c for CPU work of (stretch,
        pressure) `cpu` (module docstring); numbers, or numpy arrays of one per layer."""
        r_c, r_h = cpu[0], self.pcie_beside(cpu[1])
        return (1.0 - 1.0 / r_c) * r_h, (1.0 - 1.0 / r_h) * r_c


def shared_dram(hw: HardwareSpec, use_measured: bool, attention: CpuOp, cpu_expert: CpuOp | None,
                draft_steps: list[CpuOp]) -> SharedDram | None:
    """The SharedDram of one configuration from its CPU operations (one sequence's verify attention, one
    CPU-computed expert, one sequence's draft attention per step); None without a measured contention,
    with use_measured=False, or on a host whose GPU is its CPU (nothing overlaps there anyway)."""
    c = hw.measured.dram_contention
    if c is None or not use_measured or hw.gpu.shares_host_cpu:
        return None

    def share(op: CpuOp) -> tuple[float, float]:
        return cpu_dram_sharing(hw, op[0], use_measured=True, **op[1])

    return SharedDram(attn_cpu=share(attention), moe_cpu=share(cpu_expert) if cpu_expert else (1.0, 0.0),
                      draft_cpu=tuple(share(d) for d in draft_steps), pcie_stretch=1.0 / c.h2d_share)
