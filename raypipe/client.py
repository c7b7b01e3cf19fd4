"""HTTP client for a running raypipe model server (``raypipe serve`` / ``serve run``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raypipe.errors import RaypipeError


def predict_http(
    url: str,
    texts: Sequence[Any],
    top_k: int | None = None,
    token: str | None = None,
    timeout: float = 30,
    field: str | None = None,
) -> dict[str, Any]:
    """POST ``texts`` (or ``(a, b)`` pairs, for a sentence-pair model) to ``<url>/predict``;
    returns the server's JSON body. ``field`` names the request field when the inputs' shape
    does not say it: ``"tokens"`` sends word lists to a token-classification model (default:
    ``"pairs"`` when every input is a list or tuple, else ``"texts"``).

    ``{"predictions": [<one per input, shaped by the model's task>], "model": {"name",
    "version", "run_id"}}``. Any 4xx/5xx answer, a timeout or an unreachable server raises
    :class:`~raypipe.errors.RaypipeError` carrying the server's own error message.
    """
    import httpx

    endpoint = f"{url.rstrip('/')}/predict"
    items = list(texts)
    pairs = bool(items) and all(isinstance(t, (list, tuple)) for t in items)
    field = field or ("pairs" if pairs else "texts")
    body: dict[str, Any] = {field: [list(p) for p in items] if field in ("pairs", "tokens") else items}
    if top_k is not None:
        body["top_k"] = top_k
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(endpoint, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise RaypipeError(f"{endpoint} did not answer within {timeout} s") from None
    except httpx.HTTPError as exc:
        raise RaypipeError(
            f"cannot reach the model server at {url} ({exc}); is `raypipe serve` running there?"
        ) from None
    if response.status_code >= 400:
        raise RaypipeError(_describe_error(endpoint, response))
    try:
        return response.json()
    except ValueError:
        raise RaypipeError(f"{endpoint} answered {response.status_code} with a body that is not JSON") from None


def _describe_error(endpoint: str, response: Any) -> str:
    message = response.text.strip()[:500] or response.reason_phrase
    problems: list[str] = []
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        message = str(data.get("error") or data.get("detail") or message)
        problems = [str(p) for p in data.get("problems") or [] if str(p) != message]
    text = f"{endpoint} answered {response.status_code}: {message}"
    if problems:
        text += "".join(f"\n  - {p}" for p in problems)
    if response.headers.get("retry-after"):
        text += f" (retry after {response.headers['retry-after']} s)"
    return text
