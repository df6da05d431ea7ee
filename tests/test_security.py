"""Security (DESIGN.md "Security"): no model code without trust_remote_code, safetensors unless
allow_pickle_weights, paths from the DAG form confined to allowed roots (the CLI trusts its local user), chat templates checked in the
Jinja sandbox, no secret literals in git, and the dependency audit's decisions.

Everything is real: tiny random Llamas on disk, the real CLI (in-process and as a
subprocess), real pickles, real templates, the real audit script on canned pip-audit output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ftlib.cli import app
from ftlib.core.config import Params, load_params
from ftlib.core.security import UnsafeModel, allowed_roots, check_chat_template, confine
from tests.conftest import REPO, balanced, make_splits, train_params, write_jsonl

runner = CliRunner()


def _tiny_llama(path: Path, tokenizer, safe: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    if not safe:  # a legacy pickle checkpoint (transformers 5 only writes safetensors itself)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------
# 1. trust_remote_code is off, and a model's own code never runs unless it is on

def _evil_model(path: Path, tokenizer, marker: Path) -> Path:
    """A loadable model dir whose config.json maps to a custom modeling file that writes `marker` on import."""
    _tiny_llama(path, tokenizer)
    (path / "evil_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('custom code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'ftlib_evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="ftlib_evil", architectures=["EvilModel"],
               auto_map={"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_trust_remote_code_is_off_by_default():
    assert Params().trust_remote_code is False
    assert yaml.safe_load((REPO / "params.yaml").read_text())["trust_remote_code"] is False
    assert load_params(REPO / "params.yaml").trust_remote_code is False


def test_custom_model_code_never_runs_through_ftlib(tmp_path, tokenizer):
    from ftlib.core.models import load_model, load_tokenizer
    from ftlib.stages.train import train

    marker = tmp_path / "MARKER"
    evil = _evil_model(tmp_path / "evil", tokenizer, marker)
    for load in (lambda: load_model(str(evil)), lambda: load_tokenizer(str(evil)), lambda: load_tokenizer(str(evil), light=True)):
        with pytest.raises(UnsafeModel, match=r"config\.json: `auto_map` .*evil_model\.py.*trust_remote_code: true"):
            load()
    p = train_params(str(evil), tmp_path, "train.method=lora", "train.max_steps=1")
    with pytest.raises(UnsafeModel, match="trust_remote_code"):
        train(p, make_splits(tmp_path / "splits"), tmp_path / "reports")
    r = runner.invoke(app, ["train", "--data-dir", str(tmp_path / "splits"), "--reports-dir", str(tmp_path / "reports"),
                            "-o", f"base_model={evil}", "-o", f"train.output_dir={tmp_path / 'adapter'}"])
    assert r.exit_code != 0 and "trust_remote_code" in r.output
    assert not marker.exists() and not (tmp_path / "adapter").exists()


def test_custom_model_code_runs_when_trusted(tmp_path, tokenizer):
    """The other side: the same directory does run its code with trust_remote_code=True (so the test above is not vacuous)."""
    marker = tmp_path / "MARKER"
    evil = _evil_model(tmp_path / "evil", tokenizer, marker)
    code = f"from ftlib.core.models import load_model; m, _ = load_model({str(evil)!r}, trust_remote_code=True); print(type(m).__name__)"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "EvilModel" and marker.read_text() == "custom code ran"


# ---------------------------------------------------------------------------
# 2. Safetensors only, unless allow_pickle_weights; torch.load always weights_only=True

@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory, tokenizer) -> str:
    path = _tiny_llama(tmp_path_factory.mktemp("pickle-llama"), tokenizer, safe=False)
    assert (path / "pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
    return str(path)


def test_pickle_only_model_is_refused_unless_allowed(pickle_model):
    import torch

    from ftlib.core.models import load_model

    assert Params().allow_pickle_weights is False and load_params(REPO / "params.yaml").allow_pickle_weights is False
    with pytest.raises(UnsafeModel, match=r"pytorch_model\.bin: pickle weights .*allow_pickle_weights: true"):
        load_model(pickle_model)
    model, _ = load_model(pickle_model, allow_pickle_weights=True)
    saved = torch.load(Path(pickle_model) / "pytorch_model.bin", weights_only=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], saved["model.embed_tokens.weight"])


def test_train_and_merge_on_a_pickle_base_need_the_param(pickle_model, tmp_path):
    from ftlib.stages.train import train

    data = make_splits(tmp_path / "splits")
    p = train_params(pickle_model, tmp_path, "train.method=lora", "train.max_steps=1")
    with pytest.raises(UnsafeModel, match="allow_pickle_weights"):
        train(p, data, tmp_path / "reports")
    adapter = train(train_params(pickle_model, tmp_path, "train.method=lora", "train.max_steps=1", "allow_pickle_weights=true"),
                    data, tmp_path / "reports").output_dir
    r = runner.invoke(app, ["merge", "--model", adapter, "--out", str(tmp_path / "merged")])
    assert r.exit_code == 2 and "pytorch_model.bin" in r.output and "allow_pickle_weights" in r.output
    r = runner.invoke(app, ["merge", "--model", adapter, "--out", str(tmp_path / "merged"), "--dtype", "float32",
                            "-o", "allow_pickle_weights=true"])
    assert r.exit_code == 0, r.output
    merged = Path(tmp_path / "merged")
    assert list(merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))


def test_pickle_adapter_is_refused_unless_allowed(tiny_adapter, tmp_path):
    import torch
    from safetensors.torch import load_file

    from ftlib.core.models import load_model

    adapter = Path(shutil.copytree(tiny_adapter, tmp_path / "adapter"))
    weights = load_file(adapter / "adapter_model.safetensors")
    torch.save(weights, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeModel, match=r"adapter_model\.bin: pickle weights"):
        load_model(str(adapter))
    model, _ = load_model(str(adapter), allow_pickle_weights=True)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_A" in k}
    assert loaded and all(torch.equal(v, weights[k.replace(".default", "")]) for k, v in loaded.items())


class _RunsCode:
    """Pickles to a call of exec: what a malicious pytorch_model.bin carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran')",)


