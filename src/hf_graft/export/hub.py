"""Upload of an exported student folder to the Hugging Face Hub, with one-line, token-free errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from hf_graft.export.student_folder import EXPORT_FILES
from hf_graft.errors import HfGraftError

__all__ = ["PushToHubError", "push_student", "scrub_secrets"]


class PushToHubError(HfGraftError, RuntimeError):
    """The upload of an exported student failed; the message is one line naming the repo and the cause."""


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


def push_student(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload filter-grafted student (hf_graft)",
) -> str:
    """Upload an exported student folder (its three files, nothing else) to a Hub model repo; returns its URL.

    `token=None` uses $HF_TOKEN or the cached `hf auth login`. Any network or Hub failure raises
    `PushToHubError` with a one-line message naming the repo, with the token removed from it.
    """
    folder = Path(folder)
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
        api.upload_folder(
            repo_id=target,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message,
            allow_patterns=list(EXPORT_FILES),
        )
    except _push_errors() as error:
        endpoint = getattr(api, "endpoint", None)
        where = f" ({endpoint})" if endpoint else ""
        message = f"could not push {folder} to the Hub repo {repo_id}{where}: {_push_failure_cause(error)}"
        raise PushToHubError(scrub_secrets(message, secrets)) from None
    return str(repo_url)
