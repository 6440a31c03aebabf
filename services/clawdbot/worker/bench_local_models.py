"""Speed of the worker's other local models, in process, as the worker builds them.

`python -m clawdbot.worker.bench_local_models`: chat tokens/s and time to first token
(Gemma 3 270M, greedy), speech and transcription real-time factors (seconds of work per
second of audio: below 1 is faster than real time), intent classifications/s. Figures go
to stdout and .clawdbot/bench/local_models.json.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from clawdbot.common.config import WorkerConfig, WorkerModel
from clawdbot.worker.audio import decode_wav
from clawdbot.worker.catalog import LoadedModel, builder

PROMPTS = (
    "What is the capital of Japan?",
    "Name three colors of the rainbow.",
    "Why is the sky blue?",
    "Give me a tip for sleeping better.",
)
SENTENCES = (
    "turn on the kitchen lights",
    "set a timer for ten minutes",
    "what is the weather like tomorrow",
    "play some jazz in the living room",
)


def _build(runtime: str, name: str, config: WorkerConfig) -> LoadedModel:
    spec = WorkerModel.model_validate({"name": name, "runtime": runtime})
    model = builder(spec, config, lambda _name, _size: None)("")
    model.warm_up()
    return model


async def _chat(model: LoadedModel) -> dict[str, float]:
    tokens, generating, first = 0, 0.0, []
    for prompt in PROMPTS:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "temperature": 0}
        started = time.perf_counter()
        first_at = None
        async for payload in model.task.stream({**body, "stream_options": {"include_usage": True}}):
            chunk = json.loads(payload)
            if first_at is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first_at = time.perf_counter()
            if chunk.get("usage"):
                tokens += chunk["usage"]["completion_tokens"]
        ended = time.perf_counter()
        first.append((first_at or ended) - started)
        generating += ended - (first_at or ended)
    return {"tokens_per_s": tokens / generating, "ttft_ms_median": statistics.median(first) * 1000}


async def _audio(speech: LoadedModel, asr: LoadedModel) -> dict[str, float]:
    synth_s = audio_s = asr_s = 0.0
    correct = 0
    for sentence in SENTENCES:
        started = time.perf_counter()
        wav, _ = await speech.task.answer({"input": sentence, "voice": "alloy"})
        synth_s += time.perf_counter() - started
        samples, rate = decode_wav(wav)
        audio_s += len(samples) / rate
        started = time.perf_counter()
        heard = await asr.task.answer({}, wav)
        asr_s += time.perf_counter() - started
        correct += heard["text"] == sentence
    return {
        "speech_rtf": synth_s / audio_s,
        "transcription_rtf": asr_s / audio_s,
        "audio_seconds": audio_s,
        "transcripts_exact": correct / len(SENTENCES),
    }


async def _intent(model: LoadedModel) -> dict[str, float]:
    started = time.perf_counter()
    for i in range(200):
        await model.task.answer({"input": SENTENCES[i % len(SENTENCES)]})
    single = 200 / (time.perf_counter() - started)
    started = time.perf_counter()
    await model.task.answer({"input": [SENTENCES[i % len(SENTENCES)] for i in range(256)]})
    batched = 256 / (time.perf_counter() - started)
    return {"intents_per_s_single": single, "intents_per_s_batch_256": batched}


async def _run() -> dict[str, Any]:
    config = WorkerConfig()
    results: dict[str, Any] = {}
    chat = _build("llama_cpp", "gemma-3-270m", config)
    results["chat"] = await _chat(chat)
    chat.close()
    results["audio"] = await _audio(
        _build("espeak", "espeak-ng", config), _build("pocketsphinx", "pocketsphinx-en", config)
    )
    results["intent"] = await _intent(_build("intent", "intent-classifier", config))
    return results


def main() -> int:
    results = asyncio.run(_run())
    chat, audio, intent = results["chat"], results["audio"], results["intent"]
    print("\nlocal models (in process, 2 threads for llama.cpp)")
    print(f"  chat gemma-3-270m      {chat['tokens_per_s']:8.1f} tokens/s   TTFT p50 {chat['ttft_ms_median']:.0f} ms")
    print(f"  speech espeak-ng       {audio['speech_rtf']:8.3f} s per audio s")
    print(
        f"  transcription sphinx   {audio['transcription_rtf']:8.3f} s per audio s   "
        f"({audio['transcripts_exact']:.0%} of {len(SENTENCES)} commands word-exact)"
    )
    print(
        f"  intent classifier      {intent['intents_per_s_single']:8.0f} /s one at a time, "
        f"{intent['intents_per_s_batch_256']:.0f} /s in a batch of 256"
    )
    out = Path(".clawdbot/bench/local_models.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
