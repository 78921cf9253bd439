"""``sluice bench``: how fast is the model, how much does the pipeline cost, where is the ceiling.

One run measures up to three things on the same prompt set (a fixed, seeded mix of prompt
lengths) and writes every figure to ``<out_dir>/bench-<timestamp>.json`` plus PNG plots:

``direct``
    The prompts straight into the engine (no Kafka) through a :class:`MicroBatcher` with
    the worker's batching settings, at the chosen concurrency / arrival rate; then a sweep
    of exact batch sizes through ``engine.generate`` (throughput vs batch size); with
    ``quantize_compare`` the same direct run on ``TorchEngine(quantize="int8")``, reported
    as speed-up and agreement with fp32 (identical greedy outputs, token overlap).
``anchor`` (with direct, ``anchor=True``)
    The same prompts through llama.cpp (``SLUICE_BACKEND=llama_cpp``, when
    ``llama-cpp-python`` is installed), the fp32 torch engine and the configured engine,
    one request at a time and with ``anchor_concurrency`` requests outstanding, in the same
    run: output tokens/s of each engine as a ratio of llama.cpp's (one at a time and at the
    same concurrency), and each engine's greedy agreement with the fp32 torch outputs.
``pipeline``
    The same prompts through the whole pipeline: fresh topics and consumer group, real
    ``sluice worker`` processes, :class:`SluiceClient` publishing and reading results.
    Per-stage latencies come from each result's timings; the client adds end to end
    (publish -> result seen). ``pipeline / direct`` is the pipeline's efficiency.
``ceiling``
    The pipeline with ``SLUICE_BACKEND=benchmark`` (the *benchmark engine*: zero-cost fixed
    completion, not a model) and ``pipeline_requests`` requests published as fast as
    possible, to find the pipeline's own ceiling in requests/s for one worker; then a
    rate-limited pass at half that rate, where ``added latency = total - inference`` is the
    pipeline's own latency (target p99 <= 15 ms).
``load`` (with pipeline, ``load_levels``)
    Latency at partial load on the pipeline's workers: the saturation rate (requests/s of
    the pipeline run when it published everything at once), ``lone_requests`` sent one at
    a time, then open-loop Poisson arrivals at each level's fraction of saturation (25 %,
    50 %, 90 % by default): p50/p95/p99 of publish -> result per level next to the lone
    p50 (target at 50 %: p50 within 1.5x of a lone request's).

Nothing is hard-coded: every number printed or written was measured in this run.

Modules: :mod:`.options` (what to run), :mod:`.workload` (prompts, arrival schedules),
:mod:`.stats` (percentiles, ratios, targets; pure), :mod:`.direct` (engine-direct runs),
:mod:`.anchor` (the llama.cpp anchor), :mod:`.pipeline` (broker, workers, client),
:mod:`.report` (tables and JSON values; pure), :mod:`.run` (:func:`run_bench`),
:mod:`.plots` (PNG plots, needs matplotlib).
"""

from connectors.bench.options import MODES, BenchError, BenchOptions
from connectors.bench.pipeline import BENCHMARK_ENGINE
from connectors.bench.report import REPORT_SCHEMA, print_report
from connectors.bench.run import run_bench
from connectors.bench.workload import make_prompts

__all__ = [
    "BENCHMARK_ENGINE",
    "MODES",
    "REPORT_SCHEMA",
    "BenchError",
    "BenchOptions",
    "make_prompts",
    "print_report",
    "run_bench",
]
