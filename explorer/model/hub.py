"""Hub look-ups that fail fast: one quick request, or the local cache alone when offline.

transformers retries a hub request several times with back-off, so a hub id typed on a machine
without a connection took 30-45 s to fail. Before handing a hub id to transformers this module
asks once: with ``HF_HUB_OFFLINE`` set, only the local hub cache is consulted; otherwise one
metadata request with a short timeout must answer.
"""

from __future__ import annotations

from ..errors import ModelSourceError

TIMEOUT_S = 5.0


def ensure_available(repo_id: str, *, repo_type: str = "model") -> None:
    """Raise ``ModelSourceError`` at once unless ``repo_id`` can be fetched (or is cached)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        probe = "config.json" if repo_type == "model" else "README.md"
        if isinstance(try_to_load_from_cache(repo_id, probe, repo_type=repo_type), str):
            return
        raise ModelSourceError(
            f"Could not fetch '{repo_id}': it is not in the local hub cache and HF_HUB_OFFLINE is "
            "set. Unset HF_HUB_OFFLINE, or use a local folder or an embedded model."
        )
    api = HfApi(endpoint=constants.ENDPOINT)
    info = api.model_info if repo_type == "model" else api.dataset_info
    try:
        info(repo_id, timeout=TIMEOUT_S)
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"Could not fetch '{repo_id}' from the Hugging Face Hub: no such {repo_type} "
            "(or it is private). Check the id, or use a local folder or an embedded model."
        ) from exc
    except HfHubHTTPError:
        return  # the hub answered (gated, rate limited...): transformers says what is needed
    except Exception as exc:  # no connection, DNS, timeout, proxy: whatever the transport raises
        raise ModelSourceError(
            f"Could not fetch '{repo_id}' from the Hugging Face Hub: it did not answer within "
            f"{TIMEOUT_S:g} s ({type(exc).__name__}). Check your connection, or use a local "
            "folder or an embedded model."
        ) from exc
