"""`chatglm bench` results in llama-bench's own layouts, so that the two tools' outputs can be diffed.

The field names, their order and their types are llama-bench's (``struct test`` in
``tools/llama-bench/llama-bench.cpp``: ``get_fields``, ``get_field_type``); so are the markdown table (model | size |
params | backend | threads | test | t/s, a settings column only where it differs from llama-bench's default, "mean ±
stdev"), the JSON array (each record's fields, then ``samples_ns`` and ``samples_ts``), JSON lines and CSV. Settings
our engines do not have (CPU masks, polling, tensor splits) carry llama-bench's defaults; what we run differently says
so (``load_mode`` "mmap"). After llama-bench's fields each record has ours: ``engine``, ``median_ts``, ``n_ctx`` and
``peak_rss_bytes``.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import time
from typing import Any, Sequence

from chatglm.runtime.bench import BenchSettings, BenchTest, Measurement

# llama-bench's fields, in its order, with its JSON types (everything not listed is a string)
FIELDS = (
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends",
    "model_filename", "model_type", "model_size", "model_n_params", "n_batch",
    "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll",
    "type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "split_mode",
    "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "lazy_mode",
    "embeddings",
    "no_op_offload", "no_host", "repack", "fit_target", "fit_min_ctx",
    "n_prompt", "n_gen", "n_depth",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
)
INT_FIELDS = frozenset({"build_number", "n_batch", "n_ubatch", "n_threads", "poll", "model_size", "model_n_params",
                        "n_gpu_layers", "main_gpu", "n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns",
                        "no_op_offload", "n_cpu_moe", "fit_target", "fit_min_ctx", "flash_attn"})
BOOL_FIELDS = frozenset({"no_kv_offload", "cpu_strict", "embeddings", "no_host", "repack"})
FLOAT_FIELDS = frozenset({"avg_ts", "stddev_ts"})
OUR_FIELDS = ("engine", "median_ts", "n_ctx", "peak_rss_bytes")
FORMATS = ("md", "json", "jsonl", "csv")

# what llama-bench reports for the knobs our engines do not have (its cmd_params_defaults)
FIXED = {"cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "n_cpu_moe": 0, "split_mode": "layer", "main_gpu": 0,
         "no_kv_offload": False, "devices": "auto", "tensor_split": "0.00", "tensor_buft_overrides": "none",
         "load_mode": "mmap", "lazy_mode": "auto", "embeddings": False, "no_op_offload": 0, "no_host": False,
         "repack": True, "fit_target": 0, "fit_min_ctx": 0, "n_depth": 0}


LLAMA_BENCH_DEFAULTS = {"n_batch": 2048, "n_ubatch": 512, "type_k": "f16", "type_v": "f16", "flash_attn": -1}
# markdown: the column of a setting (shown when it is not llama-bench's default), its title and width
_SETTING_COLUMNS = (("n_batch", "n_batch", 7), ("n_ubatch", "n_ubatch", 8), ("type_k", "type_k", 6),
                    ("type_v", "type_v", 6), ("flash_attn", "fa", 3))


# ------------------------------------------------------------------------------------------------ the system
def system_fields() -> dict[str, Any]:
    """build_commit, build_number, cpu_info, gpu_info and backends, from ggml's backend registry as llama-bench
    reads them (the build is llama-cpp-python's: its llama.cpp commit is not recorded in the wheel)."""
    import llama_cpp

    from chatglm.runtime.rpc import registry

    g = registry()  # libggml's backend registry, declared once
    devices = [g.dev_get(i) for i in range(g.dev_count())]
    kinds = {d: g.dev_type(d) for d in devices}
    text = lambda d: g.dev_description(d).decode("utf-8", "replace")  # noqa: E731
    cpu = [text(d) for d in devices if kinds[d] in (0, 3)]  # GGML_BACKEND_DEVICE_TYPE_CPU, _ACCEL
    gpu = [text(d) for d in devices if kinds[d] in (1, 2)]  # _GPU, _IGPU
    return {"build_commit": f"llama-cpp-python {llama_cpp.__version__}", "build_number": 0,
            "cpu_info": ", ".join(cpu), "gpu_info": ", ".join(gpu), "backends": backends_text(_registered(g))}


def backends_text(registered: Sequence[tuple[str, int]]) -> str:
    """llama-bench's backend name: the registered backends but CPU, "RPC" when an RPC backend has devices, else
    "CPU". ``registered``: (name, device count) of each backend."""
    names = [name for name, _ in registered if not name.startswith("RPC") and name != "CPU"]
    if any(name.startswith("RPC") and n > 0 for name, n in registered):
        names.append("RPC")
    return ",".join(names) or "CPU"


def _registered(g) -> list[tuple[str, int]]:
    regs = [g.reg_get(i) for i in range(g.reg_count())]
    return [(g.reg_name(r).decode("utf-8", "replace"), g.reg_dev_count(r)) for r in regs]


def model_type(engine) -> str:
    """llama_model_desc's text, as llama-bench's model column shows it; the engine's description otherwise."""
    model = getattr(engine, "native_model", None)
    if model is None:
        return engine.info.description
    from chatglm.runtime.llama_native import lib

    buf = ctypes.create_string_buffer(128)
    lib().llama_model_desc(model, buf, len(buf))
    return buf.value.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------ records
def records(engine, results: Sequence[Measurement], settings: BenchSettings, *, system: dict[str, Any],
            peak_rss: int) -> list[dict[str, Any]]:
    """One llama-bench record per test (its fields, then samples_ns and samples_ts, then ours)."""
    info = engine.info
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {**system, "model_filename": str(info.path), "model_type": model_type(engine),
              "model_size": info.size_bytes, "model_n_params": info.n_params, "n_batch": settings.n_batch,
              "n_ubatch": settings.n_ubatch, "n_threads": settings.n_threads, "type_k": settings.type_k,
              "type_v": settings.type_v, "n_gpu_layers": settings.n_gpu_layers,
              "flash_attn": settings.flash_attn_type, **FIXED, "test_time": stamp}
    out = []
    for m in results:
        rec = {**common, "n_prompt": m.test.n_prompt, "n_gen": m.test.n_gen, "avg_ns": m.mean_ns,
               "stddev_ns": m.stdev_ns, "avg_ts": m.mean_tps, "stddev_ts": m.stdev_tps}
        rec = {f: rec[f] for f in FIELDS}
        rec |= {"samples_ns": list(m.samples_ns), "samples_ts": m.tps, "engine": type(engine).__name__,
                "median_ts": m.median_tps, "n_ctx": info.n_ctx, "peak_rss_bytes": peak_rss}
        out.append(rec)
    return out


def render(recs: list[dict[str, Any]], fmt: str) -> str:
    """The records in one of FORMATS, as llama-bench's ``-o`` prints them."""
    if fmt == "json":
        return json.dumps(recs, indent=2, ensure_ascii=False)
    if fmt == "jsonl":
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in recs)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(FIELDS)
        writer.writerows([[_csv_value(r[f]) for f in FIELDS] for r in recs])
        return buf.getvalue().rstrip("\n")
    return markdown(recs)


