"""The Hub: bounded network calls, the commit a revision points at, and pushing.

Every Hub call of a process waits at most `hub.timeout_s` for a connection or an answer (`configure_network`: the
HTTP client huggingface_hub shares, and its download time-outs); the pipeline's own calls (revision resolution, the
push) are tried `hub.tries` times on a time-out or a dropped connection, say what they wait for, and then fail with
the host, the time-out and the fix (`with_tries`). Downloads are retried by huggingface_hub itself.

A model or dataset is asked for by id and `revision` (a branch, tag or commit; None means `main`). A
branch moves; the commit it resolves to does not. The stages that first meet a Hub id (`base`,
`normalize`) record the commit in their manifests, and every later load uses it.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import repo_folder_name

from pipeline.config.options import HUB_TIMEOUT_S, HUB_TRIES
from pipeline.core.errors import PipelineError
from pipeline.core.redaction import redact_text

COMMIT = re.compile(r"[0-9a-f]{40}")
T = TypeVar("T")


# ---- bounded network calls --------------------------------------------------------------------------------


class Network:
    """This process's Hub time-out (seconds, per connection or read) and tries per call of the pipeline's own."""

    timeout_s: float = HUB_TIMEOUT_S
    tries: int = HUB_TRIES
    configured: bool = False


def configure_network(timeout_s: float = HUB_TIMEOUT_S, tries: int = HUB_TRIES) -> None:
    """Bound every Hub call of this process by `timeout_s` (the shared HTTP client's time-out, huggingface_hub's
    metadata and download time-outs), and try the pipeline's own calls `tries` times."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    def bound(request) -> None:  # huggingface_hub passes `timeout=None` on some calls, which would wait forever
        waits = request.extensions.get("timeout", {})
        request.extensions["timeout"] = {k: timeout_s if v is None else min(v, timeout_s) for k, v in waits.items()}

    def client():
        made = _http.default_client_factory()
        made.timeout = httpx2.Timeout(timeout_s)
        made.event_hooks["request"].append(bound)
        return made

    Network.timeout_s, Network.tries, Network.configured = float(timeout_s), int(tries), True
    set_client_factory(client)
    constants.HF_HUB_ETAG_TIMEOUT = constants.HF_HUB_DOWNLOAD_TIMEOUT = timeout_s


def ensure_network() -> None:
    """The defaults, where no stage configured the network from params (the Python API)."""
    if not Network.configured:
        configure_network()


def host() -> str:
    return urlparse(constants.ENDPOINT).netloc or constants.ENDPOINT


def is_network_error(err: BaseException) -> bool:
    """A time-out or a lost connection (worth another try), as opposed to an answer (refused, not found)."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):  # a ConnectionError by type, but a setting, not the network
        return False
    return isinstance(
        err, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError, ConnectionError, TimeoutError)
    )


def with_tries(what: str, call: Callable[[], T], say: Callable[[str], None] | None = None) -> T:
    """`call()` (a Hub request, `what` says which), tried up to `hub.tries` times on a time-out or a dropped
    connection with a short growing pause, saying before each try what it waits for; after the last, a PipelineError
    with the host, the time-out and the fix. Any other error (an answer from the Hub) goes on at once."""
    ensure_network()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    for attempt in range(1, Network.tries + 1):
        say(f"hub: {what} at {host()} (waiting up to {Network.timeout_s:g} s, try {attempt} of {Network.tries})")
        try:
            return call()
        except Exception as err:
            if not is_network_error(err):
                raise
            last = err
            if attempt < Network.tries:
                time.sleep(min(2 ** (attempt - 1), 8))
    import httpx2

    waited = (
        f"did not answer within {Network.timeout_s:g} s"
        if isinstance(last, (httpx2.TimeoutException, TimeoutError))
        else "could not be reached"
    )
    raise PipelineError(
        f"{what}: {host()} {waited}, {Network.tries} times ({type(last).__name__}). Check the network (or "
        f"HF_ENDPOINT), raise hub.timeout_s or hub.tries "
        "in params.yaml for a slow link, or set HF_HUB_OFFLINE=1 to work from the local Hub cache."
    )


def is_commit(revision: str | None) -> bool:
    return revision is not None and COMMIT.fullmatch(revision) is not None


def cached_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The commit the local Hub cache last saw `revision` at (its `refs/<revision>` file), or None."""
    ref = (
        Path(constants.HF_HUB_CACHE)
        / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
        / "refs"
        / (revision or "main")
    )
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if is_commit(sha) else None


