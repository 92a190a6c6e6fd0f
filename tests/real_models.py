"""Tiny checkpoints shaped like the real ones, built offline in seconds (the session fixture
``real_models`` in tests/conftest.py; cached under W2S_TEST_CACHE like the demo models).

| name    | class               | tokenizer (trained here on the demo's arithmetic problems)                 | what is real about it |
|---------|---------------------|-----------------------------------------------------------------------------|-----------------------|
| llama   | LlamaForCausalLM    | byte-level BPE, BOS added by the tokenizer, no pad token (Llama 3)         | no pad token |
| qwen2   | Qwen2ForCausalLM    | byte-level BPE with vocab.json/merges.txt, ChatML template, pad <|endoftext|>, eos <|im_end|> | chat template, sharded safetensors |
| mistral | MistralForCausalLM  | SentencePiece-style BPE (▁, byte fallback), BOS added, no pad              | sliding_window in config |
| gemma   | GemmaForCausalLM    | SentencePiece-style BPE padded to a 32,768-entry vocabulary, Gemma template | tied embeddings, large vocabulary |

The tokenizer files are written the way the published checkpoints ship them (``tokenizer.json``
from the tokenizers library, a hand-written ``tokenizer_config.json`` with the 4.x class names,
``special_tokens_map.json``), not re-saved by the transformers installed here. Each model gets a
few hundred milliseconds of training on the corpus so greedy generation is not one repeated token.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path

import torch

from models.prompts import step_by_step, training_target, zero_shot

NAMES = ("llama", "qwen2", "mistral", "gemma")
MANIFEST = "real-models.json"
VERSION = 2  # bump when the build changes what it makes: older caches are rebuilt

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
                  "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
                  "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
GEMMA_VOCAB = 32_768


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Prompts and GSM8K-style solutions of the demo's arithmetic problems, plain and step by step."""
    from models.demo import make_problems

    texts = []
    for i, p in enumerate(make_problems(random.Random(seed), "target", n)):
        if i % 2:
            texts.append(zero_shot(p.question) + training_target(p.solution))
        else:
            steps = [line for line in p.solution.splitlines() if not line.startswith("####")]
            answer = "".join(f"Step {k}: {s}\n" for k, s in enumerate(steps, 1)) + f"The answer is \\boxed{{{p.answer}}}"
            texts.append(step_by_step(p.question, "gsm8k", shots=0) + training_target(answer))
    return texts


# --- tokenizers ------------------------------------------------------------------------------------


