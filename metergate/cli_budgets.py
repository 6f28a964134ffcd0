"""``metergate budgets``: a customer's budget tree (nodes, limits, attached proxy keys) over the admin API.

Every command is idempotent because the API is, by the ids it names: ``node create`` again answers with the
node that exists (a different node of that id is refused, ``already_exists``); ``limit set`` creates the limit
or, when a limit of that id with the same dimension and window exists, sets its amount. A spend amount is a
decimal in the asset's major unit (``--amount 5.00 --asset USD``), turned into the asset's smallest unit
exactly: more decimal places than the asset has is a usage error, never a rounding. Request and token
amounts are whole numbers.

``alert set`` puts threshold alerts on a limit (``limit:<id>``) or a balance (``balance:<asset>``): percents of
it, or amounts in its unit (a spend limit's or a balance's amount in the asset's major unit, as above); each
fires once per period and says once when it recovered. ``alert fired`` lists which fired.
"""

from __future__ import annotations

import argparse
from decimal import Decimal
from types import EllipsisType
from typing import TYPE_CHECKING, Any

from metergate.cli_admin import EXIT_CODES, EXIT_OK, _amount, _one_line
from metergate.cli_table import dump, table

if TYPE_CHECKING:
    from metergate_client import BudgetLimit, BudgetTree, BudgetWindow, Client

KINDS = ("agent", "project", "team", "end_user")
DIMENSIONS = ("spend", "tokens", "requests")


def _subgroup(parent: Any, name: str, help: str) -> Any:
    nested = parent.add_parser(name, help=help).add_subparsers(dest=f"budgets_{name}_command", required=True,
                                                               metavar="COMMAND")
    nested_add = nested.add_parser
    nested.add_parser = lambda n, **kw: _one_line(nested_add(n, **{"epilog": EXIT_CODES, **kw}))
    return nested


def add_commands(budgets: Any, common: argparse.ArgumentParser) -> None:
    """Register tree, node, limit, alert, attach-key and detach-key on the ``budgets`` group."""
    p = budgets.add_parser("tree", parents=[common], help="the budget tree: nodes, limits and their use, keys")
    p.add_argument("customer")
    p.set_defaults(admin_handler=tree)

    nodes = _subgroup(budgets, "node", "create, change and delete budget nodes")
    p = nodes.add_parser("create", parents=[common], help="create a node (idempotent by its id)")
    p.add_argument("customer")
    p.add_argument("node_id")
    p.add_argument("--parent", default=None, help="the parent node (default: root, the customer itself)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--name", default="")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="the models (or patterns such as gpt-4o*) the node's subtree may use (default: any)")
    p.set_defaults(admin_handler=node_create)
    p = nodes.add_parser("update", parents=[common], help="rename a node or change the models it may use")
    p.add_argument("customer")
    p.add_argument("node_id")
    p.add_argument("--name")
    models = p.add_mutually_exclusive_group()
    models.add_argument("--models", nargs="+", metavar="MODEL")
    models.add_argument("--any-model", action="store_true", help="lift the node's model restriction")
    p.set_defaults(admin_handler=node_update)
    p = nodes.add_parser("delete", parents=[common], help="delete a leaf node, its limits and key attachments")
    p.add_argument("customer")
    p.add_argument("node_id")
    p.set_defaults(admin_handler=node_delete)

    limits = _subgroup(budgets, "limit", "set and delete limits on budget nodes")
    p = limits.add_parser("set", parents=[common], help="put a limit on a node, or change its amount")
    p.add_argument("customer")
    p.add_argument("node_id")
    p.add_argument("--dimension", required=True, choices=DIMENSIONS)
    p.add_argument("--amount", required=True, type=_amount,
                   help="requests or tokens (a whole number), or spend in the asset's major unit (5.00)")
    p.add_argument("--window", required=True,
                   help="day, week, month (UTC), fixed:5m (epoch-aligned) or rolling:1h[/BUCKETS]")
    p.add_argument("--asset", help="spend limits: the asset of --amount (required for spend)")
    p.add_argument("--id", dest="limit_id", help="the limit's id (default: NODE-DIMENSION-WINDOW)")
    p.set_defaults(admin_handler=limit_set)
    p = limits.add_parser("delete", parents=[common], help="delete a limit")
    p.add_argument("customer")
    p.add_argument("limit_id")
    p.set_defaults(admin_handler=limit_delete)

    alerts = _subgroup(budgets, "alert", "threshold alerts on limits and balances, and which fired")
    p = alerts.add_parser("list", parents=[common], help="the customer's alert rules")
    p.add_argument("customer")
    p.set_defaults(admin_handler=alert_list)
    p = alerts.add_parser("set", parents=[common], help="put thresholds on a limit or a balance (idempotent by id)")
    p.add_argument("customer")
    p.add_argument("rule_id")
    p.add_argument("--on", dest="target", required=True, metavar="TARGET",
                   help="limit:<limit id> or balance:<asset>")
    p.add_argument("--percent", nargs="+", type=int, default=[], metavar="P",
                   help="thresholds in percent (1-100) of the limit, or of the credit posted for a balance")
    p.add_argument("--amount", nargs="+", type=_amount, default=[], metavar="AMOUNT",
                   help="absolute thresholds in the target's unit (spend and balances: the asset's major unit); "
                        "a balance fires when it falls to the amount or below")
    p.set_defaults(admin_handler=alert_set)
    p = alerts.add_parser("delete", parents=[common], help="delete an alert rule")
    p.add_argument("customer")
    p.add_argument("rule_id")
    p.set_defaults(admin_handler=alert_delete)
    p = alerts.add_parser("fired", parents=[common], help="the thresholds that fired, active first")
    p.add_argument("customer")
    p.set_defaults(admin_handler=alert_fired)

    p = budgets.add_parser("attach-key", parents=[common],
                           help="charge a proxy key's requests along a node's path (a node of the key's customer)")
    p.add_argument("key_id")
    p.add_argument("node_id")
    p.set_defaults(admin_handler=attach_key)
    p = budgets.add_parser("detach-key", parents=[common], help="charge a proxy key's requests to the root again")
    p.add_argument("key_id")
    p.set_defaults(admin_handler=detach_key)