def test_an_allowed_pickle_still_cannot_run_code(tmp_path, tiny_model):
    import torch

    from ftlib.core.models import load_model

    marker, model = tmp_path / "MARKER", tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, model / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported global"):
        load_model(str(model), allow_pickle_weights=True)
    assert not marker.exists()


def test_ftlib_never_calls_torch_load_without_weights_only():
    calls = [(f, line) for f in (REPO / "ftlib").glob("*.py") for line in f.read_text().splitlines()
             if "torch.load(" in line and "weights_only=True" not in line]
    assert not calls, calls


# ---------------------------------------------------------------------------
# 3. Data and model paths stay inside the allowed roots

def test_default_roots_are_project_cache_and_temp():
    from ftlib.core.models import cache_dir

    roots = allowed_roots(Path.cwd())
    assert roots[:3] == [Path.cwd().resolve(), cache_dir().resolve(), Path(tempfile.gettempdir()).resolve()]
    assert Params().paths.allowed_roots == [] and load_params(REPO / "params.yaml").paths.allowed_roots == []


def test_the_dag_form_refuses_a_dotdot_escape(tmp_path):
    """Paths from the trigger form / REST API are untrusted: ../ escapes and absolute paths elsewhere are refused
    before anything reads them (the validate task used to copy /etc/passwd into the quarantine file)."""
    from ftlib.airflow.orchestrate import form_path
    from ftlib.core.security import PathError

    escape = "../" * 30 + "etc/passwd"
    with pytest.raises(PathError, match="resolves to /etc/passwd, outside the allowed roots"):
        form_path(str(tmp_path), escape)
    with pytest.raises(PathError):
        form_path(str(tmp_path), "/etc/passwd")
    assert form_path(str(tmp_path), "data/raw") == tmp_path.resolve() / "data" / "raw"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """cwd = tmp/proj, the system temp dir = tmp/tmp: tmp/outside is outside every default root."""
    for d in ("proj", "tmp", "outside"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    write_jsonl(tmp_path / "outside" / "data.jsonl", balanced(3))
    write_jsonl(tmp_path / "proj" / "data.jsonl", balanced(3))
    return tmp_path / "proj"


def test_a_form_path_through_a_symlink_pointing_outside_is_refused(project):
    from ftlib.airflow.orchestrate import form_path
    from ftlib.core.security import PathError

    outside = project.parent / "outside"
    (project / "linked").symlink_to(outside)
    with pytest.raises(PathError, match=f"resolves to {outside / 'data.jsonl'}, outside the allowed roots"):
        form_path(str(project), "linked/data.jsonl")
    assert form_path(str(project), "x", extra_roots=(str(outside),))  # params.yaml paths.allowed_roots widen it


def test_the_cli_reads_a_file_the_user_names_anywhere(project):
    """A local user naming their own file is not untrusted input: the CLI does not confine paths."""
    outside = project.parent / "outside"
    r = runner.invoke(app, ["validate", str(outside / "data.jsonl"), "-o", "validate.data_docs=false"])
    assert r.exit_code == 0, r.output
    (project / "linked").symlink_to(outside)
    assert runner.invoke(app, ["validate", "linked/data.jsonl", "--no-report"]).exit_code == 0


def test_an_ad_hoc_validate_leaves_the_pipeline_report_alone(project):
    """`ftlib validate FILE` outside data/raw prints its report and writes nothing unless --report-dir says where;
    validating data/raw (what dvc.yaml and the DAG do) still writes data/validated."""
    r = runner.invoke(app, ["validate", "data.jsonl", "-o", "validate.data_docs=false"])
    assert r.exit_code == 0 and "no report written" in r.output and not (project / "data" / "validated").exists()
    r = runner.invoke(app, ["validate", "data.jsonl", "--report-dir", "check", "-o", "validate.data_docs=false"])
    assert r.exit_code == 0 and (project / "check" / "report.json").is_file()
    write_jsonl(project / "data" / "raw" / "a.jsonl", balanced(3))
    r = runner.invoke(app, ["validate", "data/raw", "-o", "validate.data_docs=false"])
    assert r.exit_code == 0 and (project / "data" / "validated" / "report.json").is_file(), r.output


def test_confine_returns_the_resolved_path(project):
    (project / "sub").mkdir()
    assert confine("sub/../data.jsonl", allowed_roots(project)) == project.resolve() / "data.jsonl"


# ---------------------------------------------------------------------------
# 4. Chat templates: checked before they are used or embedded in a GGUF, rendered in the sandbox

ESCAPES = {
    "class walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "hidden branch": "{% for m in messages %}{% if m['content'] == 'pwn' %}{{ cycler.__init__.__globals__.os.popen('id').read() }}"
                     "{% endif %}{{ m['content'] }}{% endfor %}",
    "item access": "{{ messages['__class__'] }}",
    "attr filter": "{{ messages | attr('__class__') }}",
    "built at run time": "{{ messages | attr('__cla' ~ 'ss__') }}",  # only the sandbox render sees this name
}


@pytest.mark.parametrize("name", ESCAPES)
def test_escaping_templates_are_refused(name):
    with pytest.raises(UnsafeModel, match="refused"):
        check_chat_template(ESCAPES[name], "tokenizer_config.json")


def test_real_templates_pass(tokenizer):
    check_chat_template(tokenizer.chat_template, "embedded")
    llama3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
              "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
              "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    check_chat_template(llama3, "llama3")
    check_chat_template({"default": tokenizer.chat_template, "tool_use": llama3}, "multi")


def test_ftlib_renders_templates_only_in_the_sandbox(tokenizer):
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers.utils.chat_template_utils import _compile_jinja_template

    # ftlib renders through transformers (ftlib.core.formats) and, for GGUF, llama-cpp-python: both sandboxed
    assert isinstance(_compile_jinja_template(tokenizer.chat_template).environment, ImmutableSandboxedEnvironment)
    assert isinstance(Jinja2ChatFormatter(tokenizer.chat_template, "</s>", "<s>")._environment.environment,
                      ImmutableSandboxedEnvironment)
    with pytest.raises(SecurityError):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=ESCAPES["class walk"], tokenize=False)
    # and no ftlib module builds an unsandboxed Jinja environment of its own
    unsandboxed = re.compile(r"jinja2\.(Environment|Template)\(|from jinja2 import [^\n]*\b(Environment|Template)\b")
    hits = [str(f) for d in ("ftlib", "dags", "plugins") for f in (REPO / d).rglob("*.py") if unsandboxed.search(f.read_text())]
    assert not hits, hits


