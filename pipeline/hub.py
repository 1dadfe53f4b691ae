"""The commit a Hub revision points at, so a run loads one fixed snapshot from stage to stage.

A model or dataset is asked for by id and `revision` (a branch, tag or commit; None means `main`). A
branch moves; the commit it resolves to does not. The stages that first meet a Hub id (`base`,
`normalize`) record the commit in their manifests, and every later load uses it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import repo_folder_name

from .errors import PipelineError

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
