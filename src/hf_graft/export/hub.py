"""Upload of an exported student folder to the Hugging Face Hub, with one-line, token-free errors."""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Mapping, Sequence

from hf_graft.export.student_folder import EXPORT_FILES
from hf_graft.errors import HfGraftError

__all__ = [
    "PushOptionError", "PushToHubError", "UPLOAD_OPTIONS", "check_upload_options", "push_student", "scrub_secrets",
]

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload filter-grafted student (hf_graft)"
# HfApi.upload_folder arguments a push passes on (the folder, repo, files and revision are the push's own)
UPLOAD_OPTIONS = ("commit_description", "create_pr", "parent_commit")


class PushToHubError(HfGraftError, RuntimeError):
    """The upload of an exported student failed; the message is one line naming the repo and the cause."""


class PushOptionError(HfGraftError, TypeError):
    """A push was given an argument it does not take; the message is one line naming it."""


def scrub_secrets(text: str, secrets: Sequence[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    # Hub tokens have a recognisable shape; hide any that a server or library echoed back
    return re.sub(r"\bhf_[A-Za-z0-9]{30,}", "hf_***", text)


def _push_failure_cause(error: BaseException) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    text = " ".join(str(error).split()) or type(error).__name__
    if status in (401, 403):
        text = f"HTTP {status}, not authorised (check the token and its write access): {text}"
    elif status is not None and not text.startswith(str(status)):
        text = f"HTTP {status}: {text}"
    # the Hub wraps transport errors; the innermost cause says what actually went wrong
    inner = error.__cause__ or error.__context__
    if status is None and inner is not None and str(inner) and str(inner) not in text:
        text += f" ({type(inner).__name__}: {' '.join(str(inner).split())})"
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(error).__name__}: {text}"


def _push_errors() -> tuple[type[BaseException], ...]:
    import huggingface_hub.errors as hub_errors

    errors: list[type[BaseException]] = [hub_errors.HfHubHTTPError, OSError, ValueError]
    # the HTTP client's own base error (httpx2 / httpx in huggingface_hub >= 1.0, requests before)
    client_error = getattr(hub_errors, "HTTPError", None)
    if isinstance(client_error, type) and issubclass(client_error, BaseException):
        errors.append(client_error)
    for module, name in (("httpx2", "StreamError"), ("httpx", "HTTPError"), ("httpx", "StreamError"),
                         ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def check_upload_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The keyword arguments of a push that go to `HfApi.upload_folder`; any other is refused in one line."""
    unknown = sorted(set(options) - set(UPLOAD_OPTIONS))
    if unknown:
        raise PushOptionError(
            f"{where}: unexpected argument(s) {', '.join(unknown)}; allowed besides commit_message, blocking, token, "
            f"revision and private: {', '.join(UPLOAD_OPTIONS)} (the card's license comes from GraftingConfig.license, "
            "its dataset and tags from the run)"
        )
    return dict(options)


def _upload(api, folder: Path, repo_id: str, secrets: Sequence[str | None], **upload_kwargs):
    try:
        return api.upload_folder(folder_path=str(folder), repo_type="model", allow_patterns=list(EXPORT_FILES),
                                 repo_id=repo_id, **upload_kwargs)
    except _push_errors() as error:
        raise _push_error(folder, repo_id, api, error, secrets) from None


def _push_error(folder: Path, repo_id: str, api, error: BaseException, secrets) -> PushToHubError:
    endpoint = getattr(api, "endpoint", None)
    where = f" ({endpoint})" if endpoint else ""
    message = f"could not push {folder} to the Hub repo {repo_id}{where}: {_push_failure_cause(error)}"
    return PushToHubError(scrub_secrets(message, secrets))


def push_student(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    blocking: bool = True,
    **upload_options,
) -> str | Future:
    """Upload an exported student folder (its three files, nothing else) to a Hub model repo.

    `revision`: the branch to commit to (created from the default branch when missing; default: the
    default branch). `upload_options`: `HfApi.upload_folder`'s commit_description, create_pr, parent_commit.
    Returns the repo URL; with `blocking=False`, as `transformers.Trainer.push_to_hub`, a `Future` of the
    upload's `CommitInfo` (the repo and branch are made first). `token=None` uses $HF_TOKEN or the cached
    `hf auth login`. Any network or Hub failure raises `PushToHubError` (from the Future's `result()` when
    not blocking) with a one-line message naming the repo, with the token removed from it.
    """
    folder = Path(folder)
    upload_options = check_upload_options(upload_options, "push_student")
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a student export, missing {', '.join(missing)}")
    from huggingface_hub import HfApi

    secrets = [token, os.environ.get("HF_TOKEN")]
    api = None
    try:
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        # the Hub may resolve an owner-less id to the token's namespace
        target = getattr(repo_url, "repo_id", None) or repo_id
        if revision and not revision.startswith("refs/pr/"):  # a pull request's ref exists already or not at all
            api.create_branch(target, branch=revision, repo_type="model", exist_ok=True)
    except _push_errors() as error:
        raise _push_error(folder, repo_id, api, error, secrets) from None
    upload = dict(commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, revision=revision, **upload_options)
    branch = f" (branch {revision})" if revision else ""
    if not blocking:
        future = api.run_as_future(_upload, api, folder, target, secrets, **upload)
        logger.info("uploading the student to %s%s in the background", repo_url, branch)
        return future
    _upload(api, folder, target, secrets, **upload)
    logger.info("pushed the student to %s%s", repo_url, branch)
    return str(repo_url)
