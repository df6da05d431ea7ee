"""Promotion: move the `champion` alias, roll it back, list versions. A person decides; ftlib records.

    promote   champion -> the chosen version (by number or alias, usually `challenger`);
              the previous champion keeps the `previous-champion` alias; who, when and
              why become tags of the version. A version that failed the gate is refused
              unless forced with a reason.
    rollback  champion -> the champion before it (a stack kept as a registered-model tag,
              so repeated rollbacks walk back through history); the version rolled back
              from is tagged with who, when and why.
    versions  one row per version: aliases, gate, scores, data hash, promotion tags.

MLflow 3 aliases only; stages are deprecated and never touched.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from ftlib.core.tracking import registry_lock
from ftlib.registry.register import RegistryError, alias_version, get_version, who as current_user

STACK_TAG = "ftlib.champion_stack"      # JSON list of versions, last = current champion
HISTORY_TAG = "ftlib.champion_history"  # JSON list of every promote/rollback event


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_tag(model: Any, tag: str) -> list[Any]:
    try:
        return json.loads(model.tags.get(tag, "[]"))
    except ValueError:
        return []


def _record(c: Any, name: str, stack: list[str], event: dict[str, Any]) -> None:
    """Called under registry_lock: the read-modify-write of the stack and history tags is never interleaved."""
    model = c.get_registered_model(name)
    history = _json_tag(model, HISTORY_TAG) + [event]
    c.set_registered_model_tag(name, STACK_TAG, json.dumps(stack))
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-200:]))
    if len(stack) > 1:
        c.set_registered_model_alias(name, "previous-champion", stack[-2])
    elif alias_version(c, name, "previous-champion") is not None:
        c.delete_registered_model_alias(name, "previous-champion")


def promote(c: Any, name: str, version: str | None = None, alias: str | None = None, reason: str = "",
            force: bool = False) -> dict[str, Any]:
    """Point `champion` at a version; returns {"version", "previous", "changed"}. Serialized with every other
    promote, rollback and register of `name` on this machine, so the history never loses an event."""
    with registry_lock(name):
        return _promote(c, name, version, alias, reason, force)


def _promote(c: Any, name: str, version: str | None, alias: str | None, reason: str, force: bool) -> dict[str, Any]:
    if (version is None) == (alias is None):
        raise RegistryError("give exactly one of --version N or --alias NAME")
    mv = get_version(c, f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}")
    target = str(mv.version)
    if mv.tags.get("ftlib.gate") != "passed":
        why = mv.tags.get("ftlib.gate.reason", "no gate decision recorded (not registered by ftlib register)")
        if not force:
            raise RegistryError(f"{name} v{target} failed the gate ({why}); promote it only with --force --reason '...'")
        if not reason.strip():
            raise RegistryError("--force needs --reason: say why a version that failed the gate should serve")
    current = alias_version(c, name, "champion")
    if current is not None and str(current.version) == target:
        return {"version": target, "previous": target, "changed": False}
    who, at = current_user(), _now()
    stack = [v for v in _json_tag(c.get_registered_model(name), STACK_TAG) if v != target]
    if current is not None and (not stack or stack[-1] != str(current.version)):
        stack.append(str(current.version))  # a champion set outside ftlib joins the history
    stack.append(target)
    c.set_registered_model_alias(name, "champion", target)
    for k, v in {"ftlib.promoted_by": who, "ftlib.promoted_at": at, "ftlib.promotion_reason": reason or "(none given)",
                 "ftlib.promoted_from": str(current.version) if current else "none"}.items():
        c.set_model_version_tag(name, target, k, v)
    if force and mv.tags.get("ftlib.gate") != "passed":
        c.set_model_version_tag(name, target, "ftlib.promotion_forced", "true")
    challenger = alias_version(c, name, "challenger")
    if challenger is not None and str(challenger.version) == target:
        c.delete_registered_model_alias(name, "challenger")  # it is not challenging anymore
    _record(c, name, stack, {"action": "promote", "version": target, "from": str(current.version) if current else None,
                             "by": who, "at": at, "reason": reason, "forced": force})
    return {"version": target, "previous": str(current.version) if current else None, "changed": True}


def rollback(c: Any, name: str, reason: str = "") -> dict[str, Any]:
    """Point `champion` back at the champion before it (serialized as promote is)."""
    with registry_lock(name):
        return _rollback(c, name, reason)


def _rollback(c: Any, name: str, reason: str) -> dict[str, Any]:
    get_version(c, f"models:/{name}@champion")  # clear error when there is no champion at all
    current = str(alias_version(c, name, "champion").version)
    stack = _json_tag(c.get_registered_model(name), STACK_TAG)
    if stack and stack[-1] == current:
        stack.pop()
    if not stack:
        raise RegistryError(f"{name}: champion v{current} has no previous champion to roll back to")
    target = stack[-1]
    who, at = current_user(), _now()
    c.set_registered_model_alias(name, "champion", target)
    for k, v in {"ftlib.rolled_back_by": who, "ftlib.rolled_back_at": at, "ftlib.rollback_reason": reason or "(none given)",
                 "ftlib.rolled_back_to": target}.items():
        c.set_model_version_tag(name, current, k, v)
    _record(c, name, stack, {"action": "rollback", "version": target, "from": current, "by": who, "at": at, "reason": reason})
    return {"version": target, "previous": current, "changed": True}


def versions(c: Any, name: str) -> list[dict[str, Any]]:
    """One dict per version, newest first."""
    from mlflow.exceptions import MlflowException

    try:
        model = c.get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in c.search_registered_models()) or "none yet"
        raise RegistryError(f"no registered model named {name!r} (registered: {known})") from None
    by_version: dict[str, list[str]] = {}
    for a, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append(a)
    rows = []
    for mv in sorted(c.search_model_versions(f"name = '{name}'"), key=lambda m: -int(m.version)):
        t = mv.tags
        metric = next((k for k in ("ftlib.accuracy", "ftlib.exact_match") if k in t), None)
        rows.append({
            "version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
            "gate": t.get("ftlib.gate", "?") + (" (forced)" if t.get("ftlib.forced") == "true" else ""),
            "score": t.get(metric) if metric else None, "f1": t.get("ftlib.f1"),
            "test_md5": t.get("ftlib.lineage.data.test.md5", "")[:10], "train_md5": t.get("ftlib.lineage.data.train.md5", "")[:10],
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "promoted": f"{t['ftlib.promoted_at']} by {t['ftlib.promoted_by']}" if "ftlib.promoted_at" in t else "",
            "run_id": mv.run_id, "complete": t.get("ftlib.registered") == "true",
        })
    return rows
