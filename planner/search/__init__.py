"""The optimizer's search (planner/optimizer.py drives it): the checked inputs and variants
(`inputs`), the batch candidates (`batches`), the closed-form costs it maximises (`costs`), the
state of one search with its solved points (`state`), the point enumeration and best-first loop
(`points`), the choice by the event simulator (`ranking`, with the simulator's bound over a point's
placements in `sim_bound` and the placement it improves in `refine`), and the chosen plan's simulation,
frontier and alternatives (`results`)."""