def _byte_level(texts: list[str], specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _sentencepiece_style(texts: list[str], specials: list[str], vocab_size: int, pad_to: int | None = None):
    """BPE over ▁-words with byte fallback, as Llama 2 / Mistral / Gemma tokenizer.json files are."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trainer_tok.train_from_iterator(["▁" + t.replace(" ", "▁") for t in texts], trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in [*specials, *(f"<0x{b:02X}>" for b in range(256)), *trained["vocab"]]:
        vocab.setdefault(token, len(vocab))
    for i in range(max(0, (pad_to or 0) - len(vocab))):  # Gemma ships <unused0>... too
        vocab[f"<unused{i}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _add_specials(tok, specials: list[str]) -> None:
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])


def _bos_template(tok, bos: str) -> None:
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])


def _added_tokens_decoder(tok, specials: list[str]) -> dict[str, dict]:
    return {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for s in specials}


def _write_tokenizer(out: Path, tok, config: dict, special_map: dict, *, vocab_merges: bool = False) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    if vocab_merges:
        tok.model.save(str(out))  # vocab.json, merges.txt (Qwen2 and GPT-2 ship both)


# --- the four families -------------------------------------------------------------------------------


def _llama(texts, out: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok = _byte_level(texts, specials, 700)
    _bos_template(tok, "<|begin_of_text|>")
    _write_tokenizer(out, tok, {
        "added_tokens_decoder": _added_tokens_decoder(tok, specials), "bos_token": "<|begin_of_text|>",
        "clean_up_tokenization_spaces": False, "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast"},
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                         eos_token_id=tok.token_to_id("<|end_of_text|>"), tie_word_embeddings=False)
    return tok, LlamaForCausalLM(config), {}


def _qwen2(texts, out: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_level(texts, specials, 700)
    _write_tokenizer(out, tok, {
        "add_prefix_space": False, "added_tokens_decoder": _added_tokens_decoder(tok, specials),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None, "chat_template": CHATML,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 512, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None},
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}, vocab_merges=True)
    config = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"),
                         tie_word_embeddings=False)
    return tok, Qwen2ForCausalLM(config), {"max_shard_size": "100KB"}  # several shards and an index


def _mistral(texts, out: Path):
    from transformers import MistralConfig, MistralForCausalLM

    specials = ["<unk>", "<s>", "</s>"]
    tok = _sentencepiece_style(texts, specials, 500)
    _add_specials(tok, specials)
    _bos_template(tok, "<s>")
    _write_tokenizer(out, tok, {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": _added_tokens_decoder(tok, specials),
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": True,
        "model_max_length": 512, "pad_token": None, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False},
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    config = MistralConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return tok, MistralForCausalLM(config), {}


def _gemma(texts, out: Path):
    from transformers import GemmaConfig, GemmaForCausalLM

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tok = _sentencepiece_style(texts, specials, 500, pad_to=GEMMA_VOCAB)
    _add_specials(tok, specials)
    _bos_template(tok, "<bos>")
    _write_tokenizer(out, tok, {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": _added_tokens_decoder(tok, specials),
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"], "bos_token": "<bos>",
        "chat_template": GEMMA_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<eos>",
        "mask_token": "<mask>",
        "model_max_length": 512, "pad_token": "<pad>", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False},
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"], "bos_token": "<bos>",
         "eos_token": "<eos>", "mask_token": "<mask>", "pad_token": "<pad>", "unk_token": "<unk>"})
    config = GemmaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    return tok, GemmaForCausalLM(config), {}


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gemma": _gemma}


def _warm_up(model, tok, texts: list[str], steps: int = 80, seed: int = 0) -> None:
    """A few AdamW steps on the corpus: greedy output then looks like arithmetic, not one repeated
    token. The loss covers only the vocabulary the corpus uses (Gemma's 32k mostly unused rows
    would cost ten times the rest of the build)."""
    import torch.nn.functional as F

    rng = random.Random(seed)
    ids = [e.ids[:80] for e in tok.encode_batch(texts)]
    used = max(max(x) for x in ids) + 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(ids, 16)
        width = max(len(x) for x in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, x in enumerate(batch):
            input_ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(x)] = torch.tensor(x)
        hidden = model.model(input_ids=input_ids).last_hidden_state
        logits = F.linear(hidden, model.lm_head.weight[:used])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, used), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_real_models(root: Path, seed: int = 0) -> dict[str, Path]:
    """The four checkpoints under ``root/<name>``; reused when ``root``'s manifest is this version."""
    root = Path(root)
    manifest = root / MANIFEST
    if _current(manifest):
        return {name: root / name for name in NAMES}
    texts = corpus(seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (10x slower on a loaded machine)
    tmp = root.with_name(f"{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name in NAMES:
            out = tmp / name
            out.mkdir()
            torch.manual_seed(seed)
            tok, model, save_options = FAMILIES[name](texts, out)
            _warm_up(model, tok, texts, seed=seed)
            model.generation_config.pad_token_id = None  # as shipped: the config names no pad for Llama/Mistral
            model.save_pretrained(out, **save_options)
        (tmp / MANIFEST).write_text(json.dumps({"version": VERSION, "names": list(NAMES)}) + "\n")
        if root.exists() and not _current(manifest):
            shutil.rmtree(root, ignore_errors=True)  # an older version's build
        try:
            os.replace(tmp, root)
        except OSError:  # another test run finished the same build first
            if not _current(manifest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return {name: root / name for name in NAMES}


def _current(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False
