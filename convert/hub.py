"""Hugging Face hub ids as a source: `python -m convert ORG/NAME [--revision R]`.

The snapshot comes through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE), so a model
downloaded once converts again offline (HF_HUB_OFFLINE=1). Only what the converter reads is
fetched: the config, the tokenizer files and one copy of the weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from convert.errors import ConversionError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["config.json", "generation_config.json", "tokenizer*", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template*"]
# Safetensors first; torch weights only from a repository without them.
_HUB_WEIGHTS = (["model*.safetensors", "model.safetensors.index.json"],
                ["pytorch_model*.bin", "pytorch_model.bin.index.json"])


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of hub model `repo_id` at `revision` (default: main) holding its config,
    tokenizer and weights, fetched through the Hugging Face cache (HF_HOME / HF_HUB_CACHE);
    with HF_HUB_OFFLINE=1 only the cache is read."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    try:
        for weights in _HUB_WEIGHTS:
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES + weights))
            if any(path.glob(weights[0])):
                break
    except GatedRepoError as e:
        raise ConversionError(f"hub model {repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} "
                              f"and log in (`hf auth login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise ConversionError(f"hub model {repo_id} does not exist, or is private and you are not logged in "
                              f"(`hf auth login` or HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise ConversionError(f"hub model {repo_id} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ConversionError(f"hub model {repo_id}{at} is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                              f"and {why}") from e
    except (HfHubHTTPError, OSError) as e:
        raise ConversionError(f"cannot download hub model {repo_id}{at}: {e}") from e
    return path
