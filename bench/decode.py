"""Image decoding speed: anygen against transformers' Janus on the same weights (issue #7).

    .venv/bin/python bench/decode.py                          # the small CPU shape: table on stdout
    .venv/bin/python bench/decode.py --json bench/out.json    # also every number as JSON
    .venv/bin/python bench/decode.py --shapes janus-pro-1b janus-pro-7b   # CUDA only, bf16

The protocol of /work/shared/BENCHMARKS.md:

1. Build a ``JanusForConditionalGeneration`` with random O(1) weights at the requested shape in
   transformers, ``save_pretrained`` it (and a tokenizer) to a temporary directory, and load that
   directory in anygen through its importer (``AnyGen.from_pretrained``).
2. Correctness gate first, in fp32 on the same weights: teacher-forced image logits match
   (a prompt plus image codes, transformers' generation head vs anygen's image slice), and greedy
   image tokens with guidance match ``generate(generation_mode="image")`` for anygen's plain and fast
   loops. The run stops if the gate fails.
3. Timing, each engine in its own process (``--worker``): transformers' ``generate(generation_mode=
   "image")``, anygen's plain loop (``Generator(fast=False)``), the fast loop in eager mode, the
   fast loop with its step compiled (``Generator(compile=True)``), and speculative Jacobi decoding
   (``anygen.generation.speculative``, eager, ``--window`` ids per forward; its forward passes are
   reported next to the decode steps they replace). A 32-token prompt, one image of
   ``side``² tokens, classifier-free guidance (scale 5, a batch of a conditional and an
   unconditional row), sampling at temperature 1. The first call is the cold start (compile /
   capture included), one more warm-up, then the median of ``--runs`` calls.

Columns: seconds per image; ms per image token (every engine runs one decode step per image token, give
or take one); image tokens per second; achieved GB/s = bytes a step must read (decoder weights, final
norm, image head, image-embedding aligner, plus the k/v of the filled cache averaged over the image,
both rows) / step time, and its share of the copy bandwidth measured in the same run (a tensor copy
on the same device, read + written bytes); peak memory (CPU: max RSS of the worker process; CUDA:
``max_memory_allocated``); cold start (first call minus a warm call). anygen's times include decoding
the codes to pixels with the (tiny) VQ decoder, which transformers' ``generate`` does not do.

The small shape runs on the CPU, always (``--threads``, default 1: the machine is shared). The Janus-Pro
shapes are written for CUDA in bf16 and skipped without it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # BENCHMARKS.md "On the CPU": 4 layers, 256 wide, 16x16 image tokens
    "small": {"d": 256, "n_layer": 4, "n_head": 8, "n_kv_head": 8, "intermediate": 688, "vocab": 4096,
              "codebook": 4096, "side": 16, "device": "cpu", "dtype": "float32"},
    # deepseek-ai/Janus-Pro-1B / 7B decoder shapes, 576 image tokens (384 px)
    "janus-pro-1b": {"d": 2048, "n_layer": 24, "n_head": 16, "n_kv_head": 16, "intermediate": 5504, "vocab": 102400,
                     "codebook": 16384, "side": 24, "device": "cuda", "dtype": "bfloat16"},
    "janus-pro-7b": {"d": 4096, "n_layer": 30, "n_head": 32, "n_kv_head": 32, "intermediate": 11008,
                     "vocab": 102400, "codebook": 16384, "side": 24, "device": "cuda", "dtype": "bfloat16"},
}
ENGINES = {  # name -> Generator kwargs (None: transformers)
    "transformers": None,
    "anygen-plain": {"fast": False, "compile": False},
    "anygen-fast": {"fast": True, "compile": False},
    "anygen-compiled": {"fast": True, "compile": True},
    "anygen-speculative": {"fast": True, "compile": False},  # generate_speculative (opt-in), eager
}
PROMPT_LEN = 32  # BOS + 30 text ids + <begin_of_image>, as transformers is given it
GUIDANCE = 5.0
TEMPERATURE = 1.0


# -- the reference checkpoint ---------------------------------------------------------------------------


def build_reference(shape: dict[str, Any], directory: Path, seed: int) -> list[int]:
    """Save a random Janus of ``shape`` (and a tokenizer) to ``directory``; return the 32 prompt ids."""
    from transformers import JanusForConditionalGeneration

    from anygen.convert.tiny import JANUS_SPECIALS, janus_config, tiny_tokenizer

    tok = tiny_tokenizer(JANUS_SPECIALS, extra=["<|User|>", "<|Assistant|>"])
    side = shape["side"]
    config = janus_config(shape["vocab"], tok.convert_tokens_to_ids("<image_placeholder>"), d=shape["d"],
                          n_layer=shape["n_layer"], n_head=shape["n_head"], n_kv_head=shape["n_kv_head"],
                          intermediate=shape["intermediate"], vision={"image_size": side * 16, "patch_size": 16},
                          vq={"num_embeddings": shape["codebook"]}, max_positions=1024)
    device = shape["device"]
    with torch.device(device):
        model = JanusForConditionalGeneration(config).eval()
    _randomize(model, seed)
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.generation_kwargs = {"boi_token_id": boi}
    model.to(getattr(torch, shape["dtype"]))  # stored as timed (bf16 on CUDA); the gate upcasts to fp32
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    specials = set(tok.all_special_ids) | {boi}
    text = [i for i in range(len(tok)) if i not in specials]
    g = torch.Generator().manual_seed(seed)
    body = [text[int(i)] for i in torch.randint(len(text), (PROMPT_LEN - 2,), generator=g)]
    return [tok.bos_token_id, *body, boi]


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """``anygen.convert.tiny.randomize_`` drawn on the model's device (a 7B model is too slow to fill on the CPU)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
        noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        if p.ndim >= 2:
            p.copy_(noise / (p[0].numel() if "embed" not in name else 1) ** 0.5)
        else:
            p.copy_((1 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)


# -- the correctness gate -------------------------------------------------------------------------------


@torch.no_grad()
def gate(directory: Path, shape: dict[str, Any], prompt: list[int]) -> dict[str, Any]:
    """Teacher-forced logits and greedy image tokens, transformers vs anygen, fp32 on the shape's device."""
    from transformers import JanusForConditionalGeneration

    from anygen import AnyGen
    from anygen.generation.generator import GenerationSettings, Generator
    from anygen.generation.sampling import SamplingConfig

    device = shape["device"]
    torch.backends.cuda.matmul.allow_tf32 = False  # the gate compares fp32 arithmetic
    ref = JanusForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).to(device).eval()
    engine = AnyGen.from_pretrained(directory, device=device, dtype=torch.float32)
    v, to_any = engine.model.vocab, engine.id_map.to_anygen().to(device)
    ids = torch.tensor([prompt], device=device)
    codes = torch.randint(0, shape["codebook"], (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    embeds = torch.cat([ref.get_input_embeddings()(ids), ref.prepare_embeddings_for_image_generation(codes)], 1)
    expected = ref.model.generation_head(ref.model.language_model(inputs_embeds=embeds).last_hidden_state)
    ours = engine.model(torch.cat([to_any[ids], codes + v.image_offset], 1))[..., v.image_offset:v.video_offset]
    logit_diff = float((ours - expected).abs().max())
    scale = float(expected.abs().max())

    config = copy.deepcopy(ref.generation_config)
    config.generation_kwargs = {"boi_token_id": prompt[-1]}
    config.do_sample, config.guidance_scale = False, GUIDANCE
    ref_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                              generation_mode="image")[0].tolist()
    greedy = SamplingConfig(temperature=0.0, guidance_scale=GUIDANCE)
    settings = GenerationSettings(max_new_tokens=shape["side"] ** 2 + 2, image=greedy, start_with="image",
                                  max_images=1)
    seq = _token_sequence(to_any[ids[0, :-1]].cpu())
    matches = {}
    for name in ("anygen-plain", "anygen-fast"):
        generator = Generator(engine.model, engine.tokenizer, **ENGINES[name])
        (done,) = generator.generate([seq], settings)
        (image,) = done.segments
        got = image.codes.flatten().tolist()
        matches[name] = sum(a == b for a, b in zip(got, ref_tokens)) / len(ref_tokens)
    tol = 1e-4 * max(1.0, scale) if device == "cpu" else 1e-3 * max(1.0, scale)
    passed = logit_diff <= tol and all(m == 1.0 for m in matches.values()) and len(set(ref_tokens)) > 1
    del ref, engine
    return {"logit_max_abs_diff": logit_diff, "logit_scale": scale, "tolerance": tol,
            "greedy_token_match": matches, "passed": passed}


def _token_sequence(ids: torch.Tensor):
    from tokenizers_mm.multimodal import TokenSequence

    return TokenSequence(ids.long(), torch.zeros_like(ids, dtype=torch.long))  # every prompt id is text


# -- one engine, in its own process ---------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Time one engine: cold call, one warm-up, then ``--runs`` calls; write the numbers to ``--out``."""
    shape = SHAPES[args.shape]
    device, dtype = torch.device(shape["device"]), getattr(torch, shape["dtype"])
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    prompt = json.loads((args.dir / "prompt.json").read_text())
    ids = torch.tensor([prompt], device=device)
    n_tokens = shape["side"] ** 2
    extra: dict[str, Any] = {}
    if args.worker == "transformers":
        from transformers import JanusForConditionalGeneration

        model = JanusForConditionalGeneration.from_pretrained(args.dir, dtype=dtype).to(device).eval()

        def run(seed: int) -> None:
            config = copy.deepcopy(model.generation_config)  # generate() edits it (guidance_scale -> None)
            config.generation_kwargs = {"boi_token_id": prompt[-1]}
            config.do_sample, config.temperature, config.guidance_scale = True, TEMPERATURE, GUIDANCE
            config.top_k, config.top_p = None, None
            torch.manual_seed(seed)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 generation_mode="image")
            assert out.shape == (1, n_tokens)
    else:
        from anygen import AnyGen
        from anygen.generation.generator import Generator

        engine = AnyGen.from_pretrained(args.dir, device=device, dtype=dtype)
        engine.generator = Generator(engine.model, engine.tokenizer, **ENGINES[args.worker])
        seq = _token_sequence(engine.id_map.to_anygen()[torch.tensor(prompt[:-1])])  # <|boi|> is forced first
        extra["bytes_per_step"] = step_bytes(engine.model, shape)

        if args.worker == "anygen-speculative":
            from anygen.generation.generator import GenerationSettings
            from anygen.generation.sampling import SamplingConfig
            from anygen.generation.speculative import generate_speculative

            forwards: list[int] = []
            extra.update(window=args.window, forwards=forwards)

            def run(seed: int) -> None:
                settings = GenerationSettings(max_new_tokens=n_tokens + 2, start_with="image", max_images=1,
                                              seed=seed, image=SamplingConfig(TEMPERATURE, 0, 1.0, GUIDANCE))
                (out,), stats = generate_speculative(engine.generator, [seq], settings, window=args.window)
                assert out.reason == "max_images" and out.segments[0].codes.numel() == n_tokens
                forwards.append(stats.forwards)
                extra.update(plain_forwards=stats.plain_forwards, drafted=stats.drafted, accepted=stats.accepted)
        else:
            def run(seed: int) -> None:
                out = engine.generate(seq, start_with="image", max_images=1, max_new_tokens=n_tokens + 2,
                                      seed=seed, image={"temperature": TEMPERATURE, "guidance_scale": GUIDANCE})
                assert out.finish_reason == "max_images" and out.segments[0].codes.numel() == n_tokens

        codes = torch.zeros(1, shape["side"], shape["side"], dtype=torch.long, device=device)
        extra["vq_decode_s"] = _timed(lambda: engine.tokenizer.image.decode(codes), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = _timed(lambda: run(0), device)
    warm = _timed(lambda: run(1), device)
    times = [_timed(lambda i=i: run(2 + i), device) for i in range(args.runs)]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss()
    result = {"engine": args.worker, "times_s": times, "median_s": statistics.median(times), "first_call_s": first,
              "warm_up_s": warm, "cold_start_s": max(0.0, first - statistics.median(times)), "peak_bytes": peak,
              "image_tokens": n_tokens, "loadavg_end": _loadavg(), **extra}
    args.out.write_text(json.dumps(result))


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: ``VmHWM`` (``ru_maxrss`` survives ``exec`` on Linux, so a
    worker would report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_bytes(model, shape: dict[str, Any]) -> int:
    """Bytes one guided step must read: decoder + final norm + image head + image-embedding aligner, and the
    k/v of the filled cache (prompt + half the image on average) for the two rows."""
    modules = [model.blocks, model.norm, model.head["image"]]
    embed = model.embed["image"]
    if isinstance(embed, torch.nn.Sequential):
        modules += list(embed)[1:]  # the aligner; the code table itself is read one row per step
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    cfg = model.config
    slots = PROMPT_LEN + shape["side"] ** 2 / 2
    element = next(model.parameters()).element_size()
    kv = 2 * 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * slots * element  # rows x (k, v) x ...
    return int(weights + kv)


def copy_bandwidth(device: torch.device, threads: int) -> float:
    """Bytes read + written per second by a large tensor copy on ``device`` (median of 10)."""
    if device.type == "cpu":
        torch.set_num_threads(threads)
    n = (1 << 30 if device.type == "cuda" else 256 << 20) // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = [_timed(lambda: b.copy_(a), device) for _ in range(10)]
    return 2 * a.nbytes / statistics.median(times)


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


# -- the driver -----------------------------------------------------------------------------------------


def run_shape(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    shape = SHAPES[name]
    device = torch.device(shape["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{name}: skipped (needs CUDA; this code path is written but unmeasured here)")
        return None
    directory = work / name
    prompt = build_reference(shape, directory, args.seed)
    (directory / "prompt.json").write_text(json.dumps(prompt))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    checked = gate(directory, shape, prompt)
    print(f"{name}: gate {'passed' if checked['passed'] else 'FAILED'}: image logits max |diff| "
          f"{checked['logit_max_abs_diff']:.2e} (logits up to {checked['logit_scale']:.1f}, tol "
          f"{checked['tolerance']:.1e}); greedy image tokens equal to transformers: "
          + ", ".join(f"{k} {v:.0%}" for k, v in checked["greedy_token_match"].items()))
    if not checked["passed"]:
        return {"shape": name, "gate": checked}
    bandwidth = copy_bandwidth(device, args.threads)
    results = {}
    for engine in args.engines:
        out = work / f"{name}-{engine}.json"
        load = _loadavg()
        cmd = [sys.executable, __file__, "--worker", engine, "--dir", str(directory), "--shape", name,
               "--runs", str(args.runs), "--threads", str(args.threads), "--window", str(args.window),
               "--out", str(out)]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}  # a true cold start
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name} / {engine}: worker failed\n{proc.stderr[-3000:]}")
            continue
        results[engine] = {**json.loads(out.read_text()), "loadavg_start": load}
        print(f"  {engine}: {results[engine]['median_s']:.3f} s/image", flush=True)
    nbytes = next((r["bytes_per_step"] for r in results.values() if "bytes_per_step" in r), None)
    for r in results.values():
        step = r["median_s"] / r["image_tokens"]
        r["ms_per_step"] = 1000 * step
        r["tokens_per_s"] = r["image_tokens"] / r["median_s"]
        r["gb_per_s"] = nbytes / step / 1e9 if nbytes else None
        r["copy_share"] = nbytes / step / bandwidth if nbytes else None
    base = results.get("transformers")
    for r in results.values():
        r["speedup_vs_transformers"] = base["median_s"] / r["median_s"] if base else None
    return {"shape": name, "config": shape, "gate": checked, "copy_bandwidth_gb_s": bandwidth / 1e9,
            "bytes_per_step": nbytes, "engines": results}


def table(report: dict[str, Any]) -> str:
    lines = [f"### {report['shape']} ({report['config']['device']}, {report['config']['dtype']}; copy bandwidth "
             f"{report['copy_bandwidth_gb_s']:.1f} GB/s; {report['bytes_per_step'] / 1e6:.1f} MB read per step)",
             "",
             "| engine | s / image | ms / step | image tok / s | GB/s | of copy BW | peak memory | cold start | "
             "vs transformers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["engines"].items():
        lines.append(f"| {name} | {r['median_s']:.3f} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['gb_per_s']:.1f} | {100 * r['copy_share']:.0f}% | {r['peak_bytes'] / 2**20:.0f} MiB | "
                     f"{r['cold_start_s']:.1f} s | {r['speedup_vs_transformers']:.2f}x |")
    spec = report["engines"].get("anygen-speculative")
    if spec is not None:
        fw = statistics.median(spec["forwards"])
        lines.append(f"\nanygen-speculative (window {spec['window']}): {fw:.0f} forward passes per image (median) "
                     f"vs {spec['plain_forwards']} decode steps, {100 * (1 - fw / spec['plain_forwards']):.0f}% "
                     f"saved; last run accepted {spec['accepted']} of {spec['drafted']} verified drafts; wall time "
                     f"{spec['median_s'] / report['engines'].get('anygen-fast', spec)['median_s']:.2f}x "
                     "anygen-fast's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["small"], choices=sorted(SHAPES))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--runs", type=int, default=5, help="timed calls per engine (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=16, help="anygen-speculative: ids per forward pass")
    parser.add_argument("--json", type=Path, help="write the whole report here")
    # worker mode (one engine in its own process)
    parser.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cpu": _cpu_name(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "threads": args.threads, "runs": args.runs, "loadavg_start": _loadavg()}
    print(f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu']}"
          f"{', ' + env['cuda'] if env['cuda'] else ''}; {args.threads} thread(s); load average "
          f"{' '.join(map(str, env['loadavg_start']))}")
    reports = []
    with tempfile.TemporaryDirectory(prefix="anygen-bench-") as tmp:
        for name in args.shapes:
            report = run_shape(name, args, Path(tmp))
            if report is not None and "engines" in report:
                print(table(report))
            if report is not None:
                reports.append(report)
    env["loadavg_end"] = _loadavg()
    print(f"load average at the end: {' '.join(map(str, env['loadavg_end']))}")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "shapes": reports}, indent=2))
        print(f"wrote {args.json}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
