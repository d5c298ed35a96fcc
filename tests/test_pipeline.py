"""The staged pipeline (:mod:`finesift.pipeline`), the run writer (:mod:`finesift.store.run`)
and the import graph.

* a plain select, a shard run and a merge write manifests with exactly the entries (and
  the order) they had before the stages moved out of ``finesift.api``;
* ``random`` and ``dsir`` (no model needed) select the same records and write the same
  ``scores.parquet`` as before (values pinned from the code before the change);
* a shard run keeps its identity and fingerprint (existing shard folders still merge),
  and shards merged equal the unsharded run;
* ``method="auto"`` still goes to :func:`finesift.evaluate.auto.select_auto`, which gets
  the plain select passed in;
* no finesift module imports another that imports it back (module-level and
  function-level imports both count).
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import finesift
from finesift import api, pipeline, shards
from finesift.store import Stopwatch, chunks
from finesift.store.run import MANIFEST_KEYS, run_manifest, selection_entries

# -- pinned from the code before the redesign (finesift.api building every manifest) --

SELECT_KEYS = [
    "finesift_version", "created", "method", "method_options", "task", "model", "strategy",
    "budget", "seed", "max_length", "template", "precision", "dtype", "batch_size", "device",
    "format", "data", "selected", "method_info", "stages", "wall_seconds", "peak_rss_mb",
    "versions",
]
SHARD_KEYS = [
    "kind", "finesift_version", "created", "method", "method_options", "task", "model",
    "seed", "max_length", "template", "precision", "dtype", "batch_size", "device", "format",
    "shard", "data", "method_info", "stages", "wall_seconds", "peak_rss_mb", "versions",
]
SHARD_ENTRY_KEYS = ["num_shards", "index", "fingerprint", "rows", "pool_size", "assignment",
                    "identity", "scores_sha256"]
MERGE_KEYS = [
    "finesift_version", "created", "method", "method_options", "task", "model", "strategy",
    "budget", "seed", "max_length", "template", "precision", "dtype", "batch_size", "device",
    "format", "data", "selected", "method_info", "merged_from", "stages", "wall_seconds",
    "peak_rss_mb", "versions",
]
DATA_KEYS = ["pool", "target", "pool_records", "target_records", "pool_reading",
             "target_reading", "pool_encoding", "target_encoding", "labels"]
# added since: every select and shard run looks for duplicates and contamination
# (finesift.pipeline.screen_pool: a "dedup" stage, "dedup" and "contamination" entries in a
# select's manifest), and a balanced selection with source weights records them
SCREEN_KEYS = ["dedup", "contamination"]
RUN_SELECT_KEYS = [*SELECT_KEYS[:SELECT_KEYS.index("data") + 1], *SCREEN_KEYS,
                   *SELECT_KEYS[SELECT_KEYS.index("data") + 1:]]
SELECT_STAGES = ["read", "load_model", "encode", "dedup", "score", "select"]
SHARD_STAGES = ["read", "load_model", "encode", "dedup", "score"]
MERGE_STAGES = ["read_shards", "read_pool", "select"]

# seed 0, budget 10, the conftest lm_data and tiny LM tokenizer
PINNED = {
    "random": {
        "ids": ["text-28", "text-31", "text-13", "chat-5", "chat-33", "chat-27", "text-33",
                "text-19", "chat-17", "chat-19"],
        "scores_parquet": "307e8b174e4cd5725d9866fd1476bff5e1463366a7792f871d86853733394e9b",
    },
    "dsir": {
        "ids": ["text-30", "text-25", "text-10", "text-35", "text-5", "text-15", "text-20",
                "text-0", "chat-5", "chat-35"],
        "scores_parquet": "fc74e2829f1182d924b565e208326e8c4385c0a57b9bcf460450fad67d98893a",
    },
}
# a random shard run (2 shards) of the same data: its identity, the model's name aside
SHARD_IDENTITY = {
    "method": "random", "method_options": {}, "task": "lm", "seed": 0, "max_length": 512,
    "template": "auto", "precision": "auto", "batch_size": 8, "format": None,
    "model": {"name": "MODEL", "architecture": None, "n_parameters": None, "head": None},
    "pool_sha256": ["c0e48e088780fa73e0e4816d5e623f5a5d338ef128e3ca6b31f38ebb222e45b7",
                    "33cf0abdd30332bf6b4612a15168702abd674be1b36688de52c317bad851fced"],
    "target_sha256": ["4352cbd88527a59a2bd727d8933f044f4eea8fad5cc8080abcc2d5628898e7ec"],
    "encoded": {"pool": "47c623c48efe0513110e6fd3a1f4880d265ea3f20945a786cf01015c01a5b95f",
                "target": "e9aa6c5a6f326e280a09b149e8d875068cb5cda4398e6236e56ab2e244f0da5b",
                "pool_size": "80"},
    "num_shards": 2,
}


def table_digest(folder: Path) -> str:
    """sha256 of a ``scores.parquet``'s schema and values (file names for the sources: the
    folders differ between runs), each value as its ``repr``."""
    table = pq.read_table(folder / "scores.parquet")
    rows: dict[str, list[str]] = {}
    for col, values in table.to_pydict().items():
        rows[col] = [repr(Path(v).name if col == "source" else v) for v in values]
    blob = json.dumps({"schema": [str(f) for f in table.schema], "rows": rows}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run(lm_data, model: Path, out: Path, **kw: Any) -> pipeline.Selection:
    kw = {"budget": 10, "method": "random", "seed": 0, **kw}
    return api.select(lm_data.pool, lm_data.target, model=str(model), out=out, **kw)


# -- manifests -------------------------------------------------------------------------


def test_select_manifest_has_the_entries_it_had(lm_data, tiny_lm_dir: Path,
                                                tmp_path: Path) -> None:
    sel = run(lm_data, tiny_lm_dir, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    for man in (sel.manifest, written):
        assert list(man) == RUN_SELECT_KEYS
        assert list(man["data"]) == DATA_KEYS
        assert list(man["stages"]) == SELECT_STAGES
    assert written["budget"] == {"requested": "10", "count": 10}
    assert written["selected"] == {"count": 10, "by_source": {
        str(lm_data.pool[0]): 5, str(lm_data.pool[1]): 5}}
    assert written["model"] == {"name": str(tiny_lm_dir), "loaded": False}
    assert (written["method"], written["method_options"], written["strategy"]) == (
        "random", {}, "top")
    assert (written["batch_size"], written["max_length"], written["format"]) == (8, 512, None)
    assert written["data"]["pool_records"] == 80 and written["data"]["labels"] is None


def test_run_manifest_orders_every_kind_of_run() -> None:
    settings = {k: k for k in ("method", "method_options", "task", "model", "seed",
                               "max_length", "template", "precision", "dtype", "batch_size",
                               "device", "format")}
    picked = selection_entries("10%", 3, [])
    plain = run_manifest({**settings, "strategy": "top"}, {}, {**picked, "method_info": {}},
                         watch=Stopwatch(), t_start=0.0)
    shard = run_manifest(settings, {}, {"kind": "k", "shard": {}, "method_info": {}},
                         watch=Stopwatch(), t_start=0.0)
    merged = run_manifest({**settings, "strategy": "top"}, {},
                          {**picked, "method_info": {}, "merged_from": {}},
                          watch=Stopwatch(), t_start=0.0)
    assert (list(plain), list(shard), list(merged)) == (SELECT_KEYS, SHARD_KEYS, MERGE_KEYS)
    assert plain["budget"] == {"requested": "10%", "count": 3}
    assert plain["selected"] == {"count": 0, "by_source": {}}
    assert set(MANIFEST_KEYS) == (set(SELECT_KEYS) | set(SHARD_KEYS) | set(MERGE_KEYS)
                                  | set(SCREEN_KEYS) | {"source_weights"}
                                  | {"peak_gpu_mb"}  # only runs that used CUDA
                                  | {"columns", "exports"}  # --columns, --export runs
                                  | {"prefilter"})  # --prefilter runs
    with pytest.raises(ValueError, match="typo"):
        run_manifest(settings, {}, {"typo": 1}, watch=Stopwatch(), t_start=0.0)


# -- the same selection and scores as before -------------------------------------------


@pytest.mark.parametrize("method", ["random", "dsir"])
def test_cheap_methods_select_and_score_as_before(method: str, lm_data, tiny_lm_dir: Path,
                                                  tmp_path: Path) -> None:
    sel = run(lm_data, tiny_lm_dir, tmp_path / "out", method=method)
    assert sel.selected_ids == PINNED[method]["ids"]
    assert table_digest(tmp_path / "out") == PINNED[method]["scores_parquet"]
    written = [json.loads(line) for line in
               (tmp_path / "out" / "selected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert written == [lm_data.raw[i] for i in PINNED[method]["ids"]]


def test_shards_keep_their_fingerprint_and_merge_to_the_unsharded_run(
        lm_data, tiny_lm_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(chunks, "DEFAULT_CHUNK", 8)  # 80 examples -> 10 chunks, both shards
    full = run(lm_data, tiny_lm_dir, tmp_path / "full")
    folders = []
    for i in range(2):
        folder = tmp_path / f"s{i}"
        sel = run(lm_data, tiny_lm_dir, folder, budget=None, num_shards=2, shard_index=i)
        man = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        assert sel.manifest == man and sel.selected == []
        assert list(man) == SHARD_KEYS and list(man["shard"]) == SHARD_ENTRY_KEYS
        assert list(man["data"]) == DATA_KEYS and list(man["stages"]) == SHARD_STAGES
        assert man["kind"] == shards.SHARD_KIND and man["shard"]["index"] == i
        identity = json.loads(json.dumps(SHARD_IDENTITY))
        identity["model"]["name"] = str(tiny_lm_dir)
        assert man["shard"]["identity"] == identity
        blob = json.dumps(identity, sort_keys=True, default=str).encode()
        assert man["shard"]["fingerprint"] == hashlib.sha256(blob).hexdigest()[:24]
        assert man["shard"]["scores_sha256"] == hashlib.sha256(
            (folder / "scores.parquet").read_bytes()).hexdigest()
        assert 0 < man["shard"]["rows"] < 80
        folders.append(folder)
    merged = shards.merge(folders, tmp_path / "merged", budget=10)
    assert merged.selected_ids == full.selected_ids == PINNED["random"]["ids"]
    assert pq.read_table(tmp_path / "merged" / "scores.parquet").equals(
        pq.read_table(tmp_path / "full" / "scores.parquet"))
    assert table_digest(tmp_path / "merged") == PINNED["random"]["scores_parquet"]
    assert ((tmp_path / "merged" / "selected.jsonl").read_bytes()
            == (tmp_path / "full" / "selected.jsonl").read_bytes())
    man = json.loads((tmp_path / "merged" / "manifest.json").read_text(encoding="utf-8"))
    assert list(man) == MERGE_KEYS and list(man["stages"]) == MERGE_STAGES
    assert list(man["merged_from"]) == ["num_shards", "fingerprint", "shards"]
    for key in SELECT_KEYS:
        if key not in ("created", "stages", "wall_seconds", "peak_rss_mb", "method_info"):
            assert man[key] == full.manifest[key], key


# -- the API around the stages ---------------------------------------------------------


def test_auto_gets_the_plain_select(monkeypatch, tmp_path: Path) -> None:
    from finesift.evaluate import auto

    calls = []

    def fake_select_auto(pool, target, *, select_with, **kw):
        calls.append((pool, target, select_with, kw))
        return "done"

    monkeypatch.setattr(auto, "select_auto", fake_select_auto)
    assert api.select("p.jsonl", "t.jsonl", budget=3, method="auto", seed=4) == "done"
    (pool, target, select_with, kw) = calls[0]
    assert (pool, target, select_with) == ("p.jsonl", "t.jsonl", api.select)
    assert kw["budget"] == 3 and kw["seed"] == 4 and "method" not in kw


def test_api_keeps_the_names_it_had() -> None:
    for name in ("Selection", "EncodedData", "check_shapes", "encode", "check_seed",
                 "check_out_dir", "write_outputs", "OUTPUT_FILES", "_as_list",
                 "_check_device", "_model_name", "_shard_spec", "_make_executor",
                 "_jsonable", "write_jsonl"):
        assert hasattr(api, name), name
    assert api.Selection is pipeline.Selection
    assert api._as_list("a") == ["a"] and api._as_list([Path("a"), "b"]) == ["a", "b"]
    assert finesift.select.__module__ == "finesift"


# -- no import cycle -------------------------------------------------------------------

# The one cycle left, outside the pipeline: the method registry loads its built-in methods
# (``import finesift.methods`` inside finesift.methods.base.available()), and each built-in
# method module imports finesift.methods.base.
ALLOWED_EDGES = {("finesift.methods.base", "finesift.methods")}


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the finesift modules it imports, at module level or inside functions
    (``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``)."""
    root = package_dir.parent
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 packages
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                            for a in node.names]
        deps = set()
        for target in targets:
            while target and target not in modules:  # finesift.x.y.Name -> finesift.x.y
                target = target.rpartition(".")[0]
            if target and target != name and (name, target) not in ALLOWED_EDGES:
                deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle() -> None:
    graph = import_graph(Path(finesift.__file__).parent)
    assert {"finesift.api", "finesift.pipeline", "finesift.shards", "finesift.store.run",
            "finesift.evaluate.auto"} <= set(graph)
    assert "finesift.pipeline" in graph["finesift.api"]  # the graph sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


FLOW = ("finesift.api", "finesift.pipeline", "finesift.shards", "finesift.evaluate.auto",
        "finesift.store.run", "finesift.store")


def test_no_module_of_the_select_flow_imports_itself_back() -> None:
    """The modules a ``select`` goes through are on no cycle (whatever other cycles
    :func:`test_no_import_cycle` finds elsewhere)."""
    graph = import_graph(Path(finesift.__file__).parent)
    for module in FLOW:
        seen, todo = set(), list(graph[module])
        while todo:
            node = todo.pop()
            assert node != module, f"{module} imports itself back"
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())


def test_the_cycle_check_sees_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "finesift"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from finesift.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import thing\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle == ["finesift.a", "finesift.sub.b", "finesift.a"]
