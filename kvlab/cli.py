"""kvlab's single entry point: bench | ppl | generate | serve | models | presses | report compare | report presses.

Bad input ends with one line on stderr and exit status 2; nothing is written.
"""

import argparse
import shlex
import sys
from pathlib import Path

from kvlab.errors import KvlabError


def _add_model_args(parser: argparse.ArgumentParser, with_dtype: bool = True) -> None:
    parser.add_argument(
        "--model", help="short name (see `kvlab models`), hub id[@revision], local dir or .gguf"
    )
    if with_dtype:
        parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def _add_quantization_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantization",
        default=None,
        help="weights: int8, int4-g128 (any spec, e.g. int4-g64-asym), gptq-<spec>, awq-<spec>, gguf",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="baseline model.generate() vs an optimized path, same inputs")
    bench.add_argument("--technique", default="static-cache")
    bench.add_argument("--batch-level", default="small", help="small | medium | large")
    bench.add_argument("--config", help="YAML file (default: configs/<technique>/<batch-level>.yaml)")
    bench.add_argument("--experiment-name", help="results/<technique>/<experiment-name>/")
    bench.add_argument("--method", choices=["baseline", "optimized", "both"], default=None)
    bench.add_argument("--benchmark-memory", action=argparse.BooleanOptionalAction, default=None)
    bench.add_argument("--dataset", help="wikitext2 | pg19 | file:PATH")
    bench.add_argument("--data-dir", help="local data directory (default: $KVLAB_DATA_DIR)")
    bench.add_argument("--dtypes", nargs="+", default=None, help="e.g. float32 bfloat16")
    bench.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key"
    )
    bench.add_argument("--overwrite", action="store_true", help="replace an existing experiment's results")
    bench.add_argument(
        "--sweep", metavar="KEY=V1,V2,...", help="one experiment per value, plus a sweep table and plot"
    )
    bench.add_argument(
        "--ray",
        action="store_true",
        help="run the sweep's cells as Ray tasks, one per worker ($RAY_ADDRESS or local)",
    )
    bench.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray cluster (default: all cores)")
    bench.add_argument("--results-dir", default="results")
    _add_model_args(bench, with_dtype=False)

    ppl = commands.add_parser("ppl", help="sliding-window perplexity (HF guide protocol)")
    _add_model_args(ppl)
    ppl.add_argument("--dataset", default="wikitext2")
    ppl.add_argument("--split", default=None)
    ppl.add_argument("--data-dir", default=None)
    ppl.add_argument("--max-length", type=int, default=1024)
    ppl.add_argument("--stride", type=int, default=512)
    ppl.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ppl.add_argument("--mode", choices=["sliding", "streaming"], default="sliding")
    ppl.add_argument(
        "--press",
        action="append",
        default=None,
        help="streaming mode: configuration(s) to compare (full, window, streaming_llm, h2o, tova, recompute); repeatable",
    )
    ppl.add_argument(
        "--cache-tokens",
        type=int,
        default=None,
        help="streaming mode: KV budget per layer (default: the streaming bench's)",
    )
    ppl.add_argument("--output", type=Path, default=None, help="streaming mode: write JSON + plot here")
    ppl.add_argument(
        "--score-from",
        type=int,
        default=None,
        help="streaming mode: PPL over tokens from this index on (e.g. past the model's context)",
    )

    gen = commands.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    _add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    _add_quantization_arg(gen)

    serve = commands.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
        description="Layered: defaults < --config YAML < --set < flags. See configs/serve/serve.yaml.",
    )
    serve.add_argument("--config", help="serve.yaml (keys: model, host, port, max_queue, engine, press, ...)")
    _add_model_args(serve)
    _add_quantization_arg(serve)
    serve.add_argument("--press", help="KV press for every request (see `kvlab presses`), 'none' for none")
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--max-queue", type=int, help="engine requests in flight before 429 (default 256)")
    serve.add_argument(
        "--drain-timeout-s", type=float, help="SIGTERM: seconds in-flight requests get (default 30)"
    )
    serve.add_argument("--api-key-env", help="environment variable holding the API key clients must send")
    serve.add_argument("--max-body-bytes", type=int, help="larger request bodies answer 413 (default 1 MiB)")
    serve.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any serve.yaml key, e.g. engine.num_blocks=256, press.compression_ratio=0.5",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")

    commands.add_parser("models", help="list the model registry")
    commands.add_parser("presses", help="list the KV-compression methods and their options")

    report = commands.add_parser("report", help="work with written results")
    report_commands = report.add_subparsers(dest="report_command", required=True)
    compare = report_commands.add_parser("compare", help="one table across experiments")
    compare.add_argument("paths", nargs="+", type=Path)
    presses = report_commands.add_parser(
        "presses", help="one row per press experiment: quality vs the full cache, speed, memory"
    )
    presses.add_argument("paths", nargs="+", type=Path)
    presses.add_argument("--prompt", type=int, help="the prompt length to show (default: the longest)")
    cost = report_commands.add_parser(
        "cost", help="$ per 1M output tokens and requests/s per replica from measured throughput"
    )
    cost.add_argument("results", type=Path, help="a paged or serving experiment dir, or its results.json")
    cost.add_argument("--prices", type=Path, default=Path("configs/cost/prices.yaml"), help="the price table")
    cost.add_argument(
        "--instance", action="append", dest="instances", help="price only this one (repeatable)"
    )
    cost.add_argument("--no-write", action="store_true", help="print only (default: also write cost.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        handler = {
            "bench": cmd_bench,
            "ppl": cmd_ppl,
            "generate": cmd_generate,
            "serve": cmd_serve,
            "models": cmd_models,
            "presses": cmd_presses,
            "report": cmd_report,
        }
        return handler[args.command](args, argv) or 0
    except KvlabError as error:
        print(f"kvlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads <= 0:
            raise KvlabError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)


