#!/usr/bin/env python3
"""Check JSONL event streams against the official `openai` package's typed models.

Usage: python3 scripts/check_events.py FILE_OR_DIR...

Each argument is a JSONL file, or a directory whose `*.jsonl` files (searched recursively) are
all checked. A file holds the events of ONE response, one JSON object per line, in stream order.
Prints one line per file (`PATH: ok N events`, or `PATH: FAIL` and the errors indented below it)
and exits 1 if any file fails.

What is checked, per line:
  * the line is a JSON object with a string `type`;
  * a Responses stream event (`openai.types.responses.ResponseStreamEvent`) is validated by the
    model that its `type` names, and the union (`TypeAdapter(ResponseStreamEvent)`) must pick the
    same model;
  * a WebSocket error frame (`{"type":"error","status":N,"error":{...}}`, SPEC §3) is validated
    by `ResponseWsError` from `openai.types.responses.responses_server_event` plus the relay's
    own rules: `status` is a 4xx/5xx int, `error.type`, `error.code`, `error.message` are
    strings, `error.param` is present and a string or null;
  * strictness beyond pydantic: the openai models accept unknown keys silently, so every key the
    models do not declare is an error (except the short KNOWN_UNTYPED list below: fields the real
    API sends that the typed models lack), and the validated model must dump back to the input
    (catches coercions such as "3" -> 3 or 1 -> true);
  * semantic rules of the API: a terminal event's `response.status` matches its type, a
    `response.failed` carries `error`, a `response.incomplete` carries `incomplete_details`, a
    `response.completed` carries `usage`; usage has cached <= input, reasoning <= output and
    total == input + output.
Per file:
  * `sequence_number` increases by exactly 1 from its first value (lines without one, i.e. a
    WebSocket error frame without `sequence_number`, are skipped);
  * every `response.*` event carrying a response object names the same response id;
  * exactly one terminal event (`response.completed`, `response.failed`, `response.incomplete`
    or `error`) and it is the last line. Files named `*.partial.jsonl` hold a stream that was
    cut on purpose (client disconnect, preemption) and must have NO terminal event instead.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

PINNED_OPENAI = "3.54.0"
MAX_ERRORS_PER_FILE = 20

try:
    import openai
    import pydantic
    from openai.types.responses import ResponseStreamEvent
    from openai.types.responses.responses_server_event import ResponseWsError
except ImportError as exc:  # pragma: no cover - environment problem
    sys.stderr.write(
        f"check_events.py: cannot import the openai package ({exc}); "
        "install scripts/requirements.txt into a venv first\n"
    )
    sys.exit(2)

TERMINAL_RESPONSE_TYPES = {
    "response.completed": "completed",
    "response.failed": "failed",
    "response.incomplete": "incomplete",
}
TERMINAL_TYPES = set(TERMINAL_RESPONSE_TYPES) | {"error"}

# Fields the real API sends that the typed models do not declare. Keyed by model class name,
# each with the Python type its value must have. Keep this list short and justified.
KNOWN_UNTYPED: Dict[str, Dict[str, Tuple[type, ...]]] = {
    # The API echoes the request's `store` in every response object.
    "Response": {"store": (bool,)},
    # Stream obfuscation padding (`stream_options.include_obfuscation`, on by default).
    "ResponseTextDeltaEvent": {"obfuscation": (str,)},
    "ResponseFunctionCallArgumentsDeltaEvent": {"obfuscation": (str,)},
    "ResponseReasoningSummaryTextDeltaEvent": {"obfuscation": (str,)},
    "ResponseReasoningTextDeltaEvent": {"obfuscation": (str,)},
}

# Top-level keys of a relay-made WebSocket error frame. `headers` at top level is where Codex
# reads `retry-after` (SPEC §3); the typed model only knows `error.headers`.
WS_ERROR_KEYS = {"type", "status", "error", "headers", "sequence_number"}


def _event_models() -> Dict[str, type]:
    """Map each `type` literal of the ResponseStreamEvent union to its model class."""
    union = typing.get_args(ResponseStreamEvent)[0]  # strip Annotated[..., PropertyInfo]
    table: Dict[str, type] = {}
    for cls in typing.get_args(union):
        field = cls.model_fields["type"]
        for literal in typing.get_args(field.annotation):
            table[literal] = cls
    return table


EVENT_MODELS = _event_models()
STREAM_ADAPTER = pydantic.TypeAdapter(ResponseStreamEvent)


def _loc(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _format_validation_error(err: pydantic.ValidationError, limit: int = 8) -> List[str]:
    """Pydantic reports every branch of a union; keep only the branch whose `type` matched."""
    errors = err.errors(include_url=False)
    wrong_branches = set()
    for e in errors:
        loc = tuple(e["loc"])
        if (
            e["type"] == "literal_error"
            and len(loc) >= 2
            and loc[-1] == "type"
            and isinstance(loc[-2], str)
            and loc[-2][:1].isupper()
        ):
            wrong_branches.add(loc[:-1])
    kept = [e for e in errors if not any(tuple(e["loc"])[: len(b)] == b for b in wrong_branches)]
    if not kept:
        # No branch of some union accepted the `type`: say so once per union instead of
        # listing every branch's complaints.
        lines = []
        for parent in sorted({b[:-1] for b in wrong_branches}, key=str):
            bad = next(
                e.get("input") for e in errors if tuple(e["loc"])[:-2] == parent and e["loc"][-1] == "type"
            )
            lines.append(f"{_loc(parent + ('type',))}: {json.dumps(bad)} is not a type this union knows")
        return lines[:limit]
    lines = []
    for e in kept[:limit]:
        got = e.get("input")
        got_s = json.dumps(got)[:80] if not isinstance(got, dict) else "{...}"
        lines.append(f"{_loc(e['loc'])}: {e['msg']} (got {got_s})")
    if len(kept) > limit:
        lines.append(f"... and {len(kept) - limit} more validation errors")
    return lines


def _unknown_keys(value: Any, path: str) -> List[str]:
    """Keys present in the input that no typed model declares (openai models allow extras)."""
    problems: List[str] = []
    if isinstance(value, pydantic.BaseModel):
        cls_name = type(value).__name__
        allowed = {}
        for klass in type(value).__mro__:
            allowed.update(KNOWN_UNTYPED.get(klass.__name__, {}))
        for key, extra_val in (value.model_extra or {}).items():
            p = f"{path}.{key}" if path else key
            if key in allowed:
                if not isinstance(extra_val, allowed[key]):
                    problems.append(f"{p}: expected {allowed[key][0].__name__}, got {json.dumps(extra_val)[:60]}")
                continue
            problems.append(f"{p}: unknown key (not in {cls_name})")
        for name, field in type(value).model_fields.items():
            key = field.alias or name
            problems += _unknown_keys(getattr(value, name), f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            problems += _unknown_keys(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            problems += _unknown_keys(v, f"{path}.{k}")
    return problems


def _diff(a: Any, b: Any, path: str) -> List[str]:
    """Differences between the input (a) and the model's dump (b)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return [] if type(a) is type(b) and a == b else [f"{path or '<root>'}: {json.dumps(a)[:60]} became {json.dumps(b)[:60]}"]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return [] if a == b else [f"{path or '<root>'}: {a} became {b}"]
    if isinstance(a, dict) and isinstance(b, dict):
        out: List[str] = []
        for k in a:
            if k not in b:
                out.append(f"{path}.{k}: dropped by the model" if path else f"{k}: dropped by the model")
            else:
                out += _diff(a[k], b[k], f"{path}.{k}" if path else k)
        for k in b:
            if k not in a:
                out.append(f"{path}.{k}: added by the model" if path else f"{k}: added by the model")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: list length {len(a)} became {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _diff(x, y, f"{path}[{i}]")
        return out
    if type(a) is not type(b) or a != b:
        return [f"{path or '<root>'}: {json.dumps(a)[:60]} became {json.dumps(b)[:60]}"]
    return []


def _strict_model_checks(model: pydantic.BaseModel, obj: Dict[str, Any]) -> List[str]:
    problems = _unknown_keys(model, "")
    dumped = model.model_dump(mode="json", by_alias=True, exclude_unset=True, warnings=False)
    problems += _diff(obj, dumped, "")
    return problems


def _usage_checks(usage: Any, where: str) -> List[str]:
    if usage is None:
        return []
    problems = []
    cached = usage.input_tokens_details.cached_tokens
    reasoning = usage.output_tokens_details.reasoning_tokens
    if cached > usage.input_tokens:
        problems.append(f"{where}: cached_tokens {cached} > input_tokens {usage.input_tokens}")
    if reasoning > usage.output_tokens:
        problems.append(f"{where}: reasoning_tokens {reasoning} > output_tokens {usage.output_tokens}")
    if usage.total_tokens != usage.input_tokens + usage.output_tokens:
        problems.append(
            f"{where}: total_tokens {usage.total_tokens} != input_tokens + output_tokens "
            f"({usage.input_tokens} + {usage.output_tokens})"
        )
    return problems


def _semantic_checks(etype: str, model: Any) -> List[str]:
    resp = getattr(model, "response", None)
    if resp is None:
        return []
    problems = _usage_checks(resp.usage, "response.usage")
    want = TERMINAL_RESPONSE_TYPES.get(etype)
    if want is not None and resp.status != want:
        problems.append(f"response.status is {resp.status!r}, {etype} needs {want!r}")
    if etype in ("response.created", "response.in_progress") and resp.status not in ("in_progress", "queued"):
        problems.append(f"response.status is {resp.status!r} in {etype}")
    if etype == "response.failed" and resp.error is None:
        problems.append("response.failed without response.error")
    if etype == "response.incomplete" and resp.incomplete_details is None:
        problems.append("response.incomplete without response.incomplete_details")
    if etype == "response.completed" and resp.usage is None:
        problems.append("response.completed without response.usage")
    return problems


def check_ws_error_frame(obj: Dict[str, Any]) -> List[str]:
    """A WebSocket error frame: `{"type":"error","status":N,"error":{...}}` (SPEC §3)."""
    problems: List[str] = []
    for key in obj:
        if key not in WS_ERROR_KEYS:
            problems.append(f"{key}: unknown key in a WebSocket error frame")
    status = obj.get("status")
    if type(status) is not int:
        problems.append(f"status: must be an int (Codex ignores error frames without it), got {json.dumps(status)}")
    elif not 400 <= status <= 599:
        problems.append(f"status: {status} is not a 4xx/5xx status")
    err = obj.get("error")
    if not isinstance(err, dict):
        return problems + ["error: must be an object"]
    for key in ("type", "code", "message"):
        if not isinstance(err.get(key), str):
            problems.append(f"error.{key}: must be a string, got {json.dumps(err.get(key))}")
    if "param" not in err:
        problems.append("error.param: missing (use null)")
    elif err["param"] is not None and not isinstance(err["param"], str):
        problems.append(f"error.param: must be a string or null, got {json.dumps(err['param'])}")
    for where, headers in (("headers", obj.get("headers")), ("error.headers", err.get("headers"))):
        if headers is None:
            continue
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            problems.append(f"{where}: must be an object of string values")
    # The typed model, for its own shape rules; strip the top-level `headers` it does not know.
    typed_input = {k: v for k, v in obj.items() if k != "headers"}
    try:
        model = ResponseWsError.model_validate(typed_input)
    except pydantic.ValidationError as exc:
        return problems + _format_validation_error(exc)
    return problems + _strict_model_checks(model, typed_input)


def check_event(obj: Dict[str, Any]) -> Tuple[List[str], Any]:
    """Check one stream event; returns (problems, validated model or None)."""
    etype = obj.get("type")
    model_cls = EVENT_MODELS.get(etype)
    if model_cls is None:
        return [f"type: {etype!r} is not a ResponseStreamEvent type"], None
    try:
        model = model_cls.model_validate(obj)
    except pydantic.ValidationError as exc:
        return [f"{etype}: {line}" for line in _format_validation_error(exc)], None
    problems: List[str] = []
    try:
        via_union = STREAM_ADAPTER.validate_python(obj)
        if type(via_union) is not model_cls:
            problems.append(f"ResponseStreamEvent picked {type(via_union).__name__}, expected {model_cls.__name__}")
    except pydantic.ValidationError:
        problems.append(f"ResponseStreamEvent rejected what {model_cls.__name__} accepted")
    if model.type != etype:
        problems.append(f"parsed type {model.type!r} != {etype!r}")
    problems += [f"{etype}: {p}" for p in _strict_model_checks(model, obj)]
    problems += [f"{etype}: {p}" for p in _semantic_checks(etype, model)]
    return problems, model


def is_ws_error_frame(obj: Dict[str, Any]) -> bool:
    return obj.get("type") == "error" and ("status" in obj or "error" in obj or "status_code" in obj)


def check_file(path: Path) -> Tuple[int, List[str]]:
    errors: List[str] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return 0, [f"cannot read: {exc}"]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return 0, ["no events (empty file)"]

    partial = path.name.endswith(".partial.jsonl")
    prev_seq: Optional[int] = None
    response_id: Optional[str] = None
    terminals: List[int] = []
    count = 0
    for n, line in enumerate(lines, start=1):
        where = f"line {n}"
        if not line.strip():
            errors.append(f"{where}: blank line")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: not JSON ({exc})")
            continue
        count += 1
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            errors.append(f"{where}: not a JSON object with a string `type`")
            continue
        etype = obj["type"]
        if etype in TERMINAL_TYPES:
            terminals.append(n)
        if is_ws_error_frame(obj):
            errors += [f"{where} (ws error frame): {p}" for p in check_ws_error_frame(obj)]
        else:
            problems, model = check_event(obj)
            errors += [f"{where}: {p}" for p in problems]
            resp = getattr(model, "response", None)
            if resp is not None:
                if response_id is None:
                    response_id = resp.id
                elif resp.id != response_id:
                    errors.append(f"{where}: response.id {resp.id!r} differs from {response_id!r} earlier in the file")
        seq = obj.get("sequence_number")
        if seq is None:
            continue
        if type(seq) is not int:
            continue  # reported by the model check
        if prev_seq is not None and seq != prev_seq + 1:
            errors.append(f"{where}: sequence_number {seq} after {prev_seq} (must increase by 1)")
        prev_seq = seq

    if partial:
        if terminals:
            errors.append(f"*.partial.jsonl must have no terminal event, found one on line {terminals[0]}")
    elif not terminals:
        errors.append("no terminal event (response.completed/failed/incomplete or error)")
    else:
        if len(terminals) > 1:
            errors.append(f"{len(terminals)} terminal events (lines {', '.join(map(str, terminals))}); exactly one allowed")
        if terminals[-1] != len(lines):
            errors.append(f"terminal event on line {terminals[-1]} is not the last line ({len(lines)})")
    return count, errors


def collect(args: List[str]) -> Tuple[List[Path], List[str]]:
    files: List[Path] = []
    problems: List[str] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
            if not found:
                problems.append(f"{arg}: no *.jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{arg}: no such file or directory")
    return files, problems


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stderr.write(__doc__ or "")
        return 0 if argv else 2
    if openai.__version__ != PINNED_OPENAI:
        sys.stderr.write(
            f"check_events.py: warning: openai {openai.__version__} installed, models pinned at {PINNED_OPENAI}\n"
        )
    files, problems = collect(argv)
    failed = bool(problems)
    for p in problems:
        print(p)
    for f in files:
        count, errors = check_file(f)
        if errors:
            failed = True
            print(f"{f}: FAIL ({count} events, {len(errors)} errors)")
            for e in errors[:MAX_ERRORS_PER_FILE]:
                print(f"    {e}")
            if len(errors) > MAX_ERRORS_PER_FILE:
                print(f"    ... and {len(errors) - MAX_ERRORS_PER_FILE} more")
        else:
            print(f"{f}: ok {count} events")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