def resolve_commit(
    repo_id: str,
    revision: str | None,
    repo_type: str = "model",
    key: str | None = None,
    revision_key: str | None = None,
) -> str | None:
    """The commit sha (40 hex) that `revision` of the Hub repository `repo_id` points at.

    A commit is returned as is. Otherwise the Hub is asked, unless offline (HF_HUB_OFFLINE); offline or on a
    network error, the local Hub cache answers. None when nothing is known (offline and not cached): the caller
    records the commit as unresolved. An unknown repository or revision is an error naming the params keys that
    gave them (`key`, `revision_key`).
    """
    if is_commit(revision):
        return revision
    named = f"{key}={repo_id}" if key else repo_id
    if not constants.HF_HUB_OFFLINE:
        try:
            return with_tries(
                f"resolving {named}@{revision or 'main'}",
                lambda: HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha,
            )
        except GatedRepoError:
            raise PipelineError(
                f"{named}: this {repo_type} repository is gated or private; accept its terms on the Hub "
                "and log in (`hf auth login` or HF_TOKEN), or use a local copy."
            ) from None
        except RepositoryNotFoundError:
            raise PipelineError(
                f"{named}: no such {repo_type} repository on the Hub (or it is private); check the "
                "id, log in for a private one (HF_TOKEN), or give a local path."
            ) from None
        except RevisionNotFoundError:
            raise PipelineError(
                f"{named}: the Hub repository has no revision {revision!r}; set "
                f"{revision_key or 'the revision'} to an existing branch, tag or commit (null for main)."
            ) from None
        except PipelineError as err:  # no answer within the tries: the local cache answers, with the reason
            warnings.warn(str(err), stacklevel=2)
        except Exception:  # no connection, a server error (the HTTP client's own types): the cache answers
            pass
    commit = cached_commit(repo_id, revision, repo_type)
    if commit is None:
        warnings.warn(
            f"{named}: the Hub is offline or unreachable and the local Hub cache has no revision "
            f"{revision or 'main'}, so the commit is unresolved: later stages load the revision as asked, "
            "which can move.",
            stacklevel=2,
        )
    return commit


# ---- pushing: the token, and a failure in a sentence (the export stage and DPOTrainer.push_to_hub) ----


def hub_token() -> str | None:
    """The Hub token: HF_TOKEN from the environment, else the huggingface_hub login; None if neither."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def _redact(text: str, token: str | None) -> str:
    return redact_text(text.replace(token, "***") if token else text)


def push_failure(err: Exception, token: str | None) -> str:
    """What went wrong, in a sentence, without the token."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    detail = _redact(f"{type(err).__name__}: {err}", token)
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, OfflineModeIsEnabled):
        return f"offline mode is on (HF_HUB_OFFLINE=1); unset it, with network access, to push ({detail})."
    if status in (401, 403):
        return (
            f"the Hub refused the credentials (HTTP {status}); set HF_TOKEN to a token with write access "
            f"to this repo ({detail})."
        )
    if (
        isinstance(err, (ConnectionError, TimeoutError))
        or "connect" in type(err).__name__.lower()
        or "network" in type(err).__name__.lower()
        or "timeout" in type(err).__name__.lower()
    ):
        return f"the Hub could not be reached; check the network or HF_ENDPOINT ({detail})."
    return f"{detail}. Check the network and that HF_TOKEN holds a token with write access."
