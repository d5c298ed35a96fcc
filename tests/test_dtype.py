"""Loading in bf16/fp16 (--dtype), hub ids from the local Hugging Face cache, GPU memory in
manifests, batches that back off on out-of-memory, and fp32 keys that never change.

Everything runs on a CPU with tiny random models; CUDA is faked where a test needs its
bookkeeping (``torch.cuda``'s memory counters)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finesift
from finesift.data.records import Example
from finesift.engine import precision as prec
from finesift.engine.scoring import token_logprobs
from finesift.engine.tasks import CausalLMTask, task_for
from finesift.errors import OptionError
from finesift.methods.base import MethodContext, get_method, model_identity, run_fingerprint
from finesift.models import loader
from finesift.models.loader import load_model

ROOT = Path(__file__).resolve().parents[1]


def param_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


# -- loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, want", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                         ("fp16", torch.float16)])
def test_a_model_loads_in_the_dtype_asked_for(tiny_lm_dir: Path, dtype: str,
                                              want: torch.dtype) -> None:
    b = load_model(str(tiny_lm_dir), "lm", dtype=dtype)
    assert param_dtypes(b.model) == {want}
    assert b.info["dtype"] == dtype
    ref = load_model(str(tiny_lm_dir), "lm").model
    assert param_dtypes(ref) == {torch.float32}  # the default is unchanged
    # the same weights, rounded to the dtype
    w, r = b.model.lm_head.weight, ref.lm_head.weight
    assert torch.equal(w, r.to(want))


def test_a_new_ner_head_loads_in_bf16_too(tiny_ner_dir: Path) -> None:
    b = load_model(str(tiny_ner_dir), "ner", labels=["O", "B-PER", "I-PER"], dtype="bf16")
    assert param_dtypes(b.model) == {torch.bfloat16} and b.new_head


def test_a_task_written_before_dtype_gets_its_model_cast(tiny_lm_dir: Path) -> None:
    class OldTask(CausalLMTask):  # load_pretrained without the dtype keyword
        @classmethod
        def load_pretrained(cls, path, *, labels, seed, info):
            return CausalLMTask.load_pretrained(path, labels=labels, seed=seed, info=info)

    b = load_model(str(tiny_lm_dir), OldTask, dtype="bf16")
    assert param_dtypes(b.model) == {torch.bfloat16}


def test_auto_is_bf16_only_where_fast_and_where_the_method_allows(monkeypatch) -> None:
    here = "bf16" if prec.cpu_has_fast_bf16() else "fp32"
    assert prec.resolve_dtype("auto", "cpu") == here
    monkeypatch.setattr(prec, "device_has_fast_bf16", lambda device="cpu": True)
    assert prec.resolve_dtype("auto", "cpu") == "bf16"
    tov = get_method("tov")
    # ToV scores in fp32 by default: auto keeps fp32, an explicit bf16 is refused (saying
    # how to allow it)
    assert prec.resolve_dtype("auto", "cpu", required=tov.required_dtype()) == "fp32"
    with pytest.raises(OptionError, match="score_precision=auto"):
        prec.resolve_dtype("bf16", "cpu", required=tov.required_dtype(), trains=tov.trains)
    relaxed = get_method("tov", {"score_precision": "auto"})
    assert relaxed.required_dtype() is None
    assert prec.resolve_dtype("auto", "cpu", required=relaxed.required_dtype()) == "bf16"
    assert get_method("tov", {"adapter": "full", "score_precision": "auto"}).required_dtype()
    # fp16 is refused where the model is trained or differentiated, fine for a forward pass
    for name in ("tov", "less", "tracin", "harp"):
        meth = get_method(name, {"score_precision": "auto"} if name == "tov" else None)
        with pytest.raises(OptionError, match="fp16 gradients underflow"):
            prec.resolve_dtype("fp16", "cpu", required=meth.required_dtype(),
                               trains=meth.trains, who=name)
    perplexity = get_method("perplexity")
    assert prec.resolve_dtype("fp16", "cpu", required=perplexity.required_dtype(),
                              trains=perplexity.trains) == "fp16"
    with pytest.raises(OptionError, match="--dtype must be one of"):
        prec.resolve_dtype("int8", "cpu")


# -- selection --------------------------------------------------------------------------


def test_select_in_bf16_records_the_dtype(lm_data, tiny_lm_dir: Path, tmp_path: Path) -> None:
    kw = {"budget": 10, "method": "perplexity", "model": str(tiny_lm_dir), "max_length": 64}
    sel16 = finesift.select(lm_data.pool, lm_data.target, dtype="bf16", out=tmp_path / "bf16",
                            **kw)
    sel32 = finesift.select(lm_data.pool, lm_data.target, out=tmp_path / "fp32", **kw)
    man = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert man["dtype"] == "bf16" and man["model"]["dtype"] == "bf16"
    assert sel32.manifest["dtype"] == "fp32" and sel32.manifest["model"]["dtype"] == "fp32"
    # config.yaml runs the same selection again, in bf16
    assert "dtype: bf16" in (tmp_path / "bf16" / "config.yaml").read_text()
    # bf16 weights give nearly the fp32 losses (not the same numbers)
    assert not np.array_equal(sel16.scores, sel32.scores)
    assert np.corrcoef(sel16.scores, sel32.scores)[0, 1] > 0.99
    # a CPU run has no GPU figures
    assert "peak_gpu_mb" not in man
    assert all("peak_gpu_mb" not in stage for stage in man["stages"].values())


def test_the_cli_takes_dtype(lm_data, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    from finesift.cli import main

    out = tmp_path / "cli"
    code = main(["select", "--method", "perplexity", "--pool", *map(str, lm_data.pool),
                 "--target", str(lm_data.target), "--budget", "5", "--out", str(out),
                 "--model", str(tiny_lm_dir), "--dtype", "bf16", "--no-progress"])
    assert code == 0
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bf16"
    code = main(["select", "--method", "tov", "--pool", *map(str, lm_data.pool),
                 "--target", str(lm_data.target), "--budget", "5", "--out",
                 str(tmp_path / "tov"), "--model", str(tiny_lm_dir), "--dtype", "bf16"])
    err = capsys.readouterr().err
    assert code == 2 and "--dtype bf16: method 'tov' needs fp32 weights" in err


def test_a_model_object_keeps_its_dtype_and_is_checked(lm_data, tiny_lm_dir: Path) -> None:
    b = load_model(str(tiny_lm_dir), "lm", dtype="bf16")
    kw = {"budget": 5, "max_length": 64, "model": (b.model, b.tokenizer)}
    sel = finesift.select(lm_data.pool, lm_data.target, method="perplexity", **kw)
    assert sel.manifest["dtype"] == "bf16" and sel.manifest["model"]["dtype"] == "bf16"
    with pytest.raises(OptionError, match="given a bf16 model object"):
        finesift.select(lm_data.pool, lm_data.target, method="tov", **kw)


def test_workers_load_the_model_in_the_runs_dtype(tiny_lm_dir: Path) -> None:
    from finesift.methods.base import load_spec_model

    spec = {"name": str(tiny_lm_dir), "task": "lm", "labels": None, "seed": 0, "dtype": "bf16"}
    assert param_dtypes(load_spec_model(spec)) == {torch.bfloat16}
    assert param_dtypes(load_spec_model({**spec, "dtype": "fp32"})) == {torch.float32}


# -- fp32 keys stay what they were ------------------------------------------------------


def _ctx(spec: dict | None) -> MethodContext:
    ex = [Example(index=i, input_ids=np.arange(5 + i, dtype=np.int64),
                  labels=np.arange(5 + i, dtype=np.int64), n_label_tokens=5 + i)
          for i in range(3)]
    return MethodContext(pool=ex[:2], target=ex[2:], pool_records=[], target_records=[],
                         task=CausalLMTask(0), model_spec=spec)


def test_fp32_fingerprints_are_those_from_before_dtypes() -> None:
    """The values were computed with the code before ``dtype`` existed: existing work
    folders, HARP caches, shard runs and auto's fine-tunes stay valid."""
    from finesift.evaluate.auto import _FINETUNE_VERSION, _hash
    from finesift.evaluate.finetune import FinetuneOptions, finetune_key_fields
    from finesift.methods.harp import HarpOptions, _RunCache
    from finesift.methods.tov import ToVOptions
    from finesift.shards import run_identity

    old = {"name": "smollm2-135m", "task": "lm", "labels": None, "seed": 0}
    for spec in (old, {**old, "dtype": "fp32"}):
        assert model_identity(spec) == '["smollm2-135m", "lm", null, 0]'
        assert run_fingerprint("state-v3", ToVOptions(), _ctx(spec)) == "40fadc3a5aab9a35"
    assert run_fingerprint("state-v3", ToVOptions(), _ctx({**old, "dtype": "bf16"})) \
        != "40fadc3a5aab9a35"

    losses, dom = np.array([1.0, 2.0]), np.array([0, 1])
    harp = "58e43e00618334b0cc9936a925da921f42693a8de0222a8824570b69e459f7a0"
    assert _RunCache(None, HarpOptions(), 0, losses, dom).fingerprint == harp
    assert _RunCache(None, HarpOptions(), 0, losses, dom, dtype="fp32").fingerprint == harp
    assert _RunCache(None, HarpOptions(), 0, losses, dom, dtype="bf16").fingerprint != harp

    ft = FinetuneOptions(steps=10, lr=2e-4, lora_rank=16, batch_size=8, seed=0,
                         max_length=256, precision="auto")
    assert _hash([_FINETUNE_VERSION, "data", 0, finetune_key_fields(ft), "model", "lm", None,
                  ["a"]], 16) == "9b0a5c29416f5b39"
    assert FinetuneOptions().setup_fields() == {
        "epochs": 1.0, "lr": 0.0002, "lora_rank": 16, "batch_size": 8, "max_length": 256,
        "precision": "auto", "eval_batch_size": 16, "em_samples": 0, "max_new_tokens": 256}
    assert FinetuneOptions(dtype="bf16").setup_fields()["dtype"] == "bf16"

    run = {"method": "random", "model": {}}
    data = {"pool": [], "target": []}
    plain = run_identity(run, data, 2, {})
    assert run_identity({**run, "dtype": "fp32"}, data, 2, {}) == plain
    assert run_identity({**run, "dtype": "bf16"}, data, 2, {}) == {**plain, "dtype": "bf16"}


