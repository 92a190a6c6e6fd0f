"""The ``replay`` backend: recorded responses, no model. For benchmarks of the orchestration (no
model time in the figures) and for failure tests that need jobs of a controlled length.

A replay checkpoint is a directory holding ``w2s-replay.json``::

    {"responses": "responses.jsonl", "delay_s": 0.0}

and a JSONL file of ``{"prompt": "Question: ...\\nAnswer:", "response": "..."}`` records (the shape of
``../shared/data/reference/weak_outputs``). A prompt is looked up by its last zero-shot block, so
few-shot prompts find their question's record too; every sample of a prompt is the recorded
response (as generated: already cut at its stop string). ``delay_s`` is waited per prompt, to stand
in for model time (a job's stop signal cuts the wait short). Token counts are words. A replay
records no token probabilities: its completions carry none, so their step scores are empty, and a
LECO run stops after the original (no step to doubt).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from models.backends.base import CallStats, Completion, GenerationParams, StepOptions
from models.backends.checkpoints import CheckpointError, fingerprint
from models.leco import Attempt, RethinkRequest
from models.stopping import current_signal

MANIFEST = "w2s-replay.json"
BLOCK = "Question: "


def is_replay_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_dir(path: Path) -> None:
    if not is_replay_dir(path):
        raise CheckpointError(path, f"{MANIFEST} is missing (not a replay checkpoint)")


def question_key(prompt: str) -> str:
    """The prompt's last `Question: …\\nAnswer:` block (the question being asked)."""
    at = prompt.rfind("\n\n" + BLOCK)
    return prompt[at + 2 :] if at != -1 else prompt


@dataclass
class ReplayBackend:
    path: Path
    responses: dict[str, str]
    fingerprint: str
    delay_s: float = 0.0
    name: str = "replay"

    @property
    def context_length(self) -> int | None:
        return None  # nothing is read: any prompt fits

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def formatted(self, prompt_format: str) -> ReplayBackend:
        if prompt_format != "plain":  # responses are recorded per plain prompt; there is no template
            raise ValueError(f"prompt_format {prompt_format}: replay checkpoint {self.path} has no chat template")
        return self

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        out = []
        for prompt in prompts:
            text = self._response(prompt)
            out.append([Completion(text=text, input_tokens=len(prompt.split()), output_tokens=len(text.split()))
                        for _ in range(params.num_samples)])
        return out

    def step_generator(self, prompts: Sequence[str], options: StepOptions) -> ReplayStepGenerator:
        return ReplayStepGenerator(self, list(prompts))

    def _response(self, prompt: str) -> str:
        key = question_key(prompt)
        if key not in self.responses:
            raise KeyError(f"replay checkpoint {self.path}: no recorded response for prompt {key[:80]!r}")
        signal = current_signal()
        signal.wait(self.delay_s)  # stands in for model time, and stops as a model would
        signal.check()
        return " " + self.responses[key]


@dataclass
class ReplayStepGenerator:
    """LECO over a replay: an attempt is what the recorded response holds after the kept text."""

    backend: ReplayBackend
    prompts: list[str]
    calls: list[CallStats] = field(default_factory=list)

    def __call__(self, requests: list[RethinkRequest]) -> list[Attempt]:
        attempts = []
        for request in requests:
            prompt = self.prompts[request.question_index]
            response = self.backend._response(prompt)
            if not response.startswith(request.kept_text):
                raise ValueError(f"question {request.question_index}: kept_text is not a prefix of its recorded response")
            text = response[len(request.kept_text) :]
            attempts.append(Attempt(text=text, token_texts=[], token_probs=[],
                                    input_tokens=len((prompt + request.kept_text).split()),
                                    output_tokens=len(text.split())))
        encoded = sum(a.input_tokens for a in attempts)
        self.calls.append(CallStats(len(requests), encoded, encoded, sum(a.output_tokens for a in attempts)))
        return attempts


def load(path: Path, **_options) -> ReplayBackend:
    """Read a checked replay checkpoint; raises CheckpointError naming the file on bad input.
    Engine options (device, dtype, trust_remote_code) mean nothing here."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        responses_file = manifest.get("responses", "responses.jsonl")
        responses = {}
        with (path / responses_file).open() as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    responses[question_key(record["prompt"])] = record["response"]
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(path, f"unreadable replay files: {exc}") from None
    return ReplayBackend(path, responses, fingerprint(path),
                         float(manifest.get("delay_s", 0.0)))


def write_replay(path: str | Path, records: list[dict], *, delay_s: float = 0.0) -> Path:
    """Write a replay checkpoint: records of {"prompt", "response"}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with (path / "responses.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps({"prompt": record["prompt"], "response": record["response"]}) + "\n")
    (path / MANIFEST).write_text(json.dumps({"responses": "responses.jsonl", "delay_s": delay_s}))
    return path
