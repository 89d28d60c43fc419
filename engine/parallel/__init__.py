"""Explanations beyond one process: tasks on Ray, shards merged into one run database.

``engine.parallel.work`` holds the unit of work (no Ray), ``engine.parallel.cluster`` the Ray
driver; ``explain_all`` runs a list of configurations either way, ``explain_intervals`` the
intervals of a checkpoint series.
"""

from engine.parallel.cluster import (
    Parallel,
    add_arguments,
    explain_all,
    explain_intervals,
    from_arguments,
    remove_shards,
)

__all__ = ["Parallel", "add_arguments", "explain_all", "explain_intervals", "from_arguments", "remove_shards"]