def bench_flags(args) -> dict:
    """The `kvlab bench` flags that set config keys (None: not given, so lower layers win)."""
    return {
        "experiment_name": args.experiment_name,
        "method": args.method,
        "benchmark_memory": args.benchmark_memory,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "dtypes": args.dtypes,
        "model": args.model,
        "device": args.device,
        "threads": args.threads,
    }


def cmd_bench(args, argv) -> int:
    from kvlab.bench.core import writer
    from kvlab.bench.core.datasets import load_text
    from kvlab.bench.generate.config import resolve
    from kvlab.bench.generate.registry import known_techniques
    from kvlab.bench.report.markdown import write_report

    command = "kvlab " + " ".join(shlex.quote(a) for a in argv)
    if (args.ray or args.ray_cpus is not None) and not args.sweep:
        raise KvlabError("--ray runs the cells of a sweep as Ray tasks; give --sweep KEY=V1,V2,...")
    standalone = _standalone_bench(args.technique)
    if standalone is not None:
        if args.sweep:
            raise KvlabError(
                f"--sweep is for generation techniques; {args.technique!r} is a bench of its own (use --set)"
            )
        resolve_config, run_bench = standalone
        config = resolve_config(args.batch_level, args.config, args.set or [], bench_flags(args))
        out_dir = writer.experiment_dir(config.technique, config.experiment_name, Path(args.results_dir))
        writer.claim_experiment_dir(out_dir, args.overwrite)
        path = run_bench(config, out_dir, command)
        print(f"kvlab: report written to {path / 'report.md'}")
        return 0
    flags = bench_flags(args)
    from kvlab.bench.eval.perplexity import tokenize
    from kvlab.bench.generate.experiment import measure_experiment
    from kvlab.bench.generate.sweep import parse_sweep, write_sweep
    from kvlab.models.loader import load_tokenizer

    sweep_key, sweep_values = parse_sweep(args.sweep) if args.sweep else (None, [None])
    configs = []
    sweep_dir = None
    for value in sweep_values:
        overrides = args.set + ([f"{sweep_key}={value}"] if sweep_key else [])
        config = resolve(args.technique, args.batch_level, args.config, overrides, flags, known_techniques())
        if sweep_key:
            config.experiment_name = f"{config.experiment_name}-{value}"
        out_dir = writer.experiment_dir(config.technique, config.experiment_name, Path(args.results_dir))
        writer.claim_experiment_dir(out_dir, args.overwrite)
        configs.append((config, out_dir))
        if sweep_key and sweep_dir is None:  # the sweep's own folder is claimed before any work too
            name = config.experiment_name.rsplit("-", 1)[0]
            sweep_dir = writer.experiment_dir(config.technique, f"{name}-sweep", Path(args.results_dir))
            writer.claim_experiment_dir(sweep_dir, args.overwrite)
    text = load_text(configs[0][0].dataset, split=configs[0][0].split, data_dir=configs[0][0].data_dir)
    tokens = tokenize(load_tokenizer(configs[0][0].model), text.text)
    if args.ray:
        from kvlab.scale.cluster import ray_session
        from kvlab.scale.tasks import run_as_tasks

        with ray_session(args.ray_cpus):
            cells = [(config,) for config, _ in configs]
            cpus = [config.threads or 1 for config, _ in configs]
            results = run_as_tasks(measure_experiment, cells, cpus, shared=(text, tokens))
    else:  # one cell after another, each report written as soon as it is measured
        results = (measure_experiment(config, text, tokens) for config, _ in configs)
    for (_, out_dir), result in zip(configs, results, strict=True):
        path = write_report(result, out_dir, command)
        print(f"kvlab: report written to {path / 'report.md'}")
    if sweep_dir is not None:
        write_sweep(sweep_key, sweep_values, [d for _, d in configs], sweep_dir)
        print(f"kvlab: sweep written to {sweep_dir / 'sweep.md'}")
    return 0


