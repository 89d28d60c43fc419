"""The exact path decomposition: the path integral per step and the views accumulated from it.

``api`` holds the entry points (``explain``, ``explain_history``, ``element_influence``,
``compare_quadratures``) and the ``Explanation`` they return; ``config`` the validated
``ExplainConfig``; ``setup`` what one call prepares; ``stream`` one streaming pass over the
steps; ``evaluator`` the derivatives of the explained quantity (test side); ``train_side``
the optimizer replay that splits each update (data side); ``quadrature`` the rules and the
kink search; ``at_point`` and ``scalar_ops`` the forward-mode evaluation; ``heap`` the
process heap setting every command runs under.
"""

from engine.decompose.api import (
    DTYPES,
    ENGINES,
    IMPORTANCE_SCORES,
    REGULARIZER,
    SPLITS,
    VIEWS,
    ExplainConfig,
    ExplainInterrupted,
    Explanation,
    compare_quadratures,
    element_influence,
    explain,
    explain_history,
    merge_tests,
    parse_test,
    prediction_agreement,
    resolve_device,
)

__all__ = [
    "DTYPES",
    "ENGINES",
    "IMPORTANCE_SCORES",
    "REGULARIZER",
    "SPLITS",
    "VIEWS",
    "ExplainConfig",
    "ExplainInterrupted",
    "Explanation",
    "compare_quadratures",
    "element_influence",
    "explain",
    "explain_history",
    "merge_tests",
    "parse_test",
    "prediction_agreement",
    "resolve_device",
]
