"""What the engine tests share: prompts, building a request, running one or a batch.

Used by the tests of every in-process engine (``test_torch_engine.py``,
``test_llama_cpp_engine.py``) so both check the contract on the same inputs the same way.
"""

from __future__ import annotations

from typing import Any

from inference.types import Completion, GenerationRequest, Sampling

FRANCE = "What is the capital of France?"
STORY = "Tell me a short story about a dragon."
# Three prompts of clearly different lengths, so a batch of them needs padding or packing.
PROMPTS = [
    "Hi",
    FRANCE,
    "Write one sentence about the ocean and explain, in simple words, why it looks blue.",
]


def request(
    engine: Any,
    prompt: str,
    *,
    raw: bool = False,
    system: str | None = None,
    rid: str = "r",
    **sampling: object,
) -> GenerationRequest:
    """A request for ``engine``, its prompt tokenized by that engine."""
    return GenerationRequest(
        request_id=rid,
        prompt=prompt,
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
        system=system,
        raw=raw,
        prompt_ids=engine.encode_prompt(prompt, system=system, raw=raw),
    )


async def run_one(engine: Any, req: GenerationRequest) -> Completion:
    (outcome,) = await engine.generate([req])
    assert isinstance(outcome, Completion), outcome
    return outcome


async def run_batch(engine: Any, reqs: list[GenerationRequest]) -> list[Completion]:
    outcomes = await engine.generate(reqs)
    assert len(outcomes) == len(reqs)
    assert all(isinstance(o, Completion) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]