def _standalone_bench(technique: str):
    """(resolve the config, run and report) of a bench of its own (the paged serving bench, the HTTP
    load bench, the kernel micro-benchmark, the quantization bench), or None for a generation technique."""
    if technique == "paged":
        from kvlab.bench.serving.config import resolve
        from kvlab.bench.serving.runs import run_paged_bench

        return resolve, run_paged_bench
    if technique == "serving":
        from kvlab.bench.loadgen.config import resolve
        from kvlab.bench.loadgen.runs import run_load_bench

        return resolve, run_load_bench
    if technique == "kernels":
        from kvlab.bench.kernels.config import resolve
        from kvlab.bench.kernels.runs import run_kernels_bench

        return resolve, run_kernels_bench
    from kvlab.bench.quant.config import ALIASES, TECHNIQUE

    if technique == TECHNIQUE or technique in ALIASES:
        from kvlab.bench.quant.config import resolve
        from kvlab.bench.quant.runs import run_quant_bench

        return resolve, run_quant_bench
    return None


def cmd_ppl(args, argv) -> int:
    from kvlab.bench.core.datasets import load_text
    from kvlab.bench.eval.perplexity import sliding_window_perplexity
    from kvlab.models.loader import load_model

    _set_threads(args.threads)
    for name, value in [
        ("--max-length", args.max_length),
        ("--stride", args.stride),
        ("--max-tokens", args.max_tokens),
    ]:
        if value is not None and value <= 0:
            raise KvlabError(f"{name} must be positive, got {value}")
    streaming_only = {
        "--press": args.press,
        "--cache-tokens": args.cache_tokens,
        "--output": args.output,
        "--score-from": args.score_from,
    }
    given = [name for name, value in streaming_only.items() if value is not None]
    if args.mode != "streaming" and given:
        raise KvlabError(
            f"{', '.join(given)} need --mode streaming (the sliding-window PPL has no KV budget)"
        )
    text = load_text(args.dataset, split=args.split, data_dir=args.data_dir)
    if args.mode == "streaming":
        from kvlab.bench.eval.streaming_report import DEFAULT_CONFIGS, StreamingConfig, run_streaming

        given_options = {
            "cache_tokens": args.cache_tokens,
            "score_from": args.score_from,
            "model": args.model or None,
            "dtype": args.dtype or None,
            "device": args.device or None,
        }
        config = StreamingConfig(  # an option not given keeps StreamingConfig's default
            dataset=args.dataset,
            data_dir=args.data_dir,
            configs=args.press or list(DEFAULT_CONFIGS),
            max_tokens=args.max_tokens,
            output=args.output,
            **{name: value for name, value in given_options.items() if value is not None},
        )
        config.validate()
        path = run_streaming(config, text, "kvlab " + " ".join(shlex.quote(a) for a in argv))
        print(f"kvlab: report written to {path / 'report.md'}")
        return 0
    loaded = load_model(
        args.model or "smollm2-135m", dtype=args.dtype or "float32", device=args.device or "cpu"
    )
    result = sliding_window_perplexity(
        loaded, text, max_length=args.max_length, stride=args.stride, max_tokens=args.max_tokens
    )
    print(f"model: {loaded.name} ({loaded.source})")
    print(f"data: {text.description}")
    print(f"protocol: {result.protocol}")
    print(f"ppl: {result.label} over {result.num_tokens_scored} tokens ({result.seconds:.1f} s)")
    print(f"ppl with the guide snippet's per-window (labels - 1) weighting: {result.guide_ppl:.4f}")
    return 0


