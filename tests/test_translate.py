"""`nllb-prune translate`: batching by length, output in input order, forced target code, direction routing."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pruning import load_model
from pruning.cli import main
from pruning.data.batching import length_batches
from pruning.export import export_checkpoint, parse_directions
from pruning.manifest import ManifestError
from pruning.translate import DecodingOptions, TranslateError, translate_sentences
from tests import export_fixtures as ef
from tests import fixtures

FRA, DEU, ENG = ef.LANGS


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from pruning.checkpoint.reader import open_checkpoint

    root = tmp_path_factory.mktemp("translate")
    source = ef.talkative_hf_dir(root / "full", tiny_tokenizer_dir)
    index = ef.write_lang_index(root / "experts.json", open_checkpoint(source).topology)
    return export_checkpoint(
        source, experts=index, out=root / "fra-deu-eng", directions=parse_directions(pairs=[f"{FRA}-{DEU}", f"{DEU}-{ENG}"]), dtype=None, progress=False
    )


# ---- batching --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lengths, batch_tokens, expected",
    [
        ([], 10, []),
        ([5], 1, [[0]]),  # longer than the budget: a batch of its own
        ([3, 9, 3, 4], 100, [[1, 3, 0, 2]]),  # longest first, ties in input order
        ([3, 9, 3, 4], 9, [[1], [3, 0], [2]]),  # 2 x 4 = 8 <= 9 tokens, 3 x 4 = 12 > 9
        ([2, 2, 2, 2, 2], 4, [[0, 1], [2, 3], [4]]),
        ([10, 1, 1, 1], 10, [[0], [1, 2, 3]]),
    ],
)
def test_make_batches(lengths, batch_tokens, expected):
    batches = length_batches(lengths, batch_tokens=batch_tokens)
    assert batches == expected
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= batch_tokens


class EchoModel(nn.Module):
    """``generate`` returns [decoder start, forced code, the source's tokens]: the 'translation' is the source."""

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.calls: list[dict] = []

    def generate(self, *, input_ids, attention_mask, forced_bos_token_id, num_beams, max_new_tokens, do_sample):
        self.calls.append({"shape": tuple(input_ids.shape), "forced": forced_bos_token_id, "beam": num_beams, "max": max_new_tokens})
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            real = ids[mask.bool()].tolist()
            assert real[0] == self.tokenizer.convert_tokens_to_ids(self.tokenizer.src_lang) and real[-1] == self.tokenizer.eos_token_id
            rows.append([self.tokenizer.eos_token_id, forced_bos_token_id, *real[1:-1][:max_new_tokens], self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_batches_sorted_by_length_and_outputs_in_input_order(tiny_tokenizer):
    model = EchoModel(tiny_tokenizer)
    sentences = fixtures.sentences(12, seed=3)
    sentences[4] = ""
    sentences[7] = "   "
    out = translate_sentences(model, sentences, src=FRA, tgt=DEU, options=DecodingOptions(beam=3, max_length=50, batch_tokens=40))
    assert out[4] == "" and out[7] == ""
    assert [o for i, o in enumerate(out) if i not in (4, 7)] == [s for i, s in enumerate(sentences) if i not in (4, 7)]
    shapes = [c["shape"] for c in model.calls]
    assert sum(rows for rows, _ in shapes) == 10, "blank lines are not sent to the model"
    assert len(shapes) > 2 and all(rows == 1 or rows * width <= 40 for rows, width in shapes)
    assert [w for _, w in shapes] == sorted((w for _, w in shapes), reverse=True), "longest batches first"
    assert {c["forced"] for c in model.calls} == {tiny_tokenizer.convert_tokens_to_ids(DEU)}
    assert {(c["beam"], c["max"]) for c in model.calls} == {(3, 50)}


def test_unknown_language_code_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(TranslateError, match=r"--tgt 'deu_Latm' is not a language code of this model's tokenizer \(did you mean deu_Latn\?\)"):
        translate_sentences(EchoModel(tiny_tokenizer), ["Hello."], src=FRA, tgt="deu_Latm")


@pytest.mark.parametrize("flag, value", [("beam", 0), ("max_length", 0), ("batch_tokens", -1)])
def test_bad_decoding_options(tiny_tokenizer, flag, value):
    with pytest.raises(TranslateError, match=f"--{flag.replace('_', '-')} must be a positive integer"):
        translate_sentences(EchoModel(tiny_tokenizer), ["Hello."], src=FRA, tgt=DEU, options=DecodingOptions(**{flag: value}))


# ---- the real (tiny) model --------------------------------------------------------------------------
def reference_translation(model, sentence, *, src, tgt, beam, max_new_tokens):
    """Plain transformers generate on one sentence, routing restricted by hand from the manifest."""
    from pruning.manifest import direction_experts

    wanted = direction_experts(model.manifest, src, tgt)
    for side, layer, moe in model.moe_layers():
        moe.router.active = torch.tensor([e in wanted[(side, layer)] for e in moe.expert_ids])
    tok = model.tokenizer
    tok.src_lang = src
    batch = tok(sentence, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, forced_bos_token_id=tok.convert_tokens_to_ids(tgt), num_beams=beam, max_new_tokens=max_new_tokens, do_sample=False)
    assert out[0, 1] == tok.convert_tokens_to_ids(tgt)
    return tok.decode(out[0], skip_special_tokens=True)


def test_translate_cli_files_match_plain_generate(tmp_path, export_dir, capsys):
    sentences = fixtures.sentences(5, seed=21)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    target = tmp_path / "out" / "hyp.txt"
    args = [
        "translate",
        "--model",
        str(export_dir),
        "--src",
        DEU,
        "--tgt",
        ENG,
        "--input",
        str(source),
        "--output",
        str(target),
        "--beam",
        "2",
        "--max-length",
        "5",
        "--batch-tokens",
        "1",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert "wrote 5 line(s)" in capsys.readouterr().err
    got = target.read_text(encoding="utf-8").split("\n")
    assert got[-1] == "" and len(got) == 6
    model = load_model(export_dir)
    expected = [reference_translation(model, s, src=DEU, tgt=ENG, beam=2, max_new_tokens=5) for s in sentences]
    assert got[:-1] == expected
    assert all(expected) and len(set(expected)) > 1, "the model produces text, not only language codes"


def test_translate_stdin_to_stdout(export_dir, monkeypatch, capsys):
    sentences = fixtures.sentences(3, seed=22)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(sentences) + "\n"))
    assert main(["translate", "--model", str(export_dir), "--src", FRA, "--tgt", DEU, "--beam", "1", "--max-length", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.split("\n")) == 4


def test_direction_not_in_the_export(export_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello.\n"))
    assert main(["translate", "--model", str(export_dir), "--src", ENG, "--tgt", FRA, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "direction 'eng_Latn-fra_Latn' is not served by this export; it serves: deu_Latn-eng_Latn, fra_Latn-deu_Latn" in err


def test_set_direction_and_clear(export_dir):
    model = load_model(export_dir)
    model.set_direction(FRA, DEU)
    masks = {(side, layer): moe.router.active for side, layer, moe in model.moe_layers()}
    assert any(m is not None and not bool(m.all()) for m in masks.values())
    model.set_direction(None)
    assert all(moe.router.active is None for _, _, moe in model.moe_layers())
    with pytest.raises(ManifestError, match="needs both"):
        model.set_direction(FRA)


def test_missing_input_file(tmp_path, export_dir, capsys):
    assert main(["translate", "--model", str(export_dir), "--src", FRA, "--tgt", DEU, "--input", str(tmp_path / "nope.txt")]) == 2
    assert "--input: file" in capsys.readouterr().err


def test_generation_never_emits_embedding_rows_past_the_tokenizer(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    """NLLB-200 has 2 embedding rows more than tokenizer ids (padding rows); here 30, made the likeliest tokens."""
    extra = 30
    model_dir = fixtures.write_hf(
        fixtures.make_model(len(tiny_tokenizer) + extra, encoder_layers=4, decoder_layers=4), tmp_path / "wide", tokenizer_dir=tiny_tokenizer_dir
    )
    model = load_model(model_dir)
    assert model.config.vocab_size == len(model.tokenizer) + extra

    def favour_padding_rows(module, inputs, logits):
        logits[..., len(model.tokenizer) :] += 1e4
        return logits

    model.lm_head.register_forward_hook(favour_padding_rows)
    with torch.no_grad():
        plain = model.generate(**model.tokenizer(["A small dog."], return_tensors="pt"), max_new_tokens=3, num_beams=2)
    assert int(plain[0, -1]) >= len(model.tokenizer), "the hook makes padding rows win without the limit"
    out = translate_sentences(model, ["A small dog.", "The red house."], src=FRA, tgt=DEU, options=DecodingOptions(beam=2, max_length=5))
    assert len(out) == 2 and all(isinstance(text, str) for text in out)
