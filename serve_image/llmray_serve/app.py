"""The Ray Serve application: `build_app(args) -> Application` (the RayService import_path).

    serveConfigV2:
      applications:
        - name: gsm8k-7b
          import_path: llmray_serve.app:build_app
          args: {name: gsm8k-7b, model_uri: s3://bucket/models/gsm8k-7b, served_name: ..., ...}

Every replica loads the model into an engine and serves the OpenAI API of `ingress.py`.
A deployment with LoRA adapters (max_loaded_adapters > 0) gets their list as the Serve
deployment's `user_config` (ServeUserConfig): Serve calls `reconfigure` with it on running
replicas whenever it changes, without restarting them (adapter_registry.py).
Capacity per replica: the engine holds `max_ongoing_requests` requests (decoding together, or
waiting for a slot in the batch) and refuses the next at once with an OpenAI-shaped 503 and
Retry-After. Ray Serve's own limits are set well above that, so that the engine's refusal is
what clients see: Ray's router, when full, answers 503 with a plain-text body of its own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from llmray import hardware, uris
from llmray.paths import pod_path
from llmray.serve_args import ServeArgs, ServeUserConfig
from llmray_serve.adapter_registry import AdapterRegistry
from llmray_serve.engine import Engine
from llmray_serve.ingress import IngressSettings, build_api

log = logging.getLogger(__name__)


# Ray Serve's per-replica admission: this many times the engine's limit, at least the minimum.
RAY_ADMISSION_FACTOR = 8
RAY_ADMISSION_MIN = 256
# Ray Serve calls check_health this often and replaces a replica after 3 failures in a row: a
# replica whose generation loop died is gone in about 6 s, not Ray's default 30 s.
HEALTH_CHECK_PERIOD_S = 2.0


class RayServeMetrics:
    """Generation metrics beside Ray Serve's own, on the same Prometheus endpoint."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "llmray_requests", "HTTP requests by route and status.", tag_keys=("route", "status")
        )
        self.generated = metrics.Counter("llmray_generated_tokens", "Completion tokens.")
        self.prompt = metrics.Counter("llmray_prompt_tokens", "Prompt tokens.")
        self.ttft = metrics.Histogram(
            "llmray_time_to_first_token_seconds",
            "From request to the first generated text, of streamed requests.",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
        )

        self.info = metrics.Gauge(
            "llmray_model_info",
            "1, labelled with the precision the replica's model runs in.",
            tag_keys=("dtype", "quantization"),
        )

    def model_info(self, details: dict[str, str]) -> None:
        self.info.set(1, tags={k: details[k] for k in ("dtype", "quantization")})

    def request_done(self, route: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        if prompt:
            self.prompt.inc(prompt)
        if completion:
            self.generated.inc(completion)


@serve.deployment(name="llm")
@serve.ingress()  # the app comes from __serve_build_asgi_app__, once __init__ is done
class LLMServer:
    """One replica: the model in an engine, and the OpenAI API over it."""

    def __init__(self, args: ServeArgs) -> None:
        model_dir = uris.fetch(
            args.model_uri, Path(args.base_dir), pod_path(args.cache_dir), field="spec.model.uri"
        )
        api_key = None
        if args.api_key_env:
            api_key = os.environ.get(args.api_key_env)
            if not api_key:
                raise RuntimeError(
                    f"spec.apiKeySecretRef is set but {args.api_key_env} is "
                    "empty in the server's environment"
                )
        self.engine = make_engine(args, model_dir)
        self.adapters = None
        if args.max_loaded_adapters:

            def fetch(uri: str) -> str:
                cache = pod_path(args.cache_dir)
                return str(uris.fetch(uri, Path(args.base_dir), cache, field="spec.adapters"))

            self.adapters = AdapterRegistry(
                self.engine,  # type: ignore[arg-type]  # both engines implement AdapterEngine
                args.served_name,
                args.max_loaded_adapters,
                fetch,
            )
        self.settings = IngressSettings(
            served_name=args.served_name,
            max_new_tokens=args.max_new_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            api_key=api_key,
            model_details=self.engine.precision.details(),
        )
        log.info(
            "serving %s as %r in %s, quantization %s (%s)",
            model_dir,
            args.served_name,
            self.engine.precision.dtype,
            self.engine.precision.quantization,
            self.engine.precision.reason,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Ray Serve calls this on the replica after __init__: the API of this replica's own
        engine and settings (an app built beforehand, at import, could not reach them)."""
        metrics = RayServeMetrics()
        metrics.model_info(self.engine.precision.details())
        return build_api(self.engine, self.settings, metrics, self.adapters)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls it after __init__ and on every change of the deployment's user_config
        (the replica keeps running; requests in flight go on)."""
        if self.adapters is not None:
            self.adapters.update(ServeUserConfig.model_validate(user_config))

    def check_health(self) -> None:
        if not self.engine.healthy():  # Ray Serve replaces the replica
            raise RuntimeError("the engine cannot generate: its loop stopped or is stuck")

    def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def make_engine(args: ServeArgs, model_dir: Path) -> Engine:
    """The engine of spec.engine; `auto` is vLLM on NVIDIA GPUs where installed, else
    transformers."""
    from llmray_serve.vllm_engine import engine_kind

    max_seq_tokens = args.max_prompt_tokens + args.max_new_tokens
    if engine_kind(args.engine, args.accelerator) == "vllm":
        from llmray_serve.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_dir,
            num_gpus=int(args.num_gpus),
            max_ongoing=args.max_ongoing_requests,
            max_seq_tokens=max_seq_tokens,
            dtype=args.dtype,
            max_loras=args.max_loaded_adapters,
            max_lora_rank=args.max_adapter_rank,
        )
    from llmray_serve.hf_engine import TransformersEngine

    return TransformersEngine(
        model_dir,
        device=hardware.profile(args.accelerator, args.ipex).device_type,
        ipex=args.ipex,
        dtype=args.dtype,
        max_ongoing=args.max_ongoing_requests,
        max_seq_tokens=max_seq_tokens,
        adapters=args.max_loaded_adapters > 0,
        compile_decode=args.compile_decode,
    )


def build_app(args: dict[str, Any] | ServeArgs) -> Application:
    """The RayService application from its args (validated: a bad arg fails the deploy).

    Ray Serve calls it with the serveConfigV2 `args` and accepts a builder of exactly one
    parameter (the KubeRay replay found a second, keyword-only one failing every deploy).
    """
    return application(args)


def application(
    args: dict[str, Any] | ServeArgs,
    env: dict[str, str] | None = None,
    user_config: ServeUserConfig | None = None,
) -> Application:
    """`build_app`, plus `env`: extra environment for the replicas, for local runs only (on
    Kubernetes the pods carry it, e.g. the API key from apiKeySecretRef); `user_config`: the
    adapters (a Serve config sets it per deployment instead, as serveConfigV2 does)."""
    a = ServeArgs.model_validate(args)
    actor_options: dict[str, Any] = {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus}
    if env:
        actor_options["runtime_env"] = {"env_vars": dict(env)}
    autoscaling = None
    if a.max_replicas > a.min_replicas:
        autoscaling = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    # Ray admits far more than the engine holds: the excess reaches the replica and gets the
    # engine's OpenAI 503 within milliseconds (Ray's router would queue it or answer in text).
    ray_limit = max(RAY_ADMISSION_MIN, RAY_ADMISSION_FACTOR * a.max_ongoing_requests)
    extra: dict[str, Any] = {}
    if user_config is not None:
        extra["user_config"] = user_config.model_dump(mode="json")
    return LLMServer.options(
        num_replicas=None if autoscaling else a.min_replicas,
        autoscaling_config=autoscaling,
        max_ongoing_requests=ray_limit,
        max_queued_requests=ray_limit,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options=actor_options,
        **extra,
    ).bind(a)
