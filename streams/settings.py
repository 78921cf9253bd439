"""The one settings object. Read once at the entry point, passed down, never global.

Every field comes from an environment variable with the ``SLUICE_`` prefix (for example
``SLUICE_KAFKA_BOOTSTRAP``) or from a ``.env``-style file named by ``SLUICE_ENV_FILE``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Sluice configuration. Frozen: build a new one with ``model_copy(update=...)``."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_",
        env_file=os.environ.get("SLUICE_ENV_FILE"),
        frozen=True,
        extra="ignore",
        validate_by_name=True,  # fields with an env alias still take their name as a kwarg
    )

    # --- where state lives -------------------------------------------------------------
    home: Path = Field(Path(".sluice"), description="Local state: broker, model cache, logs.")

    # --- Kafka -----------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        None, description="host:port[,host:port]. Unset: the local broker from `sluice kafka up`."
    )
    kafka_version: str = Field("4.4.0", description="Apache Kafka version of the local broker.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA bundle (PEM) that signed the brokers' certificates (SSL/SASL_SSL)."
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="Client certificate (PEM) for mutual TLS; may also hold the key."
    )
    kafka_ssl_keyfile: Path | None = Field(None, description="Client key (PEM) for mutual TLS.")
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted kafka_ssl_keyfile."
    )
    schema_registry_url: str | None = Field(
        None, description="Confluent Schema Registry. Unset: ids from the local .avsc catalog."
    )
    schema_registry_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) for an https Schema Registry."
    )
    schema_registry_username: str | None = Field(None, description="Registry basic auth user.")
    schema_registry_password: SecretStr | None = None
    schema_registry_certfile: Path | None = Field(
        None, description="Client certificate (PEM) for mutual TLS to the Schema Registry."
    )
    schema_registry_keyfile: Path | None = Field(
        None, description="Client key (PEM) for schema_registry_certfile."
    )
    schema_registry_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted schema_registry_keyfile."
    )
    control_signing_key: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 secret (16+ bytes) operators sign control commands with; "
        "workers then ignore unsigned or wrongly signed ones (streams/control_auth.py).",
    )
    control_signing_key_id: str = Field(
        "default", min_length=1, description="Id of control_signing_key (for rotation)."
    )
    control_trusted_keys: SecretStr | None = Field(
        None, description="More keys workers accept: id:secret[,id:secret...] (rotation)."
    )

    app_id: str = Field("sluice", description="Faust app id = the workers' consumer group.")
    requests_topic: str = "llm.requests"
    results_topic: str = "llm.results"
    dlq_topic: str = "llm.requests.dlq"
    feedback_topic: str = "llm.feedback"
    feedback_dlq_topic: str = "llm.feedback.dlq"
    training_topic: str = "llm.training-examples"
    metrics_topic: str = "llm.metrics"
    control_topic: str = "llm.control"
    partitions: int = Field(4, ge=1, description="Partitions of llm.requests (and results).")
    replication_factor: int = Field(1, ge=1)

    # --- retention of the topics Sluice creates (streams/topics.py, docs/data-protection.md)
    requests_retention_ms: int = Field(
        7 * 86_400_000, description="llm.requests (raw prompts); -1: forever."
    )
    results_retention_ms: int = Field(
        7 * 86_400_000, description="llm.results (raw answers; the answered index reads it)."
    )
    dlq_retention_ms: int = Field(
        14 * 86_400_000, description="Both dead-letter topics (raw originals up to 256 KiB)."
    )
    feedback_retention_ms: int = Field(
        30 * 86_400_000, description="llm.feedback (raw corrections and user ids)."
    )
    metrics_retention_ms: int = Field(3 * 86_400_000, description="llm.metrics aggregates.")
    tombstone_retention_ms: int = Field(
        86_400_000, ge=0, description="delete.retention.ms of compacted topics (tombstones)."
    )
    compaction_max_lag_ms: int = Field(
        86_400_000, ge=1, description="max.compaction.lag.ms: overwritten values go by then."
    )

    @field_validator(
        "requests_retention_ms",
        "results_retention_ms",
        "dlq_retention_ms",
        "feedback_retention_ms",
        "metrics_retention_ms",
    )
    @classmethod
    def _retention(cls, value: int) -> int:
        if value != -1 and value < 60_000:
            raise ValueError("a retention is -1 (forever) or at least 60000 ms")
        return value

    # --- model -------------------------------------------------------------------------
    backend: Literal["torch", "tensorrt_llm", "llama_cpp", "benchmark"] = Field(
        "torch",
        description="torch (reference, CPU/GPU), tensorrt_llm (GPU, in-flight batching), "
        "llama_cpp (the GGUF on llama.cpp, CPU, in-flight batching), "
        "benchmark (zero-cost fixed completion, for measuring the pipeline itself).",
    )
    model_name: str = Field("smollm2-135m-instruct", description="Name requests may ask for.")
    model_path: Path | None = Field(
        None, description="A local Hugging Face causal-LM folder. Unset: SmolLM2-135M-Instruct."
    )
    model_version: str | None = Field(None, description="Unset: derived from the weights.")
    registry_dir: Path | None = Field(
        None, description="Model registry (versions for rollouts). Unset: <home>/registry."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, description="Unset: torch's default.")
    torch_quantize: Literal["none", "int8", "int8-weight", "int4-weight"] = Field(
        "none",
        description="int8-weight / int4-weight: int8 or grouped int4 weights, bf16 "
        "activations, batch-invariant (CPU, fused forward; ~4x / ~5x fp32's speed at "
        "batch 1, greedy outputs differ from fp32's; see the README). int8: dynamic int8 "
        "quantization of the Linear layers (CPU, transformers forward).",
    )
    torch_kernel: Literal["auto", "fused", "transformers"] = Field(
        "auto",
        description="The forward pass: fused = the hand-written Llama-family forward "
        "(torch_fused.py); transformers = the model's own; auto = fused where it covers "
        "the model.",
    )
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: float32 on CPU (bfloat16 is faster there but changes greedy "
        "outputs), bfloat16 on CUDA (float16 where bf16 is missing).",
    )
    torch_compile: bool = Field(
        False, description="torch.compile the decode step on CPU (CUDA always compiles it)."
    )
    torch_lm_head: Literal["exact", "rescored"] = Field(
        "rescored",
        description="rescored: the output projection in bf16 with the top-8 logits redone "
        "in fp32 (fp32 on CPU only; about 2x faster head, fp32 greedy answers kept).",
    )
    torch_max_seq_len: int = Field(
        1_536, ge=2, description="Prompt + max_new_tokens per sequence (KV slot length)."
    )
    torch_max_prefill_tokens: int = Field(
        512, ge=1, description="Prompt tokens prefilled together in one admission round."
    )
    torch_admit_batch: int = Field(
        4, ge=1, description="While others decode, admit once this many wait (or slots fill)."
    )
    torch_admit_wait_steps: int = Field(
        4, ge=0, description="...or once the oldest waiting request has waited this many steps."
    )
    llama_model: Path | None = Field(
        None, description="llama_cpp backend: a GGUF file. Unset: the packaged SmolLM2 GGUF."
    )
    llama_threads: int | None = Field(
        None, ge=1, description="llama_cpp backend: threads. Unset: the usable CPU cores."
    )
    llama_step_tokens: int = Field(
        512, ge=1, description="llama_cpp backend: most tokens in one decode step (prefill chunk)."
    )
    trt_model: str | None = Field(
        None, description="TensorRT-LLM: HF model folder/name or engine dir given to LLM()."
    )
    trt_max_batch_size: int = Field(64, ge=1, description="TensorRT-LLM engine batch size.")
    trt_max_num_tokens: int = Field(8192, ge=1)
    trt_kv_cache_free_gpu_memory_fraction: float = Field(0.85, gt=0, le=1)
    inflight_factor: float = Field(
        1.5,
        ge=1,
        description="Engines that batch in flight (torch, llama_cpp, tensorrt_llm): requests "
        "in flight = factor x the engine's max batch size. SLUICE_TRT_INFLIGHT_FACTOR is its "
        "deprecated name (still read; the new name wins).",
        validation_alias=AliasChoices("SLUICE_INFLIGHT_FACTOR", "SLUICE_TRT_INFLIGHT_FACTOR"),
    )
    benchmark_completion_tokens: int = Field(
        16, ge=1, description="benchmark backend: tokens in its fixed completion."
    )
    benchmark_delay_ms: float = Field(
        0.0, ge=0, description="benchmark backend: simulated latency of every batch."
    )
    benchmark_dead_after: int | None = Field(
        None,
        ge=0,
        description="benchmark backend (fault drill): the engine dies after this many requests.",
    )
    benchmark_overloaded_s: float = Field(
        0.0,
        ge=0,
        description="benchmark backend (fault drill): overloaded for this long after start.",
    )
    benchmark_broken_versions: str = Field(
        "",
        description="benchmark backend (fault drill for canaries): comma-separated model "
        "versions that answer badly, the way SLUICE_BENCHMARK_BROKEN_ANSWER says.",
    )
    benchmark_broken_answer: Literal["empty", "error"] = Field(
        "empty",
        description="How a broken benchmark version answers: empty (OK with no text) or "
        "error (an ERROR result for every request).",
    )

    # --- admission and batching -----------------------------------------------------------
    max_prompt_chars: int = Field(16_000, ge=1)
    max_prompt_tokens: int = Field(1_024, ge=1)
    max_new_tokens_limit: int = Field(512, ge=1)
    max_system_chars: int = Field(16_000, ge=1, description="Checked before tokenizing.")
    max_stop_strings: int = Field(16, ge=0)
    max_stop_chars: int = Field(64, ge=1, description="Longest stop string.")
    max_metadata_entries: int = Field(64, ge=0)
    max_metadata_chars: int = Field(8_192, ge=0, description="Metadata keys + values.")
    max_id_chars: int = Field(256, ge=1, description="Longest request_id, tenant, model.")
    max_priority: int = Field(9, ge=0, description="Priorities are clamped to 0..this.")
    min_temperature: float = Field(
        1e-3, ge=0, le=1, description="Temperatures in (0, this) are decoded greedily."
    )
    batch_max_size: int = Field(16, ge=1)
    batch_max_tokens: int = Field(8_192, ge=1, description="prompt + max_new_tokens per batch.")
    batch_max_wait_ms: float = Field(20.0, ge=0)
    max_inflight: int = Field(256, ge=1, description="Accepted but unanswered requests.")
    dedup_capacity: int = Field(200_000, ge=0, description="Answered request_ids remembered.")
    commit_interval_ms: float = Field(200.0, gt=0)
    dlq_max_original_bytes: int = Field(
        262_144,
        ge=0,
        description="A dead letter keeps at most this much of the original value (size and "
        "SHA-256 of the whole are kept): a dead letter must fit where the original barely did.",
    )

    # --- feedback join -----------------------------------------------------------------------
    feedback_join: bool = Field(
        True, description="Run the feedback join agent in this worker (llm.training-examples)."
    )
    feedback_window_ms: int = Field(
        24 * 3600 * 1000, ge=1, description="How long a result waits for its feedback."
    )
    feedback_wait_ms: int = Field(
        10 * 60 * 1000, ge=1, description="How long early feedback waits for its result."
    )
    pseudonym_key: SecretStr | None = Field(
        None,
        description="HMAC key for user pseudonyms (16+ characters). Unset: a key created "
        "under <home>/pseudonym.key for this installation only.",
    )
    feedback_max_entry_bytes: int = Field(
        256_000,
        ge=4_096,
        description="Largest value the join stores per request_id (JSON bytes); longer "
        "prompts, answers, corrections and metadata are truncated with a marker.",
    )
    feedback_clock_skew_ms: int = Field(
        60_000,
        ge=0,
        description="How far past wall time a record's timestamp may move the join's clock.",
    )

    # --- metrics windows (llm.metrics, docs/metrics.md) --------------------------------------
    metrics_window_s: int = Field(10, ge=1, description="Tumbling window length (event time).")
    metrics_rollup_s: int = Field(60, ge=0, description="Rollup window length; 0: none.")
    metrics_lateness_s: float = Field(
        5.0, ge=0, description="Allowed lateness: watermark = latest event time - this."
    )
    metrics_max_tenants: int = Field(
        100, ge=0, description="Tenants with windows of their own; the rest fold into one."
    )
    metrics_feedback_lookup: int = Field(
        10_000, ge=0, description="Recent results remembered to attribute feedback to a model."
    )
    metrics_snapshot_interval_ms: float = Field(
        1_000.0, gt=0, description="How often the metrics job persists its state and commits."
    )
    metrics_request_lookup: int = Field(
        10_000, ge=0, description="Recent requests remembered to attribute results to a tenant."
    )
    metrics_cost_top_tenants: int = Field(
        20, ge=0, description="Tenants named in the cost counters; the rest are 'other'."
    )

    # --- monitors and auto canary (streams/monitors/, streams/canary.py) --------------------
    monitor_reference_size: int = Field(
        200, ge=2, description="Results of a version that form its drift reference."
    )
    monitor_current_size: int = Field(
        200, ge=2, description="Latest results compared with the reference."
    )
    monitor_min_current: int = Field(30, ge=2, description="Fewer current results: no reading.")
    monitor_permutations: int = Field(200, ge=1, description="Permutations of the MMD test.")
    monitor_alpha: float = Field(0.01, gt=0, lt=1, description="Drift flagged below this p.")
    monitor_reference_file: Path | None = Field(
        None, description="Pinned reference: JSONL of {prompt, completion_tokens}."
    )
    monitor_embed_batch: int = Field(64, ge=1, description="Prompts embedded per flush at most.")
    monitor_embed_per_window: int = Field(
        32, ge=1, description="Prompts embedded per version and metrics window at most."
    )
    monitor_enabled: bool = Field(
        True, description="The metrics job runs the drift monitors and their gauges."
    )
    monitor_prompt_drift: bool = Field(
        True, description="Embed prompts for the prompt drift test (the metrics job)."
    )
    monitor_prompt_lookup: int = Field(
        2_000, ge=1, description="Recent request prompts remembered for their results."
    )
    monitor_test_interval_s: float = Field(
        5.0, ge=0, description="A version's drift tests run again at most this often."
    )
    monitor_persist_interval_s: float = Field(
        60.0, gt=0, description="How often the drift samples of a version are saved."
    )
    canary_alpha: float = Field(0.05, gt=0, lt=1, description="Auto canary false-decision rate.")
    canary_error_margin: float = Field(0.02, ge=0, description="Bad-answer share margin.")
    canary_latency_margin: float = Field(0.25, ge=0, description="p99 margin (relative).")
    canary_feedback_margin: float = Field(0.2, ge=0, description="Mean feedback score margin.")
    canary_min_requests: int = Field(200, ge=1, description="Candidate results before PROMOTE.")
    canary_latency_share_margin: float = Field(
        0.02, ge=0, description="Extra share of candidate requests slower than the base's p99."
    )
    canary_min_rollback_requests: int = Field(
        20, ge=1, description="Candidate results before a ROLLBACK may be decided."
    )
    canary_min_feedback: int = Field(30, ge=0, description="Feedback events before it counts.")
    canary_drift_alpha: float = Field(0.01, gt=0, lt=1, description="Drift p-value that holds.")
    canary_max_requests: int = Field(
        20_000, ge=1, description="Candidate results without a proof: ROLLBACK (inconclusive)."
    )
    canary_poll_s: float = Field(10.0, gt=0, description="How often --auto reads llm.metrics.")
    canary_timeout_s: float = Field(3600.0, gt=0, description="--auto gives up (no command).")

    # --- worker ---------------------------------------------------------------------------
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name on results and metrics.",
    )
    worker_role: Literal["all", "inference", "join", "metrics"] = Field(
        "all",
        description="inference: answer requests; join: the feedback join only (its own "
        "consumer group, <app_id>-join); metrics: the llm.metrics windows (<app_id>-metrics, "
        "one worker); all: inference and join in one group (the demo).",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: how long accepted requests may take to finish."
    )
    shutdown_grace_s: float = Field(
        50.0,
        gt=0,
        description="On SIGTERM the process is gone within this many seconds, whatever the "
        "broker does (Kubernetes' default terminationGracePeriodSeconds is 60).",
    )
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, description="Prometheus /metrics; 0 picks a free port.")
    log_level: str = "INFO"

    def kafka_client_options(self) -> dict[str, Any]:
        """Security options for aiokafka clients (``streams.security``: TLS context, SASL)."""
        from streams.security import aiokafka_options

        return aiokafka_options(self)

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"

    @property
    def registry_path(self) -> Path:
        return self.registry_dir or self.home / "registry"

    @property
    def trt_inflight_factor(self) -> float:
        """Deprecated name of :attr:`inflight_factor` (read-only)."""
        return self.inflight_factor
