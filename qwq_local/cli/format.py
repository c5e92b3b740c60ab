"""Plain-text tables for the CLI (strings only: cli.py prints them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..backend.rope import describe_rope
from ..fileutil import human_bytes


def prediction_table(predictions, chosen: Optional[str], source) -> str:
    lines = [f"predicted sizes for {source}:", f"  {'type':<10} {'bpw':>6} {'size':>11}  imatrix"]
    for p in predictions:
        mark = "*" if p.type == chosen else " "
        if p.bytes is None:
            lines.append(f"{mark} {p.type:<10} {'-':>6} {'n/a':>11}  (llama.cpp cannot make it from these shapes)")
            continue
        need = "required" if p.requires_imatrix else ""
        lines.append(f"{mark} {p.type:<10} {p.bpw:6.2f} {human_bytes(p.bytes):>11}  {need}".rstrip())
    return "\n".join(lines)


def _printable(text: str) -> str:
    """Control characters from an untrusted file, escaped: no terminal escape sequences, no
    line breaks inside a table row."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def info_table(s: dict) -> str:
    def num(value) -> str:
        return "-" if value is None else _printable(str(value))

    heads = num(s["head_count"]) + (f" (KV heads {s['head_count_kv']})" if s["head_count_kv"] is not None else "")
    types = ", ".join(f"{name} x{n}" for name, n in s["tensor_types"].items()) or "-"
    rows = [
        ("file", s["path"]),
        ("size", f"{human_bytes(s['file_size'])} (GGUF v{s['gguf_version']}, {s['n_tensors']} tensors, "
                 f"data from byte {s['data_offset']})"),
        ("architecture", num(s["architecture"])),
        ("name", num(s["name"])),
        ("quant", s["quant"] + (f" (general.file_type {s['file_type']})" if s["file_type"] is not None else "")),
        ("parameters", f"{s['n_params'] / 1e9:.2f} B" if s["n_params"] >= 10**8 else f"{s['n_params']:,}"),
        ("context length", num(s["context_length"])),
        ("layers", num(s["block_count"])),
        ("attention heads", heads),
        ("embedding", num(s["embedding_length"])),
        ("vocabulary", "-" if s["vocab_size"] is None else f"{s['vocab_size']} tokens"),
        ("chat template", s["chat_template"]),
        ("tensor types", types),
        ("load check", "passed" if s["load_checked"] else "not run yet (--load-check, or any load, runs it)"),
    ]
    rope = s.get("rope")
    if rope:
        f = rope["gguf"]
        in_file = ("none" if f is None else
                   _printable(f"{f['scaling']} x{f['factor']} (orig ctx {f['orig_ctx']})") + ", not used as such")
        rows += [("rope (file)", in_file), ("rope (applied)", rope["rule"])]
    lines = [f"{key:<16}{value}" for key, value in rows]
    lines += [f"warning: {_printable(w)}" for w in s["warnings"]]
    return "\n".join(lines)


def plan_table(d: dict) -> str:
    rows = [("weights", "weights_bytes"), ("KV cache", "kv_bytes"), ("compute", "compute_bytes"),
            ("output", "output_bytes"), ("total", "total_bytes")]
    lines = [f"model       {d['model']}",
             f"settings    n_ctx {d['n_ctx']}" + (f" (asked {d['n_ctx_requested']})" if d["n_ctx"] != d["n_ctx_requested"] else "")
             + f", kv {d['kv_type']}, flash attention {'on' if d['flash_attn'] else 'off'}, "
             f"batch {d['n_batch']}/{d['n_ubatch']}, gpu layers {d['gpu_layers']} of {d['n_layer'] + 1}"
             + (", CPU weights repacked" if d["repack"] else "")
             + (f"; compute from {d['compute_source']}" if d["compute_source"] != "formula" else ""),
             f"rope        {describe_rope(d['rope'])}",
             "",
             f"{'':<10}{'CPU (RAM)':>14}{'GPU':>14}{'total':>14}"]
    for label, key in rows:
        part = d[key]
        lines.append(f"{label:<10}{human_bytes(part['cpu']):>14}{human_bytes(part['gpu']):>14}{human_bytes(part['total']):>14}")
    lines.append(f"\nllama.cpp will log {human_bytes(d['logged_total_bytes'])} of buffers "
                 "(memory-mapped weights count their whole file span)")
    verdict = "fits" if d["fits"] else "does NOT fit"
    lines.append(f"{verdict}: {d['reason']}")
    return "\n".join(lines)


