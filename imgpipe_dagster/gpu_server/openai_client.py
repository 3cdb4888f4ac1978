"""Client of any OpenAI-compatible model server (vLLM, SGLang, LMDeploy, TGI, the project's own server)
with the native client's face: ``analyze(images, prompt) -> [ImageAnalysis]`` and its errors.

Each image is one ``POST {base}/chat/completions``: the image as a base64 data URI in an ``image_url``
content part, then the prompt file's text, ``temperature`` 0 and ``max_tokens`` from the profile. The
images of one call are sent concurrently (those servers batch across requests themselves) and the
answers are parsed into the same result as the native server's (analysis_parse.py). The error
mapping is the native client's (client.py): 429 is ServerBusy with its Retry-After, a timeout
ServerTimeout, 5xx or no connection ServerUnavailable, so the run's limiter, breaker and retry policy
treat both tiers alike. One image refused (4xx) fails that image only; all refused raises RequestRejected.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from imgpipe_dagster.gpu_server.analysis_parse import parse_analysis
from imgpipe_dagster.gpu_server.client import (
    GpuClient,
    ImageAnalysis,
    RequestRejected,
    ServerBusy,
    ServerTimeout,
    ServerUnavailable,
)
from imgpipe_dagster.gpu_server.prompts import SYSTEM_TEXT, load_prompt

# Magic bytes -> media type of the data URI (servers decode by content, but some check the type).
_SIGNATURES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"))


def openai_base_url(url: str) -> str:
    """``url`` as an OpenAI base URL: a bare server address gets ``/v1`` (http://host:8000 ->
    http://host:8000/v1); a URL with a path is taken as it is."""
    url = url.rstrip("/")
    return url if urlsplit(url).path not in ("", "/") else url + "/v1"


def media_type(image: bytes) -> str:
    for signature, kind in _SIGNATURES:
        if image.startswith(signature):
            return kind
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"


def chat_request(image: bytes, prompt_text: str, model: str, max_tokens: int) -> dict[str, Any]:
    """The chat-completions body for one image (the Qwen-VL chat layout: image, then the instruction)."""
    data_uri = f"data:{media_type(image)};base64,{base64.b64encode(image).decode('ascii')}"
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_TEXT},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri}},
                {"type": "text", "text": prompt_text},
            ]},
        ],  # fmt: skip
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def answer_text(payload: dict[str, Any]) -> tuple[str, str | None]:
    """(text, finish_reason) of the first choice; content given as a list of parts is joined."""
    try:
        choice = payload["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"no choices[0].message.content in the answer ({type(error).__name__})") from None
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or ""), choice.get("finish_reason")


class OpenAIClient(GpuClient):
    """One OpenAI-compatible base URL (``http://host:8000/v1``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        max_tokens: int = 128,
        timeout_s: float = 120.0,
        max_connections: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(openai_base_url(base_url), token=api_key, timeout_s=timeout_s,
                         max_connections=max_connections, **kwargs)  # fmt: skip
        self.model = model
        self.max_tokens = max_tokens

    async def served_model(self) -> str:
        """The model to ask for: the configured one, else the first the server lists at /models."""
        if self.model is None:
            response = await self._send("GET", "/models")
            try:
                self.model = str(response.json()["data"][0]["id"])
            except (ValueError, KeyError, IndexError, TypeError):
                raise ServerUnavailable(f"{self.base_url}/models lists no model: {response.text[:200]}") from None
        return self.model

    async def analyze(self, images: Sequence[bytes], prompt: str = "analysis_v1") -> list[ImageAnalysis]:
        instruction = load_prompt(prompt)
        model = await self.served_model()
        answers = await asyncio.gather(
            *(self._one(image, instruction.text, model) for image in images), return_exceptions=True
        )
        _raise_server_trouble(answers)
        results: list[ImageAnalysis] = []
        for answer in answers:
            if isinstance(answer, RequestRejected):
                results.append(ImageAnalysis(None, None, False, 0, 0, f"rejected by the model server: {answer}", 0,
                                             prompt_version=instruction.version))  # fmt: skip
            elif isinstance(answer, BaseException):
                raise answer
            else:
                results.append(_analysis(answer[0], answer[1], instruction.version))
        return results

    async def _one(self, image: bytes, prompt_text: str, model: str) -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        response = await self._send("POST", "/chat/completions", json=chat_request(image, prompt_text, model,
                                                                                  self.max_tokens))  # fmt: skip
        try:
            payload = response.json()
        except ValueError:
            raise ServerUnavailable(f"{self.base_url}/chat/completions: answer is not JSON") from None
        return payload, (time.monotonic() - started) * 1000.0


def _raise_server_trouble(answers: list[Any]) -> None:
    """Raise what the server's state says for the whole call: a timeout or an outage before a 429
    (the heavier loss signal wins), the longest Retry-After among 429s; all refused: RequestRejected."""
    errors = [answer for answer in answers if isinstance(answer, BaseException)]
    for kind in (ServerTimeout, ServerUnavailable):
        for error in errors:
            if isinstance(error, kind):
                raise error
    busy = [error for error in errors if isinstance(error, ServerBusy)]
    if busy:
        raise max(busy, key=lambda error: error.retry_after_s)
    if errors and len(errors) == len(answers) and all(isinstance(e, RequestRejected) for e in errors):
        raise errors[0]


def _analysis(payload: dict[str, Any], elapsed_ms: float, prompt_version: str) -> ImageAnalysis:
    try:
        text, finish_reason = answer_text(payload)
    except ValueError as error:
        return ImageAnalysis(None, None, False, 0, 0, f"unusable answer: {error}", 1, prompt_version=prompt_version)
    analysis, parse_ok = parse_analysis(text)
    usage = payload.get("usage") or {}
    return ImageAnalysis(
        text=text, analysis=analysis, parse_ok=parse_ok,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        generated_tokens=int(usage.get("completion_tokens") or 0),
        error=None, batch_size=1, timings={"inference_ms": round(elapsed_ms, 3)},
        prompt_version=prompt_version, model=payload.get("model"),
    )  # fmt: skip
