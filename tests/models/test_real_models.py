"""w2s's transformers backend on checkpoints shaped like the real ones (tests/real_models.py):
Llama without a pad token, Qwen2 with its chat template and sharded safetensors, Mistral with a
sliding window, Gemma with tied embeddings and a 32k vocabulary. Byte-level BPE and
SentencePiece-style tokenizers: tokens carry several characters, spaces and newlines merge into
words, so stop strings end inside tokens and re-tokenizing a text can give other ids."""

from __future__ import annotations

import json

import pytest

from models.backends import check_checkpoint_dir, default_cache
from models.generation import generate, step_generator
from models.leco import RethinkRequest, score_steps
from models.prompts import model_text, step_by_step, zero_shot
from tests.real_models import NAMES

QUESTIONS = [
    "Tom has 3 apples. He buys 2 more. How many apples does Tom have now?",
    "Ann has 7 pens. She gives away 4. Then she has 3 times as many. How many pens does Ann have now?",
    "Sam has 5 cards. He finds 1 more. How many cards does Sam have now?",
]
PROMPTS = [step_by_step(q, "gsm8k", shots=0) for q in QUESTIONS]
MAX_NEW = 24


@pytest.fixture(scope="module", params=NAMES)
def model(request, real_models):
    name = request.param
    return name, real_models[name], default_cache().get(real_models[name])