def cmd_generate(args, argv) -> int:
    import torch

    from kvlab.engine.detokenizer import IncrementalDetokenizer
    from kvlab.generate import generate
    from kvlab.kernels import cpu as cpu_kernels
    from kvlab.models.loader import load_model
    from kvlab.sampling import SamplingConfig
    from kvlab.stopping import model_eos_ids

    _set_threads(args.threads)
    if args.max_tokens <= 0:
        raise KvlabError(f"--max-tokens must be positive, got {args.max_tokens}")
    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    loaded = load_model(
        args.model or "smollm2-135m", dtype=args.dtype or "float32", device=args.device or "cpu"
    )
    if args.quantization:
        from kvlab.quant.methods import quantize_loaded

        loaded = quantize_loaded(loaded, args.quantization)
    tokenizer = loaded.tokenizer
    if tokenizer.chat_template and not args.no_chat:
        messages = [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = args.prompt
    input_ids = torch.tensor(
        [tokenizer(prompt, add_special_tokens=False).input_ids], device=loaded.model.device
    )
    if input_ids.shape[1] == 0:
        raise KvlabError("the prompt is empty")
    cpu_kernels.prepare()  # a first-use build or calibration is announced here, not inside the TTFT
    generated: list[int] = []
    detokenizer = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))

    def stream(token: torch.Tensor) -> None:
        generated.append(int(token[0]))
        print(detokenizer.step(generated), end="", flush=True)

    result = generate(
        loaded.model,
        input_ids,
        args.max_tokens,
        sampling=sampling,
        eos_token_id=list(model_eos_ids(loaded.model)) or tokenizer.eos_token_id,
        on_token=stream,
    )
    print(detokenizer.flush(generated))
    n = result.tokens.shape[1]
    print(
        f"[{n} tokens, TTFT {result.ttft * 1000:.0f} ms, TPOT {result.tpot * 1000:.1f} ms]", file=sys.stderr
    )
    return 0


def cmd_serve(args, argv) -> int:
    from kvlab.server.config import resolve_config
    from kvlab.server.launch import serve

    flags = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "quantization": args.quantization,
        "press": args.press,
        "host": args.host,
        "port": args.port,
        "max_queue": args.max_queue,
        "drain_timeout_s": args.drain_timeout_s,
        "api_key_env": args.api_key_env,
        "max_body_bytes": args.max_body_bytes,
    }
    serve(resolve_config(args.config, args.set, flags), log_level=args.log_level)
    return 0


def cmd_models(args, argv) -> int:
    from kvlab.models.registry import MODELS, describe_size

    print(f"{'name':<20} {'source':<7} {'size':<26} description")
    for spec in MODELS.values():
        print(f"{spec.name:<20} {spec.source:<7} {describe_size(spec):<26} {spec.description}")
    return 0


def cmd_presses(args, argv) -> int:
    from kvlab.press.registry import PRESSES, press_options

    for name, cls in PRESSES.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        options = ", ".join(f"{key}={value!r}" for key, value in press_options(name).items())
        print(f"{name:<14} {summary}\n{'':<14} options: {options or 'none'}")
    return 0


def cmd_report(args, argv) -> int:
    from kvlab.bench.report.compare import compare, press_summary

    if args.report_command == "cost":
        from kvlab.bench.report.cost import cost_report

        text, written = cost_report(args.results, args.prices, args.instances, write=not args.no_write)
        print(text, end="")
        if written is not None:
            print(f"kvlab: cost report written to {written}", file=sys.stderr)
    elif args.report_command == "presses":
        print(press_summary(args.paths, args.prompt), end="")
    else:
        print(compare(args.paths), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