# -- the Hugging Face cache -------------------------------------------------------------


def _hub_cache(root: Path, src: Path, repo: str = "tiny-org/tiny-lm",
               rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face cache holding ``repo`` at ``rev`` (refs/main) with ``src``'s files,
    laid out as huggingface_hub writes it (blobs + snapshot links)."""
    import hashlib

    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / rev
    (folder / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    return snap


def test_a_hub_id_loads_from_the_local_cache(tiny_lm_dir: Path, tmp_path: Path,
                                              monkeypatch, lm_data) -> None:
    cache = tmp_path / "hf" / "hub"
    snap = _hub_cache(cache, tiny_lm_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # HF_HOME/hub is the cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = load_model("tiny-org/tiny-lm", "lm", dtype="bf16")
    assert b.info["hub"] == {"repo_id": "tiny-org/tiny-lm", "revision": snap.name,
                             "cache": str(cache)}
    assert b.info["source"] == str(snap.resolve()) and b.info["dtype"] == "bf16"
    ref = load_model(str(tiny_lm_dir), "lm").model
    assert torch.equal(b.model.lm_head.weight, ref.lm_head.weight.to(torch.bfloat16))
    # a revision, and HF_HUB_CACHE over HF_HOME
    assert load_model(f"tiny-org/tiny-lm@{snap.name}", "lm").info["hub"]["revision"] == snap.name
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(OptionError, match="elsewhere"):
        load_model("tiny-org/tiny-lm", "lm")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # a whole selection by hub id; its resume keys know the snapshot
    sel = finesift.select(lm_data.pool, lm_data.target, budget=5, method="perplexity",
                          model="tiny-org/tiny-lm", max_length=64)
    assert sel.manifest["model"]["hub"]["revision"] == snap.name
    spec = {"name": "tiny-org/tiny-lm", "task": "lm", "labels": None, "seed": 0}
    assert json.loads(model_identity(spec))[4] == ["hub", snap.name]


def test_a_hub_id_not_in_the_cache_says_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OptionError) as err:
        load_model("HuggingFaceTB/SmolLM2-135M", "lm")
    msg = str(err.value)
    assert "HuggingFaceTB/SmolLM2-135M" in msg and str(tmp_path / "cache") in msg
    assert "hf download HuggingFaceTB/SmolLM2-135M" in msg and "HF_HUB_CACHE" in msg
    # a path that is neither a folder nor a hub id keeps the folder message
    with pytest.raises(OptionError, match="not a local model folder"):
        load_model(str(tmp_path / "no" / "such" / "folder"), "lm")
    assert loader.hub_id("./models/x") is None and loader.hub_id("org/name@v1") == ("org/name",
                                                                                      "v1")


# -- out of memory ----------------------------------------------------------------------


def _oom_above(model: torch.nn.Module, rows: int, seen: list[int]) -> None:
    """Make ``model``'s decoder raise out-of-memory for batches of more than ``rows``."""

    def hook(module, args, kwargs):
        n = kwargs["input_ids"].shape[0]
        seen.append(n)
        if n > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake: {n} rows)")

    model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def test_scoring_halves_a_batch_that_runs_out_of_memory(tiny_lm_dir: Path, caplog) -> None:
    b = load_model(str(tiny_lm_dir), "lm")
    task = task_for("lm", b.tokenizer)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(20):
        n = int(rng.integers(6, 14))
        ids = rng.integers(5, 40, n).astype(np.int64)
        labels = ids.copy()
        labels[: n // 2] = -100
        examples.append(Example(index=i, input_ids=ids, labels=labels,
                                n_label_tokens=int((labels != -100).sum())))
    want = token_logprobs(b.model, task, examples, batch_size=8)
    seen: list[int] = []
    _oom_above(b.model, 2, seen)
    with caplog.at_level(logging.WARNING):
        got = token_logprobs(b.model, task, examples, batch_size=8)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    assert seen[:3] == [8, 4, 2]  # halved down to what fits
    assert max(n for n in seen[3:]) <= 3 and sum(n for n in seen if n <= 2) == 20
    warnings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "8 rows" in warnings[0].getMessage()
    # one row that does not fit: a clear error, not a loop
    _oom_above(b.model, 0, [])
    longest = max(len(e) for e in examples)
    with pytest.raises(OptionError, match=f"single example of {longest} tokens"):
        token_logprobs(b.model, task, examples, batch_size=8)


# -- GPU memory in the manifest ---------------------------------------------------------


class FakeCuda:
    """``torch.cuda``'s memory counters, driven by the test."""

    def __init__(self) -> None:
        self.allocated = [0, 0]  # per device, bytes
        self.peak = [0, 0]

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return 2

    def alloc(self, device: int, mib: float) -> None:
        self.allocated[device] = int(mib * 2**20)
        self.peak[device] = max(self.peak[device], self.allocated[device])

    def max_memory_allocated(self, device: int = 0) -> int:
        return self.peak[device]

    def reset_peak_memory_stats(self, device: int = 0) -> None:
        self.peak[device] = self.allocated[device]


def test_stages_record_gpu_peaks_when_cuda_is_used(monkeypatch) -> None:
    from finesift.store import manifest
    from finesift.store.run import run_manifest

    fake = FakeCuda()
    monkeypatch.setattr(manifest, "_cuda", lambda: fake)
    monkeypatch.setattr(manifest, "_SEEN_GPU_MB", 0.0)
    watch = manifest.Stopwatch()
    fake.alloc(0, 50)
    with watch.stage("outer"):
        with watch.stage("load_model"):
            fake.alloc(0, 300)
            fake.alloc(0, 100)
        with watch.stage("score"):  # starts from 100 MiB held, peaks on the second GPU
            fake.alloc(1, 700)
            fake.alloc(1, 0)
    stages = watch.to_dict()
    assert stages["load_model"]["peak_gpu_mb"] == 300.0
    assert stages["score"]["peak_gpu_mb"] == 700.0
    assert stages["outer"]["peak_gpu_mb"] == 700.0  # the nested stages' peaks count
    man = run_manifest({}, {}, {}, watch=watch, t_start=0.0)
    assert man["peak_gpu_mb"] == 700.0 and list(man)[-2:] == ["peak_gpu_mb", "versions"]


# -- fine-tuning and the benchmark ------------------------------------------------------


def test_finetune_in_bf16_on_a_device(lm_data, tiny_lm_dir: Path) -> None:
    from finesift.evaluate.finetune import FinetuneOptions, finetune_and_evaluate, read_records

    train = read_records(lm_data.pool[0], "train")[:8]
    test = read_records(lm_data.target, "test")[:4]
    opts = FinetuneOptions(steps=2, batch_size=4, max_length=64, dtype="bf16")
    res = finetune_and_evaluate(train, test, model=str(tiny_lm_dir), options=opts,
                                measure_base=False, device="cpu")
    assert res.info["model"]["dtype"] == "bf16" and np.isfinite(res.test_loss)
    assert res.info["finetune"]["dtype"] == "bf16" and "peak_gpu_mb" not in res.info
    with pytest.raises(OptionError, match="loss scaling"):
        FinetuneOptions(dtype="fp16").validate()
    with pytest.raises(OptionError, match="full fine-tuning"):
        FinetuneOptions(dtype="bf16", lora_rank=0).validate()


def test_bench_config_takes_device_and_dtype(tmp_path: Path, lm_data) -> None:
    from finesift.evaluate.bench import ConfigError, load_config

    def config(**extra) -> Path:
        lines = ["name: t", "task: lm", "pool:", f"  - {{name: a, path: {lm_data.pool[0]}}}",
                 f"target: {{val: {lm_data.target}, test: {lm_data.target}}}",
                 "methods: [random]", "budgets: [4]"]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        path = tmp_path / "b.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    cfg = load_config(config())
    assert (cfg.device, cfg.dtype, cfg.finetune.dtype) == ("cpu", "fp32", "fp32")
    cfg = load_config(config(device="cuda:1", dtype="bf16"))
    assert (cfg.device, cfg.dtype, cfg.finetune.dtype) == ("cuda:1", "bf16", "bf16")
    with pytest.raises(ConfigError, match="fp16 cannot fine-tune"):
        load_config(config(dtype="fp16"))
    with pytest.raises(ConfigError, match="disagree"):
        load_config(config(dtype="bf16", finetune="{dtype: fp32}"))


# -- benchmarks/gpu_check.py ------------------------------------------------------------


def test_gpu_check_says_there_is_no_gpu() -> None:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU present" in proc.stdout


def test_gpu_check_compares_two_runs() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" /
                                                  "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = {"scores": {"x": 1.0, "y": 2.0, "z": 3.0}, "selected": ["z", "y"]}
    b = {"scores": {"x": 1.5, "y": 1.9, "z": 3.2, "w": 0.0}, "selected": ["z", "x"]}
    c = mod.compare(a, b)
    assert c["n"] == 3 and c["spearman"] == pytest.approx(1.0)
    assert c["max_abs_diff"] == pytest.approx(0.5) and c["selection_overlap"] == 0.5


def test_fast_bf16_env_override(monkeypatch) -> None:
    """FINESIFT_FAST_BF16=0 makes every ``auto`` fp32 on any CPU (to extend results
    measured without fast bf16), =1 makes it bf16; anything else is refused."""
    monkeypatch.setattr(prec, "_cpu_flags_have_bf16", lambda: True)
    monkeypatch.setenv("FINESIFT_FAST_BF16", "0")
    assert not prec.cpu_has_fast_bf16()
    assert prec.resolve("auto") == "fp32" and prec.resolve_dtype("auto", "cpu") == "fp32"
    from finesift.evaluate.bench import machine

    assert machine().endswith("fast bf16 off (FINESIFT_FAST_BF16=0)")
    monkeypatch.setattr(prec, "_cpu_flags_have_bf16", lambda: False)
    monkeypatch.setenv("FINESIFT_FAST_BF16", "1")
    assert prec.cpu_has_fast_bf16() and prec.resolve("auto") == "bf16"
    assert ", fast bf16" in machine() and "off" not in machine()
    monkeypatch.setenv("FINESIFT_FAST_BF16", "yes")
    with pytest.raises(ValueError, match="FINESIFT_FAST_BF16 must be 0 or 1"):
        prec.cpu_has_fast_bf16()
    monkeypatch.delenv("FINESIFT_FAST_BF16")
    assert not prec.cpu_has_fast_bf16()