def test_checkpoints_look_like_the_published_ones(real_models):
    llama, qwen2, mistral, gemma = (real_models[n] for n in NAMES)
    for path in real_models.values():
        check_checkpoint_dir(path)  # the weights check `model register` runs
    assert "pad_token" not in json.loads((llama / "tokenizer_config.json").read_text())
    index = json.loads((qwen2 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (qwen2 / "model-00001-of-00006.safetensors").is_file()
    assert (qwen2 / "vocab.json").is_file() and (qwen2 / "merges.txt").is_file()
    assert json.loads((mistral / "config.json").read_text())["sliding_window"] == 256
    config = json.loads((gemma / "config.json").read_text())
    assert config["vocab_size"] >= 32_768 and config.get("tie_word_embeddings", True)


def test_the_backend_loads_with_a_pad_token_and_counts_the_bos(model):
    name, _, loaded = model
    tokenizer = loaded.tokenizer
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
    ids = tokenizer(PROMPTS[0])["input_ids"]
    if name == "qwen2":
        assert tokenizer.bos_token_id is None or ids[0] != tokenizer.bos_token_id
    else:
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert loaded.count_tokens(PROMPTS) == [len(x) for x in tokenizer(PROMPTS)["input_ids"]]
    if name == "gemma":
        assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_batched_greedy_equals_one_at_a_time_and_the_counts_add_up(model):
    _, _, loaded = model
    batched = generate(loaded, PROMPTS, max_new_tokens=MAX_NEW, stop_strings=(), batch_size=3,
                       return_token_probs="top5")
    single = [generate(loaded, [p], max_new_tokens=MAX_NEW, stop_strings=(), return_token_probs="top5")[0]
              for p in PROMPTS]
    assert [c[0].text for c in batched] == [c[0].text for c in single]
    for prompt, (completion,) in zip(PROMPTS, batched):
        assert completion.input_tokens == loaded.count_tokens([prompt])[0]  # padding is not counted
        assert 0 < completion.output_tokens <= MAX_NEW
        assert len(completion.token_texts) == len(completion.token_probs) == completion.output_tokens
        assert "".join(completion.token_texts) == completion.text
        assert all(0 < p <= 1 for p in completion.token_probs)
    assert len({c[0].text for c in batched}) > 1, "every prompt got the same text: a degenerate model"


def test_a_stop_string_that_ends_inside_a_token(model):
    _, _, loaded = model
    (full,) = generate(loaded, PROMPTS[:1], max_new_tokens=MAX_NEW, stop_strings=(), return_token_probs="top5")[0]
    pieces, text = full.token_texts, full.text
    ends = [sum(len(p) for p in pieces[: k + 1]) for k in range(len(pieces))]
    # a token of 2+ visible characters, not the first; the stop string runs from the token before
    # it into its first character, and occurs nowhere earlier in the text
    for k in range(1, len(pieces)):
        start = ends[k - 2] if k >= 2 else 0
        stop = text[start : ends[k - 1] + 1]
        if len(pieces[k].strip()) >= 2 and stop.strip() and text.find(stop) == start:
            break
    else:
        pytest.fail(f"no token of two characters to cut in {pieces}")
    (stopped,) = generate(loaded, PROMPTS[:1], max_new_tokens=MAX_NEW, stop_strings=[stop],
                          return_token_probs="top5")[0]
    assert stopped.text == text[:start]
    assert stopped.output_tokens == (k - 1)  # the tokens wholly before the stop string
    assert stopped.token_texts == pieces[: k - 1]


def test_step_splitting_on_multi_character_tokens(model):
    _, _, loaded = model
    for (completion,) in generate(loaded, PROMPTS, max_new_tokens=MAX_NEW, return_token_probs="full"):
        steps = score_steps(completion.token_texts, completion.token_probs)
        assert [s.text for s in steps] == [line for line in completion.text.split("\n") if line.strip()]
        assert all(1 <= s.n_tokens <= completion.output_tokens and 0 < s.avg <= 1 for s in steps)


def test_leco_cut_inside_a_token_and_prefix_reuse(model):
    name, _, loaded = model
    prompts = PROMPTS[:2]
    texts, inputs = {}, {}
    for reuse in (True, False):
        generator = step_generator(loaded, prompts, max_new_tokens=MAX_NEW, batch_size=2, reuse_cache=reuse)
        first = generator([RethinkRequest(0, ""), RethinkRequest(1, "")])
        # cut each answer inside its first token of two visible characters
        cuts, kept = [], []
        for attempt in first:
            k = next(k for k, p in enumerate(attempt.token_texts) if len(p.strip()) >= 2)
            head = "".join(attempt.token_texts[:k])
            cuts.append(head + attempt.token_texts[k][: len(attempt.token_texts[k]) - len(attempt.token_texts[k].lstrip()) + 1])
            kept.append(k)
        second = generator([RethinkRequest(0, cuts[0]), RethinkRequest(1, cuts[1])])
        assert all(a.output_tokens > 0 for a in second)
        texts[reuse] = [a.text for a in second]
        inputs[reuse] = [a.input_tokens for a in second]
        rests = [len(loaded.tokenizer(c["".join(a.token_texts[:k]).__len__():], add_special_tokens=False)["input_ids"])
                 for a, c, k in zip(first, cuts, kept)]
        prompt_tokens = loaded.count_tokens(prompts)
        assert generator.calls[1].reencode_tokens == sum(p + k + r for p, k, r in zip(prompt_tokens, kept, rests))
    assert texts[True] == texts[False]  # reusing the cache changes nothing but the work done
    assert inputs[False] == [p + k + r for p, k, r in zip(loaded.count_tokens(prompts), kept, rests)]
    # from the cache only the cut token's kept part is encoded (the prompt and whole tokens are served)
    assert inputs[True] == rests, f"{name}: the rethink re-encoded its prefix instead of reusing the cache"


def test_chat_format_is_the_template_once_with_one_bos(real_models):
    qwen2 = default_cache().get(real_models["qwen2"])
    text = model_text(qwen2.tokenizer, zero_shot("What is 2 + 3?"), "chat")
    assert text == "<|im_start|>user\nQuestion: What is 2 + 3?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    gemma = default_cache().get(real_models["gemma"])
    text = model_text(gemma.tokenizer, zero_shot("What is 2 + 3?"), "chat")
    assert text.startswith("<start_of_turn>user\n") and text.endswith("<start_of_turn>model\n")
    ids = gemma.tokenizer(text)["input_ids"]
    assert ids.count(gemma.tokenizer.bos_token_id) == 1 and ids[0] == gemma.tokenizer.bos_token_id
    chat = gemma.formatted("chat")
    assert chat.model is gemma.model  # one copy of the weights for both formats
    assert chat.count_tokens([zero_shot("What is 2 + 3?")]) == [len(ids)]
    (completion,) = generate(chat, [zero_shot("What is 2 + 3?")], max_new_tokens=4)[0]
    assert completion.input_tokens == len(ids)
    llama = default_cache().get(real_models["llama"])
    with pytest.raises(ValueError, match="prompt_format chat: .*no chat template"):
        model_text(llama.tokenizer, "Question: x\nAnswer:", "chat")
    assert model_text(llama.tokenizer, "Question: x\nAnswer:", "plain") == "Question: x\nAnswer:"


def test_register_stores_the_prompt_format_and_refuses_chat_without_a_template(real_models, w2s_home, cli_runner):
    from db.schema import Checkpoint
    from db.session import session_scope
    from services.settings import Settings

    result = cli_runner("model", "register", "llama", "--path", real_models["llama"], "--role", "strong",
                        "--prompt-format", "chat", ok=False)
    assert result.exit_code != 0 and "no chat template" in result.output and "llama" in result.output
    cli_runner("model", "register", "qwen2", "--path", real_models["qwen2"], "--role", "strong", "--prompt-format", "chat")
    cli_runner("model", "register", "llama", "--path", real_models["llama"], "--role", "weak")
    with session_scope(Settings().database_url) as session:
        formats = {c.name: c.prompt_format for c in session.query(Checkpoint)}
    assert formats == {"qwen2": "chat", "llama": "plain"}


def test_solve_reads_a_registered_model_in_its_prompt_format(real_models, w2s_home, cli_runner):
    """`w2sctl solve --model NAME` loads the model as registered (chat here); a bare path stays plain."""
    from cli.context import App
    from cli.evaluation import _load

    cli_runner("model", "register", "qwen2", "--path", real_models["qwen2"], "--role", "strong", "--prompt-format", "chat")
    app = App()
    assert _load(app, "qwen2").prompt_format == "chat"
    assert _load(app, str(real_models["qwen2"])).prompt_format == "plain"
