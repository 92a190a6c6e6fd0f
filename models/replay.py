"""A model-free backend that replays recorded responses: for benchmarks of the orchestration (no
model time in the figures) and for failure tests that need jobs of a controlled length.

A replay checkpoint is a directory holding ``w2s-replay.json``::

    {"responses": "responses.jsonl", "delay_s": 0.0}

and a JSONL file of ``{"prompt": "Question: ...\\nAnswer:", "response": "..."}`` records (the shape of
``../shared/data/reference/weak_outputs``). A prompt is looked up by its last zero-shot block, so
few-shot prompts find their question's record too; every sample of a prompt is the recorded
response. ``delay_s`` is slept per prompt, to stand in for model time. Token counts are words.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "w2s-replay.json"
BLOCK = "Question: "


def is_replay_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def question_key(prompt: str) -> str:
    """The prompt's last `Question: …\\nAnswer:` block (the question being asked)."""
    at = prompt.rfind("\n\n" + BLOCK)
    return prompt[at + 2 :] if at != -1 else prompt


@dataclass
class ReplayModel:
    path: Path
    responses: dict[str, str]
    delay_s: float = 0.0
    replays = True  # what models.generation looks for

    def generate(self, prompts: list[str], *, num_samples: int = 1):
        from models.generation import Completion

        out = []
        for prompt in prompts:
            key = question_key(prompt)
            if key not in self.responses:
                raise KeyError(f"replay checkpoint {self.path}: no recorded response for prompt {key[:80]!r}")
            if self.delay_s:
                time.sleep(self.delay_s)
            text = " " + self.responses[key]
            out.append([Completion(text=text, input_tokens=len(prompt.split()), output_tokens=len(text.split()))
                        for _ in range(num_samples)])
        return out


def load_replay(path: str | Path):
    """A LoadedModel whose model replays; raises CheckpointError naming the file on bad input."""
    from models.loading import CheckpointError, LoadedModel, fingerprint

    path = Path(path).resolve()
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        responses = {}
        with (path / manifest.get("responses", "responses.jsonl")).open() as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    responses[question_key(record["prompt"])] = record["response"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(path, f"unreadable replay files: {exc}") from None
    model = ReplayModel(path, responses, float(manifest.get("delay_s", 0.0)))
    return LoadedModel(model=model, tokenizer=None, path=path, fingerprint=fingerprint(path))


def write_replay(path: str | Path, records: list[dict], *, delay_s: float = 0.0) -> Path:
    """Write a replay checkpoint: records of {"prompt", "response"}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with (path / "responses.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps({"prompt": record["prompt"], "response": record["response"]}) + "\n")
    (path / MANIFEST).write_text(json.dumps({"responses": "responses.jsonl", "delay_s": delay_s}))
    return path