def _csv_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return f"{value:.6f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------ markdown
def markdown(recs: list[dict[str, Any]]) -> str:
    """llama-bench's markdown table: its columns, widths and alignment, then its build line."""
    if not recs:
        return ""
    first = recs[0]
    cpu = any(name in first["backends"] for name in ("CPU", "BLAS", "ZenDNN"))
    columns = [("model", "model", -30), ("size", "size", 10), ("params", "params", 10),
               ("backends", "backend", -10)]
    if not cpu:
        columns.append(("n_gpu_layers", "ngl", 3))
    columns.append(("n_threads", "threads", 7))  # llama-bench shows it for CPU backends and non-default counts
    columns += [c for c in _SETTING_COLUMNS if any(r[c[0]] != LLAMA_BENCH_DEFAULTS[c[0]] for r in recs)]
    columns += [("test", "test", 15), ("t/s", "t/s", 20)]
    lines = ["|" + "".join(f" {_pad(title, width)} |" for _, title, width in columns),
             "|" + "".join(f" {'-' * (abs(w) - 1)}{':' if w > 0 else '-'} |" for _, _, w in columns)]
    for r in recs:
        lines.append("|" + "".join(f" {_pad(_cell(r, key), width)} |" for key, _, width in columns))
    return "\n".join(lines + ["", f"build: {first['build_commit']} ({first['build_number']})"])


def _pad(text: str, width: int) -> str:
    return text.ljust(-width) if width < 0 else text.rjust(width)


def _cell(r: dict[str, Any], key: str) -> str:
    if key == "model":
        return r["model_type"]
    if key == "size":
        n = r["model_size"]
        return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
    if key == "params":
        n = r["model_n_params"]
        return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"
    if key == "test":
        return test_name(r["n_prompt"], r["n_gen"])
    if key == "t/s":
        return f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"
    return str(r[key])


def test_name(n_prompt: int, n_gen: int) -> str:
    return BenchTest(n_prompt, n_gen).name