def _evil_tokenizer(path: Path, tokenizer) -> Path:
    tokenizer.save_pretrained(path)
    files = [f for f in ("chat_template.jinja", "tokenizer_config.json") if (path / f).is_file()]
    if (path / "chat_template.jinja").is_file():
        (path / "chat_template.jinja").write_text(ESCAPES["class walk"])
    else:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": ESCAPES["class walk"]}))
    return path / files[0]


def test_tokenizer_with_an_escaping_template_is_refused(tmp_path, tokenizer):
    from ftlib.core.models import load_tokenizer

    source = _evil_tokenizer(tmp_path / "tok", tokenizer)
    for light in (False, True):
        with pytest.raises(UnsafeModel, match=rf"{re.escape(str(source))} \(chat_template\): line 1 reads private attributes \(__class__, __mro__, __subclasses__\)"):
            load_tokenizer(str(tmp_path / "tok"), light=light)
    data = write_jsonl(tmp_path / "d.jsonl", balanced(3))
    r = runner.invoke(app, ["validate", str(data), "--no-report", "-o", f"base_model={tmp_path / 'tok'}"])
    assert r.exit_code == 2 and "private attributes" in r.output


def test_quantize_refuses_the_template_before_embedding_it(tmp_path, tiny_model, tokenizer):
    from ftlib.stages.quantize import quantize

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    _evil_tokenizer(model, tokenizer)
    with pytest.raises(UnsafeModel, match="private attributes"):
        quantize(str(model), tmp_path / "q", tmp_path / "merged", ["f16", "bnb-nf4"], progress=lambda m: None)
    assert not list((tmp_path / "q").glob("*.gguf")) and not (tmp_path / "q" / "bnb-nf4").exists()