# ---------------------------------------------------------------------- amounts


def minor_units(amount: Decimal, scale: int, asset: str) -> int:
    """``amount`` in the asset's major unit as its exact smallest unit; more places than ``scale`` is refused."""
    minor = amount.scaleb(scale)
    if minor != minor.to_integral_value():
        raise ValueError(f"--amount {amount} has more decimal places than {asset} has ({scale})")
    return int(minor)


def _shown(client: Client, limit: BudgetLimit, minor: int) -> str:
    if limit.dimension != "spend" or limit.asset is None:
        return str(minor)
    from metergate_client.models import to_major

    return f"{to_major(minor, client.asset_scale(limit.asset))} {limit.asset}"


# ---------------------------------------------------------------------- handlers


def tree(client: Client, args: argparse.Namespace) -> int:
    found = client.budget_tree(args.customer)
    if args.json:
        dump(found.raw)
        return EXIT_OK
    table(["node", "kind", "name", "limit", "dimension", "window", "used", "amount", "remaining", "keys"],
          _tree_rows(client, found))
    return EXIT_OK


def _tree_rows(client: Client, found: BudgetTree) -> list[list[object]]:
    """One row per limit (a node without limits: one row), nodes indented under their parents."""
    rows: list[list[object]] = []
    for view in found.nodes:
        depth = view.path.count("/")
        head = ["  " * depth + view.node.id, view.node.kind, view.node.name or "-"]
        keys = ",".join(view.api_keys) or "-"
        if not view.limits:
            rows.append([*head, "-", "-", "-", "-", "-", "-", keys])
        for i, use in enumerate(view.limits):
            limit = use.limit
            rows.append([*(head if i == 0 else ["", "", ""]), limit.id, limit.dimension, str(limit.window),
                         _shown(client, limit, use.used), _shown(client, limit, limit.amount),
                         _shown(client, limit, use.remaining), keys if i == 0 else ""])
    return rows


def node_create(client: Client, args: argparse.Namespace) -> int:
    node = client.create_budget_node(args.customer, args.node_id, args.kind, parent_id=args.parent, name=args.name,
                                     allowed_models=args.models)
    if args.json:
        dump(node.raw)
    else:
        print(f"budget node {node.id} ({node.kind}) under {node.parent_id} of {args.customer}")
    return EXIT_OK


def node_update(client: Client, args: argparse.Namespace) -> int:
    models: list[str] | EllipsisType | None = ... if args.models is None else args.models
    if args.any_model:
        models = None
    if args.name is None and models is ...:
        raise ValueError("nothing to change: give --name, --models or --any-model")
    node = client.update_budget_node(args.customer, args.node_id, name=args.name, allowed_models=models)
    if args.json:
        dump(node.raw)
    else:
        allowed = "any" if node.allowed_models is None else ", ".join(node.allowed_models)
        print(f"budget node {node.id}: name {node.name!r}, models {allowed}")
    return EXIT_OK


def node_delete(client: Client, args: argparse.Namespace) -> int:
    done = client.delete_budget_node(args.customer, args.node_id)
    if args.json:
        dump(done.raw)
    else:
        print(f"deleted budget node {done.id} of {args.customer}, with its limits and key attachments")
    return EXIT_OK


