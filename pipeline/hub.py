"""The commit a Hub revision points at, so a run loads one fixed snapshot from stage to stage.

A model or dataset is asked for by id and `revision` (a branch, tag or commit; None means `main`). A
branch moves; the commit it resolves to does not. The stages that first meet a Hub id (`base`,
`normalize`) record the commit in their manifests, and every later load uses it.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import repo_folder_name

from .errors import PipelineError
from .redaction import redact_text

COMMIT = re.compile(r"[0-9a-f]{40}")


def is_commit(revision: str | None) -> bool:
    return revision is not None and COMMIT.fullmatch(revision) is not None


def cached_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The commit the local Hub cache last saw `revision` at (its `refs/<revision>` file), or None."""
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / (revision or "main")
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if is_commit(sha) else None


def resolve_commit(repo_id: str, revision: str | None, repo_type: str = "model", key: str | None = None,
                   revision_key: str | None = None) -> str | None:
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
            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        except GatedRepoError:
            raise PipelineError(f"{named}: this {repo_type} repository is gated or private; accept its terms on the Hub "
                                "and log in (`hf auth login` or HF_TOKEN), or use a local copy.") from None
        except RepositoryNotFoundError:
            raise PipelineError(f"{named}: no such {repo_type} repository on the Hub (or it is private); check the "
                                "id, log in for a private one (HF_TOKEN), or give a local path.") from None
        except RevisionNotFoundError:
            raise PipelineError(f"{named}: the Hub repository has no revision {revision!r}; set "
                                f"{revision_key or 'the revision'} to an existing branch, tag or commit (null for main)."
                                ) from None
        except Exception:  # no connection, a timeout, a server error (the HTTP client's own types): the cache answers
            pass
    commit = cached_commit(repo_id, revision, repo_type)
    if commit is None:
        warnings.warn(f"{named}: the Hub is offline or unreachable and the local Hub cache has no revision "
                      f"{revision or 'main'}, so the commit is unresolved: later stages load the revision as asked, "
                      "which can move.", stacklevel=2)
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
        return (f"the Hub refused the credentials (HTTP {status}); set HF_TOKEN to a token with write access "
                f"to this repo ({detail}).")
    if isinstance(err, (ConnectionError, TimeoutError)) or "connect" in type(err).__name__.lower() \
            or "network" in type(err).__name__.lower() or "timeout" in type(err).__name__.lower():
        return f"the Hub could not be reached; check the network or HF_ENDPOINT ({detail})."
    return f"{detail}. Check the network and that HF_TOKEN holds a token with write access."