@pytest.mark.slow
def test_a_gguf_file_with_an_escaping_template_is_refused(tmp_path):
    """A foreign GGUF (no tokenizer beside it): its tokenizer.chat_template metadata is checked."""
    from ftlib.core.models import _gguf_path, gguf_tokenizer

    (tmp_path / "evil.jinja").write_text(ESCAPES["hidden branch"])
    evil = tmp_path / "evil.gguf"
    proc = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(_gguf_path("smollm2-135m-instruct")[0]),
                           str(evil), "--chat-template-file", str(tmp_path / "evil.jinja"), "--force"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(UnsafeModel, match=r"evil\.gguf \(tokenizer\.chat_template metadata\).*private attributes \(__globals__, __init__\)"):
        gguf_tokenizer(str(evil))


# ---------------------------------------------------------------------------
# 5. No secret literals in git

SECRET_PATTERNS = {
    "aws-access-key-id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "aws-secret-access-key": r"(?i)aws_secret_access_key['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{20,}",
    "private-key": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    "github-token": r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{40,})\b",
    "huggingface-token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "slack-token": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    "slack-webhook": r"https://hooks\.slack\.com/services/T[A-Za-z0-9_/]+",
    "openai-key": r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}",
    "password-literal": r"(?i)(?:password|passwd)\w*['\"]?\s*[:=]\s*['\"][^'\"\s]{8,}['\"]",
    # KEY=value in .env files, shell, compose, Dockerfiles: upper-case names only (Python names like
    # secret_key_ref are code, not secrets); ${VAR...} references are how secrets should appear
    "env-secret": r"(?m)^[ \t-]*(?:export[ \t]+|ENV[ \t]+)?[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY)[A-Z0-9_]*"
                  r"[ \t]*[=:][ \t]*(?![$'\"{<])[^\s#]{8,}",
}
# Documented local-dev placeholders, allowed by exact text: (file, matched text).
ALLOWED_SECRETS = {
    ("docker/.env.example", "POSTGRES_PASSWORD=change-me"),  # template for docker/.env: "change every value"
    ("docker/.env.example", "AIRFLOW_JWT_SECRET=change-me-to-a-long-random-string"),
    ("docker/.env.example", "MINIO_ROOT_PASSWORD=change-me-too"),
    ("docker/.env.example", "AIRFLOW_ADMIN_PASSWORD=change-me-three"),  # the Airflow admin airflow-init creates
}


