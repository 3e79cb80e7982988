"""The optimizer's search (planner/optimizer.py drives it): the checked inputs and variants
(`inputs`), the batch candidates (`batches`), the closed-form costs it maximises (`costs`), the
state of one search with its solved points (`state`), the point enumeration and best-first loop
(`points`), and the chosen plan's simulation, frontier and alternatives (`results`)."""
