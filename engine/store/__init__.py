"""The run database: the only SQL of the product.

``schema`` describes the tables and the bundle the engine hands over, ``writer`` builds a
database and publishes it atomically, ``reader`` answers the dashboard's queries.
"""

from engine.store.reader import RunDB, info
from engine.store.schema import (
    ALL_TESTS,
    DEFAULT_THREADS,
    LEVELS,
    MEASURES,
    READABLE_VERSIONS,
    REGULARIZER,
    REQUIRED_TABLES,
    RUN_SUFFIX,
    SCHEMA_VERSION,
    VIEW_TABLES,
    RunBundle,
    RunMeta,
    TestSelector,
    list_runs,
    run_path,
    validate_run_name,
)
from engine.store.writer import add_progress, add_pruning, check_target, write_run, writer_lock

__all__ = [
    "ALL_TESTS",
    "DEFAULT_THREADS",
    "LEVELS",
    "MEASURES",
    "READABLE_VERSIONS",
    "REGULARIZER",
    "REQUIRED_TABLES",
    "RUN_SUFFIX",
    "SCHEMA_VERSION",
    "VIEW_TABLES",
    "RunBundle",
    "RunDB",
    "RunMeta",
    "TestSelector",
    "add_progress",
    "add_pruning",
    "check_target",
    "info",
    "list_runs",
    "run_path",
    "validate_run_name",
    "write_run",
    "writer_lock",
]