def scan_secrets(path: Path, name: str | None = None) -> list[str]:
    """FILE:LINE: RULE for every secret-looking literal in one file (binary files are skipped)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return []
    text, name = data.decode("utf-8", "replace"), name or str(path)
    found = []
    for rule, rx in SECRET_PATTERNS.items():
        for m in re.finditer(rx, text):
            if (name, m.group(0).strip(" \t-")) not in ALLOWED_SECRETS:
                found.append(f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {rule}")
    return found


def test_no_secret_literals_in_tracked_files():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    tracked = [f for f in files if f and (REPO / f).is_file()]
    assert len(tracked) > 50
    hits = [h for f in tracked for h in scan_secrets(REPO / f, f)]
    assert not hits, "secret-looking literals (move them to the environment / docker/.env):\n" + "\n".join(hits)


def test_every_allowed_placeholder_is_still_there():
    """An allowlist entry that no longer matches anything is stale: remove it rather than keep a silent exception."""
    for name, text in ALLOWED_SECRETS:
        assert text in (REPO / name).read_text(), (name, text)


def test_the_scanner_finds_planted_secrets(tmp_path):
    fake = {  # assembled at run time so this file itself stays clean
        "aws-access-key-id": "aws_key = '" + "AKIA" + "ABCDEFGHIJKLMNOP" + "'",
        "aws-secret-access-key": "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY",
        "private-key": "-----BEGIN " + "RSA PRIVATE KEY-----",
        "github-token": "token: " + "ghp_" + "a1B2" * 9,
        "huggingface-token": "HF=" + "hf_" + "abcdefghij" * 3 + "x",
        "slack-token": "xox" + "b-123456789012-abcdefghij",
        "password-literal": 'db_password = "' + "hunter2hunter2" + '"',
        "env-secret": "MINIO_ROOT_" + "PASSWORD=s3cr3t-but-real",
    }
    planted = tmp_path / "leak.env"
    planted.write_text("\n".join(fake.values()) + "\nSAFE=${MINIO_ROOT_PASSWORD:?set in .env}\n")
    hits = scan_secrets(planted, "leak.env")
    assert sorted(h.split(": ")[1] for h in hits) == sorted(fake), hits
    assert hits[0].startswith("leak.env:1: ")
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / ".env.example").write_text("POSTGRES_PASSWORD=change-me\nPOSTGRES_PASSWORD=real-password-1\n")
    assert scan_secrets(tmp_path / "docker" / ".env.example", "docker/.env.example") == ["docker/.env.example:2: env-secret"]


def test_compose_takes_every_credential_from_the_environment():
    compose = (REPO / "docker" / "docker-compose.yaml").read_text()
    assert "minioadmin" not in compose
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AIRFLOW__API_AUTH__JWT_SECRET"):
        values = re.findall(rf"^\s*{key}:\s*(.+)$", compose, re.M)
        assert values and all(v.startswith("${") and ":?" in v for v in values), (key, values)


# ---------------------------------------------------------------------------
# 7. Dependency audit (scripts/audit.py): the decisions, on canned pip-audit JSON

AUDIT = REPO / "scripts" / "audit.py"


def _audit(tmp_path: Path, report: dict | None, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(AUDIT), *args]
    if report is not None:
        (tmp_path / "report.json").write_text(json.dumps(report))
        cmd += ["--report", str(tmp_path / "report.json")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


CLEAN = {"name": "requests", "version": "2.34.2", "vulns": []}
NOT_ON_PYPI = "Dependency not found on PyPI and could not be audited"


def test_audit_fails_on_a_vulnerability_with_a_fix(tmp_path):
    report = {"dependencies": [CLEAN, {"name": "jinja2", "version": "3.1.4", "vulns": [
        {"id": "GHSA-q2x7-8rv6-6q7h", "fix_versions": ["3.1.5"], "aliases": ["CVE-2024-56201"], "description": "sandbox escape"}]}],
        "fixes": []}
    r = _audit(tmp_path, report)
    assert r.returncode == 1, r.stdout
    assert re.search(r"^jinja2\s+3\.1\.4\s+GHSA-q2x7-8rv6-6q7h\s+3\.1\.5$", r.stdout, re.M) and "FAILED: 1 known vulnerability" in r.stdout


def test_audit_lists_but_passes_a_vulnerability_without_a_fix(tmp_path):
    report = {"dependencies": [CLEAN, {"name": "torch", "version": "2.13.0", "vulns": [{"id": "PYSEC-0000-1", "fix_versions": []}]},
                               {"name": "ftlib", "skip_reason": "distribution marked as editable"}]}
    r = _audit(tmp_path, report)
    assert r.returncode == 0, r.stdout
    assert re.search(r"^torch\s+2\.13\.0\s+PYSEC-0000-1\s+no fix yet$", r.stdout, re.M)
    assert "1 could not be audited: ftlib" in r.stdout and "without a fix" in r.stdout and "NOT performed" not in r.stdout


def test_audit_clean(tmp_path):
    r = _audit(tmp_path, {"dependencies": [CLEAN], "fixes": []})
    assert r.returncode == 0 and "ok: no known vulnerabilities" in r.stdout


def test_audit_says_not_performed_when_every_dependency_was_skipped(tmp_path):
    report = {"dependencies": [{"name": n, "skip_reason": f"{NOT_ON_PYPI}: {n} (1.0)"} for n in ("a", "b", "c")], "fixes": []}
    r = _audit(tmp_path, report)
    assert r.returncode == 0
    assert r.stdout.startswith("dependency audit NOT performed: all 3 dependencies were skipped (3 x " + NOT_ON_PYPI)
    assert "no known vulnerabilities" not in r.stdout.lower()


def test_audit_says_not_performed_when_the_service_is_unreachable(tmp_path):
    """The real pip-audit against a vulnerability service that refuses connections."""
    pytest.importorskip("pip_audit")
    r = _audit(tmp_path, None, "--", "-s", "osv", "--osv-url", "http://127.0.0.1:9/v1/query", "--timeout", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("dependency audit NOT performed: pip-audit exit 1: ") and "127.0.0.1" in r.stdout


def test_ci_audits_before_the_tests():
    lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert "set -euo pipefail" in lines and lines[-1] == "make test"
    assert lines.index(".venv/bin/python scripts/audit.py") < lines.index("make test")
    assert "pip-audit" in (REPO / "pyproject.toml").read_text() and re.search(r"^pip-audit==", (REPO / "constraints.txt").read_text(), re.M)


# ---------------------------------------------------------------------------
# No credentials in lineage, tags or messages (issue 16)

FAKE_TOKEN = "ghp_FAKEtoken1234567890abcdef"


@pytest.mark.parametrize("url, shown", [
    (f"https://x-access-token:{FAKE_TOKEN}@github.com/org/repo.git", "https://github.com/org/repo.git"),
    (f"https://{FAKE_TOKEN}@github.com/org/repo.git", "https://github.com/org/repo.git"),
    ("http://alice:S3cret@mlflow.internal:5000", "http://mlflow.internal:5000"),
    ("ssh://git:S3cret@host/repo.git", "ssh://git@host/repo.git"),
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
])
def test_urls_lose_their_credentials(url, shown):
    from ftlib.core.security import redact_url

    assert redact_url(url) == shown


def test_a_token_in_the_git_remote_never_reaches_the_lineage(tmp_path):
    from ftlib.core import lineage

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin",
                    f"https://x-access-token:{FAKE_TOKEN}@github.com/org/repo.git"], check=True)
    make_splits(tmp_path / "data" / "splits")
    (tmp_path / "adapter").mkdir()
    from ftlib.core.config import as_dict

    tags = lineage.of(lineage.collect(as_dict(Params()), tmp_path / "data" / "splits", tmp_path / "adapter", root=tmp_path))
    assert tags["git.remote"] == "https://github.com/org/repo.git"
    # a version registered before this fix: the rebuild commands still print the remote without the token
    rebuild = lineage.rebuild_commands({**tags, "git.remote": f"https://u:{FAKE_TOKEN}@github.com/org/repo.git"}, "m", "1")
    assert not any(FAKE_TOKEN in v for v in tags.values()) and not any(FAKE_TOKEN in c for c in rebuild)


def test_a_password_in_the_tracking_uri_is_never_printed(tmp_path, monkeypatch):
    """A dead server: the message names it without the password (and says unreachable, which it is)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["models", "list", "m"], env={"MLFLOW_TRACKING_URI": f"http://alice:S3cret@127.0.0.1:{port}"})
    assert r.exit_code == 2, r.output
    assert f"http://127.0.0.1:{port}" in r.output and "unreachable" in r.output and "S3cret" not in r.output


def test_the_tracking_probe_sends_the_uri_credentials(monkeypatch):
    """A server behind basic auth is reachable with the URI's user:password, and a wrong one is called what it is."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ftlib.core.tracking import RegistryError, probe

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"alice:S3cret").decode()
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        probe(f"http://alice:S3cret@127.0.0.1:{port}")  # no error
        with pytest.raises(RegistryError, match="refused the credentials") as e:
            probe(f"http://alice:wrong@127.0.0.1:{port}")
        assert "wrong" not in str(e.value)
    finally:
        server.shutdown()
