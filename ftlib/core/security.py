"""The security checks, one small function per door where untrusted input enters ftlib.

  confine(path, roots)            a data/model/output path must resolve (symlinks followed)
                                  inside an allowed root: the project dir, the ftlib cache,
                                  the system temp dir, plus params.yaml `paths.allowed_roots`
  check_model_dir(dir, ...)       no custom Python shipped with a model unless
                                  `trust_remote_code: true`; safetensors weights only unless
                                  `allow_pickle_weights: true` (pickle can run code on load)
  check_chat_template(t, source)  a Jinja chat template read from a tokenizer or a GGUF file
                                  touches no private attribute and renders in the sandbox

Stdlib-only at import (jinja2 and transformers are imported when a check needs them).
DESIGN.md "Security" lists where each check is called.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from ftlib.core.errors import ModelError, cache_dir

ROOTS_SETTING = "paths.allowed_roots"


class PathError(ValueError):
    """A path outside every allowed root (CLI exit 2)."""


class UnsafeModel(ModelError):
    """A model that would run code ftlib was not told to trust: custom code, pickle weights, an escaping template."""


# ---------------------------------------------------------------------------
# Paths

def redact_url(url: str) -> str:
    """A URL without credentials, safe for tags, logs and messages: http(s) userinfo (a token or user:password)
    is dropped; other schemes keep the user name and lose the password. scp-style `git@host:path` is kept."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    if parts.scheme in ("http", "https"):
        netloc = host
    else:
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    return urlunsplit(parts._replace(netloc=netloc))


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """(the URL without userinfo, (user, password) or None): for an HTTP probe with basic auth."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def allowed_roots(project: str | Path, extra: Iterable[str] = ()) -> list[Path]:
    """The project dir, the ftlib cache, the system temp dir, then `extra` (~ and $VARS expanded)."""
    roots = [Path(project), cache_dir(), Path(tempfile.gettempdir())]
    roots += [Path(os.path.expandvars(str(r))).expanduser() for r in extra]
    return [r.resolve() for r in roots]


def confine(path: str | Path, roots: Iterable[Path]) -> Path:
    """`path` resolved (symlinks followed, `..` collapsed) if it lies inside one of `roots`, else PathError."""
    resolved = Path(path).expanduser().resolve()
    roots = list(roots)
    if any(resolved.is_relative_to(r) for r in roots):
        return resolved
    raise PathError(f"{path}: resolves to {resolved}, outside the allowed roots ({', '.join(map(str, roots))}); "
                    f"add a root to params.yaml `{ROOTS_SETTING}` to allow it")


# ---------------------------------------------------------------------------
# Model files

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_model_dir(path: str | Path, trust_remote_code: bool = False, allow_pickle_weights: bool = False) -> None:
    """Refuse a local model/adapter directory that needs custom code or has only pickle weights.

    A hub id is not checked here: from_pretrained gets trust_remote_code and use_safetensors.
    """
    path = Path(path)
    if not path.is_dir():
        return
    if not trust_remote_code:
        for f, modules in _custom_code(path):
            raise UnsafeModel(f"{f}: `auto_map` asks to run Python shipped with the model ({', '.join(modules)}); "
                              "ftlib does not run it unless params.yaml `trust_remote_code: true` (only for code you have read)")
    if allow_pickle_weights or any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin")
    if pickles:
        raise UnsafeModel(f"{path / pickles[0]}: pickle weights (loading a pickle can run code) and no *.safetensors; "
                          "ftlib loads safetensors only: convert the weights to safetensors, or set params.yaml "
                          "`allow_pickle_weights: true` if you trust this file (then torch loads it with weights_only=True)")


def _custom_code(path: Path) -> list[tuple[Path, list[str]]]:
    """(file, python modules) for each auto_map that transformers would need to import: the
    model_type / tokenizer_class is not one transformers ships (with a native class it ignores auto_map)."""
    found = []
    for name, key in (("config.json", "model_type"), ("tokenizer_config.json", "tokenizer_class")):
        f = path / name
        try:
            data = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not data.get("auto_map") or _native(key, data.get(key)):
            continue
        refs = [v for vs in data["auto_map"].values() for v in (vs if isinstance(vs, list) else [vs]) if v]
        found.append((f, sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})))
    return found


def _native(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if key == "model_type":
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        return value in CONFIG_MAPPING_NAMES
    import transformers

    return hasattr(transformers, value) or hasattr(transformers, value.removesuffix("Fast"))


# ---------------------------------------------------------------------------
# Chat templates

SAMPLE_CHAT = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def check_chat_template(template: str | dict[str, str] | None, source: str | Path) -> None:
    """Refuse a chat template that reaches for private attributes (the way out of Jinja into Python).

    Two checks: no `_name` attribute/item/attr() in the template source (catches branches a
    test render would not take), and one render in jinja2's ImmutableSandboxedEnvironment,
    where any such access raises SecurityError. transformers and llama-cpp-python render
    chat templates in that same sandbox at run time.
    """
    if not template:
        return
    from jinja2 import TemplateSyntaxError, nodes
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Strict(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:  # the stock sandbox returns an Undefined
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    env = Strict(extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=lambda msg: None, strftime_now=lambda fmt: "")
    env.filters["tojson"] = json.dumps
    for name, text in (template.items() if isinstance(template, dict) else [("chat_template", template)]):
        where = f"{source} ({name})"
        try:
            tree = env.parse(text)
        except TemplateSyntaxError as e:
            raise UnsafeModel(f"{where}: not a valid Jinja template: {e}") from None
        private = {}
        for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
            attr = (node.attr if isinstance(node, nodes.Getattr) else
                    node.arg.value if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) else
                    node.args[0].value if isinstance(node, nodes.Filter) and node.name == "attr" and node.args
                    and isinstance(node.args[0], nodes.Const) else None)
            if isinstance(attr, str) and attr.startswith("_"):
                private.setdefault(attr, node.lineno)
        if private:
            first = min(private.values())
            raise UnsafeModel(f"{where}: line {first} reads private attributes ({', '.join(sorted(private))}), "
                              "which is how a template escapes into Python; refused")
        try:
            env.from_string(text).render(messages=SAMPLE_CHAT, add_generation_prompt=True, bos_token="", eos_token="")
        except SecurityError as e:
            raise UnsafeModel(f"{where}: refused by the Jinja sandbox: {e}") from None
        except Exception:  # noqa: BLE001 - a template may reject our sample chat; that is not a security matter
            pass