def limit_set(client: Client, args: argparse.Namespace) -> int:
    from metergate_client import BudgetWindow, Conflict

    window = BudgetWindow.parse(args.window)
    amount: Decimal = args.amount
    if args.dimension == "spend":
        if args.asset is None:
            raise ValueError("a spend limit needs --asset (the asset of --amount)")
        minor = minor_units(amount, client.asset_scale(args.asset), args.asset)
    else:
        if args.asset is not None:
            raise ValueError("only spend limits take --asset")
        minor = minor_units(amount, 0, args.dimension)
    limit_id = args.limit_id or f"{args.node_id}-{args.dimension}-{args.window.replace('/', '-')}"
    try:
        limit = client.create_budget_limit(args.customer, args.node_id, limit_id, dimension=args.dimension,
                                           amount=minor, window=window, asset=args.asset)
    except Conflict as exc:
        existing = _limit(client, args.customer, limit_id)
        if exc.code != "already_exists" or existing is None or not _same(existing, args, window):
            raise
        limit = client.update_budget_limit(args.customer, limit_id, minor)
    if args.json:
        dump(limit.raw)
    else:
        print(f"limit {limit.id} on {limit.node_id}: {_shown(client, limit, limit.amount)} {limit.dimension} per "
              f"{limit.window} (version {limit.version})")
    return EXIT_OK


def _same(limit: BudgetLimit, args: argparse.Namespace, window: BudgetWindow) -> bool:
    """The limit ``set`` names, but for its amount (a rolling window given without buckets: the server's)."""
    buckets = limit.window.buckets if window.buckets is None else window.buckets
    return (limit.node_id, limit.dimension, limit.asset, limit.window) == (
        args.node_id, args.dimension, args.asset, type(window)(window.kind, window.length_s, buckets))


def _limit(client: Client, customer: str, limit_id: str) -> BudgetLimit | None:
    for view in client.budget_tree(customer).nodes:
        for use in view.limits:
            if use.limit.id == limit_id:
                return use.limit
    return None


def limit_delete(client: Client, args: argparse.Namespace) -> int:
    done = client.delete_budget_limit(args.customer, args.limit_id)
    if args.json:
        dump(done.raw)
    else:
        print(f"deleted limit {done.id} of {args.customer}")
    return EXIT_OK


def attach_key(client: Client, args: argparse.Namespace) -> int:
    done = client.attach_key(args.key_id, args.node_id)
    if args.json:
        dump(done.raw)
    else:
        print(f"key {done.key_id} of {done.customer_id} now charges along budget node {done.node_id}")
    return EXIT_OK


def detach_key(client: Client, args: argparse.Namespace) -> int:
    done = client.attach_key(args.key_id, None)
    if args.json:
        dump(done.raw)
    else:
        print(f"key {done.key_id} of {done.customer_id} now charges to the root")
    return EXIT_OK


def alert_list(client: Client, args: argparse.Namespace) -> int:
    rules = client.list_budget_alerts(args.customer)
    if args.json:
        dump([rule.raw for rule in rules])
        return EXIT_OK
    table(["rule", "on", "thresholds"], [[rule.id, rule.target, ", ".join(
        f"{value}%" if kind == "percent" else str(value) for kind, value in rule.thresholds)] for rule in rules])
    return EXIT_OK


def alert_set(client: Client, args: argparse.Namespace) -> int:
    if not args.percent and not args.amount:
        raise ValueError("give at least one threshold: --percent or --amount")
    if any(not 1 <= p <= 100 for p in args.percent):
        raise ValueError("--percent thresholds are from 1 to 100")
    kind, _, name = args.target.partition(":")
    if kind not in ("limit", "balance") or not name:
        raise ValueError("--on is limit:<limit id> or balance:<asset>")
    asset = name if kind == "balance" else None
    if kind == "limit" and args.amount:
        limit = _limit(client, args.customer, name)
        if limit is None:
            raise ValueError(f"{args.customer} has no budget limit {name!r}")
        asset = limit.asset if limit.dimension == "spend" else None
    scale = client.asset_scale(asset) if asset is not None else 0
    amounts = [minor_units(a, scale, asset or "a request or token count") for a in args.amount]
    rule = client.set_budget_alert(args.customer, args.rule_id, args.target, percents=args.percent,
                                   amounts=amounts)
    if args.json:
        dump(rule.raw)
    else:
        print(f"alert {rule.id} on {rule.target}: {len(rule.thresholds)} threshold(s)")
    return EXIT_OK


def alert_delete(client: Client, args: argparse.Namespace) -> int:
    done = client.delete_budget_alert(args.customer, args.rule_id)
    if args.json:
        dump(done.raw)
    else:
        print(f"deleted alert {done.id} of {args.customer}")
    return EXIT_OK


def alert_fired(client: Client, args: argparse.Namespace) -> int:
    import datetime as dt

    def when(ms: int | None) -> str:
        return "-" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")

    fired = client.list_fired_budget_alerts(args.customer)
    if args.json:
        dump([alert.raw for alert in fired])
        return EXIT_OK
    table(["state", "rule", "on", "threshold", "fired (UTC)", "recovered (UTC)"],
          [["active" if a.active else "recovered", a.rule_id, a.target, a.threshold, when(a.fired_at_ms),
            when(a.recovered_at_ms)] for a in fired])
    return EXIT_OK
