"""Triton's interpreter is chosen in one place (``qwha.runtime.configure_environment``, run by
``import qwha``) and only where no GPU exists: a CUDA host always tests the compiled kernels."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from qwha import runtime
from qwha.kernels import fwht

TESTS = Path(__file__).resolve().parent


def _sets_interpreter(tree: ast.AST) -> bool:
    """Whether a module's code writes ``TRITON_INTERPRET`` (a string constant used in a call or a
    subscript assignment, e.g. ``os.environ.setdefault("TRITON_INTERPRET", ...)`` or a dict of them)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == "TRITON_INTERPRET":
            return True
    return False


def test_no_test_module_forces_the_interpreter():
    offenders = [
        p.name
        for p in sorted(TESTS.glob("*.py"))
        if p.name != Path(__file__).name and _sets_interpreter(ast.parse(p.read_text()))
    ]
    assert offenders == []


@pytest.mark.parametrize("gpu", [True, False])
def test_configure_environment_sets_the_interpreter_only_without_a_gpu(monkeypatch, gpu):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(runtime, "has_cuda_device", lambda: gpu)
    runtime.configure_environment()
    assert os.environ.get("TRITON_INTERPRET") == (None if gpu else "1")


def test_kernels_run_in_the_mode_this_host_allows():
    # On a CUDA host the compiled kernels are the ones under test; elsewhere the interpreter.
    assert fwht.interpreted() is (not torch.cuda.is_available())


def test_cuda_probe_agrees_with_torch():
    assert runtime.has_cuda_device() or not torch.cuda.is_available()


@pytest.mark.gpu
def test_gpu_kernels_are_compiled():
    assert torch.cuda.is_available() and not fwht.interpreted() and fwht.available()
