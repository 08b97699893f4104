"""The Hugging Face hub, used only when it answers: a bounded reachability probe and
offline mode for a block of code (the `datasets` cache only), so that nothing waits on
network retries on a machine without internet."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

__all__ = ["HUB_PROBE_SECONDS", "first_line", "hub_endpoint", "hub_offline", "hub_offline_mode", "hub_unreachable"]

HUB_PROBE_SECONDS = 3.0


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


_OFFLINE_LOCK = threading.Lock()


@contextlib.contextmanager
def hub_offline(datasets_module):
    """Hugging Face offline mode for the duration (datasets and huggingface_hub read these
    module flags at call time): `load_dataset` then looks in the local cache only."""
    import huggingface_hub.constants as hub_constants

    config = datasets_module.config
    flags = [(config, "HF_HUB_OFFLINE"), (config, "HF_DATASETS_OFFLINE"), (hub_constants, "HF_HUB_OFFLINE")]
    with _OFFLINE_LOCK:
        saved = [(obj, name, getattr(obj, name)) for obj, name in flags if hasattr(obj, name)]
        verbosity = datasets_module.logging.get_verbosity()
        try:
            for obj, name, _ in saved:
                setattr(obj, name, True)
            # its "using the latest cached version ... couldn't be found on the Hub" warning is noise here
            datasets_module.logging.set_verbosity_error()
            yield
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)
            datasets_module.logging.set_verbosity(verbosity)


def _hub_head(endpoint: str, seconds: float) -> int:
    """HTTP status of a HEAD request to the hub's endpoint (huggingface_hub's client: its proxies, headers)."""
    from huggingface_hub import get_session

    return get_session().head(endpoint, timeout=seconds, follow_redirects=False).status_code


def hub_unreachable(endpoint: str, seconds: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub at `endpoint` cannot be used now (None: it answers), within
    about `seconds` whatever the network does (name resolution included: the request runs
    in a daemon thread that is abandoned when it takes longer)."""
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            result["status"] = _hub_head(endpoint, seconds)
        except Exception as e:  # noqa: BLE001 - any failure means: not reachable
            result["error"] = first_line(e)

    thread = threading.Thread(target=probe, name="pvq-hub-probe", daemon=True)
    thread.start()
    thread.join(seconds + 0.5)
    if thread.is_alive():
        return f"no answer from {endpoint} within {seconds:g} s"
    if "error" in result:
        return f"{endpoint}: {result['error']}"
    if result["status"] >= 500:
        return f"{endpoint} answers HTTP {result['status']}"
    return None


def hub_offline_mode(datasets_module) -> bool:
    """Whether Hugging Face offline mode is on (datasets' or huggingface_hub's setting)."""
    import huggingface_hub.constants as hub_constants

    return bool(datasets_module.config.HF_HUB_OFFLINE or hub_constants.HF_HUB_OFFLINE)


def hub_endpoint(datasets_module) -> str:
    """The hub address `datasets` downloads from (HF_ENDPOINT)."""
    import huggingface_hub.constants as hub_constants

    return str(getattr(datasets_module.config, "HF_ENDPOINT", hub_constants.ENDPOINT)).rstrip("/")
