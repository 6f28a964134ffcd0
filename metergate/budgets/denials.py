"""What a request refused by a budget is told: which node refused, which limit, its use, when to retry.

Every refusal names the node (``node``, and its ``node_path`` from the customer down) in the provider's
error envelope (:mod:`metergate.errors`; the HTTP mapping stays in :mod:`metergate.http`):

* 429 ``budget_exceeded``: a node's limit (requests, tokens or spend per window) is used up, with
  ``limit`` (id, dimension, amount, window), ``used`` (claimed in the window, all replicas) and
  ``retry_after_s`` (also ``Retry-After``), the time until the window frees enough for this request, and
  ``x-should-retry: true`` only when that is at most a minute away and the request fits the limit at all;
* 403 ``model_not_allowed``: a node on the path does not allow the request's model;
* 400 ``unknown_budget_node`` / 403 ``untrusted_budget_node_header``: a bad or untrusted node header.

No portal link: a customer cannot lift a limit by paying (a 402 for funds keeps its top-up link).
"""

from __future__ import annotations

from metergate.budgets.model import Limit, Node, path_text
from metergate.errors import Forbidden, TooManyRequests


class BudgetExceeded(TooManyRequests):
    def __init__(self, path: tuple[Node, ...], node: Node, limit: Limit, used: int, need: int,
                 retry_after_ms: int) -> None:
        retry_after_s = max(1, -(-retry_after_ms // 1000))
        if need > limit.amount:
            message = (f"This request alone needs {need} of budget node {node.id!r}'s limit of {limit.describe()}; "
                       "it can never fit.")
        else:
            message = (f"Budget node {node.id!r} has used {used} of its limit of {limit.describe()}; this request "
                       f"needs {need}. Retry after {retry_after_s} s.")
        super().__init__(message, retry_after_s=retry_after_s, code="budget_exceeded", node=node.id,
                         node_path=path_text(path), limit=limit.as_json(), used=used, needed=need)
        # Worth an SDK's automatic retry only when it can succeed soon: never for a request larger than the
        # limit, and not for a window that frees in more than a minute (the SDKs would sleep that long).
        self._retry = need <= limit.amount and retry_after_s <= 60

    @property
    def should_retry(self) -> bool | None:
        return self._retry


class ModelNotAllowed(Forbidden):
    def __init__(self, path: tuple[Node, ...], node: Node, model: str) -> None:
        super().__init__(f"Budget node {node.id!r} does not allow model {model!r}.", code="model_not_allowed",
                         param="model", node=node.id, node_path=path_text(path),
                         allowed_models=list(node.allowed_models or ()))