def doctor_report(r: dict) -> str:
    lines = [f"llama-cpp-python  {r['llama_cpp_python']} built with {' + '.join(r['backends'])}",
             f"GPU offload       {'supported' if r['gpu_offload'] else 'NOT supported by this build'}"]
    for name, cmd in r["reinstall"].items():
        lines.append(f"  for {name}: {cmd}")
    lines.append(f"RAM               {human_bytes(r['ram']['available'])} available of {human_bytes(r['ram']['total'])}")
    if not r["gpus"]:
        lines.append("GPUs              none found (NVML, nvidia-smi, Metal)")
    for g in r["gpus"]:
        lines.append(f"GPU {g['index']}             {g['name']} ({g['backend']}): {human_bytes(g['free'])} free "
                     f"of {human_bytes(g['total'])} [{g['source']}]")
    amx = r["amx"]
    bufts = {True: "on", False: "off", None: "unknown"}[amx["extra_buffer_types"]]
    lines.append(f"AMX               {'advertised' if amx['advertised'] else 'not advertised'} by the CPU; "
                 f"extra buffer types (repack/AMX) {bufts}"
                 + (f" (forced by {amx['override']})" if amx["override"] else "")
                 + (f"; probe: {amx['probe_reason']}" if amx["probe_reason"] else ""))
    dirs = sorted({str(Path(lib["path"]).parent) for lib in amx["libraries"]})
    lines.append(f"  probe key {amx['build_key']}: {len(amx['libraries'])} llama.cpp libraries in {', '.join(dirs) or '?'} "
                 "(size + mtime; a rebuild probes again)")
    if amx["reinstall_without_amx"]:
        lines.append("  to keep the repack kernels without AMX (extra buffer types then pass the probe), rebuild:")
        lines.append(f"    {amx['reinstall_without_amx']}")
    lines.append(f"rope              {r['rope']['rule']}")
    rpc = r.get("rpc") or {}
    lines.append("RPC               " + ("available (--rpc, qwq-local worker)" if rpc.get("available") else
                                         f"NOT in this build; get it: {rpc.get('fix')}"))
    rec = r["recommendation"]
    if rec["quant"]:
        lines.append(f"QwQ-32B           {rec['quant']} at context {rec['n_ctx']} (rope {describe_rope(rec['rope'])}) "
                     f"in {rec['where']}: needs "
                     f"~{human_bytes(rec['need_bytes'])} of {human_bytes(rec['budget_bytes'])} usable "
                     f"(get it: {rec['pull']})")
    else:
        lines.append(f"QwQ-32B           does not fit: even IQ2_XXS at context 4096 needs ~{human_bytes(rec['need_bytes'])}, "
                     f"{human_bytes(rec['budget_bytes'])} usable")
    return "\n".join(lines)


def model_table(models) -> str:
    rows = [("NAME", "QUANT", "SIZE", "VERIFIED", "PATH")] + [
        (
            m.name or "-",
            m.quant or "?",
            human_bytes(m.size),
            ("yes" if m.verified else "no") + ("" if m.complete else " (incomplete)"),
            str(m.path),
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows)


def split_table(rows: list[dict], *, fits: bool) -> str:
    """plan.devices.DevicePlan.table(): one line per device (RPC workers, local GPUs, RAM)."""
    head = ("DEVICE", "LAYERS", "BLOCKS", "WEIGHTS", "KV", "COMPUTE", "TOTAL", "FREE", "")
    body = [(r["device"], str(r["layers"]), r["blocks"], human_bytes(r["weights"]), human_bytes(r["kv"]),
             human_bytes(r["compute"]), human_bytes(r["total"]), human_bytes(r["free"]),
             "ok" if r["fits"] else "TOO MUCH") for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *body]]
    lines.append("fits" if fits else "does NOT fit")
    return "\n".join(lines)
