"""The encoder layer: every fast encoder gives the Hugging Face tokenizer's ids (on the demo slice and, where
present, the whole shared corpus) for the tokenizer kinds it claims; the build's bytes do not depend on the
encoder; a mismatch found mid-build falls back under --encoder auto and stops under --encoder fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEMO, SOURCES, TOKENIZER, build_bytes, demo_records, without_modules, write_jsonl

from sptok.build.encoders import (FAST, LLAMA3_PATTERN, SPOT_CHARS, EncoderMismatch, HFEncoder, _text_spec, choose_encoder,
                            cut_points, cuts_before_space, fast_encoder, in_pieces, make_encoder, version)
from sptok.errors import SptokError

LITERALS = ["<|endoftext|> [MASK] <PYDOCS> <SPSEP> <s> </s> <unk>", "<0x41> ▁x", "tab\there  two  spaces\n\n\r\n",
            "emoji 🫨 and 中文 and ﬁ", ""]
CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def corpus_texts(shared_every: int = 4) -> list[str]:
    """The demo slice, odd strings, and every 4th document of the shared corpus where it is present."""
    texts = [r["text"] for n in SOURCES for r in demo_records(n)] + LITERALS
    shared = DEMO.parents[2] / "shared" / "corpus"
    if shared.is_dir():
        import zstandard

        for f in sorted(shared.glob("*.jsonl.zst")):
            raw = zstandard.ZstdDecompressor().stream_reader(open(f, "rb")).read()
            texts += [json.loads(x)["text"] for x in raw.splitlines()[::shared_every]]
    return texts


def byte_level_bpe():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))


def split_byte_level_bpe():
    """GPT-4 / Llama-3 style: a split regex, then byte-level without its own regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CL100K), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_training_text(), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def sentencepiece_bpe():
    """Llama-2 style: SentencePiece BPE with byte fallback (the 256 <0xNN> pieces in the vocabulary), spaces
    as ▁ by the normalizer, no pre-tokenizer; trained here, no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")   # training only
    tok.train_from_iterator(_training_text(), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"] + BYTES, limit_alphabet=300, show_progress=False))
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in BYTES]   # vocabulary pieces
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return Tokenizer.from_str(json.dumps(spec))


def _training_text() -> list[str]:
    return [r["text"] for n in SOURCES for r in demo_records(n)[::3]]


KINDS = {"byte-level BPE": byte_level_bpe, "split + byte-level BPE": split_byte_level_bpe,
         "SentencePiece BPE, byte fallback": sentencepiece_bpe}
RUNS = {"byte-level BPE": FAST, "split + byte-level BPE": FAST, "SentencePiece BPE, byte fallback": ("gigatoken",)}


@pytest.fixture(scope="module")
def texts():
    return corpus_texts()


@pytest.mark.parametrize("kind", list(KINDS))
def test_fast_encoders_give_the_reference_ids(kind, texts):
    """Each encoder that claims a tokenizer kind gives exactly the Hugging Face ids on every document."""
    from tokenizers import Tokenizer

    tok = KINDS[kind]()   # trained once: training is not deterministic
    want_flat, want_lens = HFEncoder(Tokenizer.from_str(tok.to_str())).encode(texts)
    for name in RUNS[kind]:
        pytest.importorskip(name)
        flat, lens = fast_encoder(tok, name)(texts)
        assert (lens == want_lens).all() and (flat == want_flat).all(), name
    assert choose_encoder(tok, "fast", texts[:200])[0] == RUNS[kind][0]


def test_gigatoken_encodes_document_by_document_then_in_batches(monkeypatch, texts):
    """gigatoken's `encode` (a numpy array per document) up to GIGATOKEN_BATCH_AFTER documents, then its
    `encode_batch` (an awkward Array): the reference's ids on both sides of the switch, whole or in pieces."""
    pytest.importorskip("gigatoken")
    from tokenizers import Tokenizer

    import sptok.build.encoders as encoders

    monkeypatch.setattr(encoders, "GIGATOKEN_BATCH_AFTER", 1000)
    docs = texts[:2900] + [ODD * 40]
    want_flat, want_lens = HFEncoder(byte_level_bpe()).encode(docs)
    enc = fast_encoder(Tokenizer.from_str(byte_level_bpe().to_str()), "gigatoken")
    got = [enc(docs[i:i + 700]) for i in range(0, len(docs), 700)]   # 2 batches one by one, 3 whole, 1 across
    assert (np.concatenate([n for _, n in got]) == want_lens).all()
    assert (np.concatenate([f for f, _ in got]) == want_flat).all()


def test_sentencepiece_bpe_builds_on_the_fast_path_with_identical_bytes(tmp_path, small_corpus, manifest, build):
    pytest.importorskip("gigatoken")
    sentencepiece_bpe().save(str(tmp_path / "sp.json"))
    m = manifest([{"name": n, "paths": f"{n}.jsonl", "id_field": "id"} for n in SOURCES])
    flags = dict(tokenizer=str(tmp_path / "sp.json"), eos="</s>", seq_len=128, msp_prob=0.3)
    fast, info = build(m, out=tmp_path / "fast", encoder="fast", **flags)
    assert list(info["encoder"]) == [f"gigatoken {version('gigatoken')}"]
    hf, info = build(m, out=tmp_path / "hf", encoder="hf", **flags)
    assert list(info["encoder"]) == [f"hf {version('tokenizers')}"]
    assert build_bytes(fast) == build_bytes(hf)


def test_a_build_checks_and_runs_one_encoder(tmp_path, small_corpus, manifest, build, monkeypatch):
    """The process that checks the fast encoder on the sample builds its units with that very encoder: a build
    in one process makes one gigatoken instance, not one to check and one to build, and reads the tokenizer's
    JSON for the encoders once (the reference's reading serves the fast encoder)."""
    import sptok.build.encoders as encoders

    gigatoken = pytest.importorskip("gigatoken")
    made, specs = [], []
    real = gigatoken.Tokenizer.from_json.__func__
    monkeypatch.setattr(gigatoken.Tokenizer, "from_json", classmethod(lambda cls, d: made.append(1) or real(cls, d)))
    monkeypatch.setattr(encoders, "_text_spec", lambda tok, real=encoders._text_spec: specs.append(1) or real(tok))
    m = manifest([{"name": n, "paths": f"{n}.jsonl", "id_field": "id"} for n in SOURCES])
    _, info = build(m, seq_len=128)
    assert list(info["encoder"]) == [f"gigatoken {version('gigatoken')}"] and len(made) == 1 and len(specs) == 1


def test_build_bytes_do_not_depend_on_the_encoder(tmp_path, small_corpus, manifest, build):
    m = manifest([{"name": n, "paths": f"{n}.jsonl", "id_field": "id"} for n in SOURCES])
    outs = {}
    for name in FAST + ("hf",):
        if name != "hf":
            pytest.importorskip(name)
        out, info = build(m, out=tmp_path / name, encoder=name, seq_len=128, unit_size="8KB")
        assert set(info["encoder"]) == {f"{name} {version(name)}"} and sum(info["encoder"].values()) == info["units"]
        outs[name] = build_bytes(out)
    assert all(b == outs["hf"] for b in outs.values())


def test_wordpiece_and_unigram_run_on_the_reference():
    from sptok.build.tokenizer import train

    for model in ("wordpiece", "unigram"):
        tok = train([r["text"] for r in demo_records("fortunes", 300)], model, 600, [])
        name, why, _ = choose_encoder(tok, "auto", ["hello world"])
        kind = {"wordpiece": "WordPiece", "unigram": "Unigram"}[model]
        assert name == "hf" and f"gigatoken: its model is {kind}, not BPE" in why
        with pytest.raises(SptokError, match="--encoder fast: no fast encoder runs this tokenizer exactly"):
            choose_encoder(tok, "fast", ["x"])


def test_a_normalizer_tiktoken_cannot_apply_is_refused_by_name():
    from tokenizers import normalizers

    tok = byte_level_bpe()
    tok.normalizer = normalizers.Lowercase()
    name, why, _ = choose_encoder(tok, "auto", ["Hello World"])
    assert name == "hf" and "tiktoken: it has a normalizer (Lowercase)" in why
    assert "gigatoken: gigatoken refused it (Unsupported normalizer type: Lowercase)" in why or \
        "gigatoken is not installed" in why


def test_spot_checks_find_a_mismatch_past_the_sample(tmp_path):
    """tiktoken looks a whole pretoken up in its ranks first; the Hugging Face BPE only merges. A vocabulary entry
    that no merge reaches makes them differ, on text the start sample need not contain."""
    tok = unreachable_token_bpe(tmp_path)
    assert choose_encoder(tok, "tiktoken", ["no such word here"])[0] == "tiktoken"
    enc = make_encoder(tok, "tiktoken")
    enc.encode(["fine text"] * 4)
    with pytest.raises(SptokError, match="the tiktoken encoder gave other ids than the Hugging Face tokenizer"):
        for _ in range(4):   # one document per batch, rotating
            enc.encode(["a zzzq b"] * 4)


def test_spot_checks_check_a_prefix_of_a_long_document(tmp_path):
    """A document longer than the credit is checked on its first SPOT_CHARS characters (it was never checked)."""
    tok = unreachable_token_bpe(tmp_path)
    enc = make_encoder(tok, "tiktoken")
    calls = []
    enc.ref.ids = lambda text, ids=enc.ref.ids: calls.append(len(text)) or ids(text)
    with pytest.raises(EncoderMismatch, match="the tiktoken encoder gave other ids"):
        enc.encode(["a zzzq b " + "fine text " * 30_000])   # 300 KB: more than the credit at start
    assert calls == [SPOT_CHARS]


# cut points of documents: after every kind of character (letters, digits, punctuation, contractions, each
# Unicode space, CJK, emoji) and before spaces, runs of spaces, newlines and lone surrogates' neighbours
ODD = ("x  y\t z.\n\n w 'll  'sX 12 345 6789 ,. ;  \u3000 a\u00a0 b\x1c c\u2028 d\u0085 e\u180e f 中文 字 🫨 ,,, \r\n"
       " g\u2009 h\u202f i \n j\r k\x0b l\x0c m ")


@pytest.mark.parametrize("kind", ["byte-level BPE", "split + byte-level BPE"])
def test_long_documents_encoded_in_pieces_get_the_ids_of_the_whole_text(kind, texts):
    """The reference's ids of a text cut where ``cut_points`` cuts are those of the whole text, at every cut:
    pieces of 1 character cut before every space that may be cut."""
    from tokenizers import Tokenizer

    tok = KINDS[kind]()
    assert cuts_before_space(_text_spec(tok))
    ref = HFEncoder(Tokenizer.from_str(tok.to_str()))
    docs = [ODD * 40, "".join(texts[:300]) + ODD, "short", "no_space_at_all" * 99]
    want_flat, want_lens = ref._encode_whole(docs)
    for size in (1, 1000):
        flat, lens = in_pieces(ref._encode_whole, True, size)(docs)
        assert (lens == want_lens).all() and (flat == want_flat).all(), size
    assert len(cut_points(docs[0], 1)) == 17 * 40   # every space after a non-space in ODD
    for name in FAST:
        pytest.importorskip(name)
        flat, lens = in_pieces(fast_encoder(tok, name), True, 1000)(docs)
        assert (lens == want_lens).all() and (flat == want_flat).all(), name


def test_documents_are_cut_only_for_the_split_regexes_known_to_allow_it():
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    assert cuts_before_space(_text_spec(byte_level_bpe()))
    assert LLAMA3_PATTERN == CL100K
    assert not cuts_before_space(_text_spec(sentencepiece_bpe()))   # ▁ prepended to the first piece only
    tok = byte_level_bpe()
    tok.normalizer = normalizers.NFC()
    assert not cuts_before_space(_text_spec(tok))
    spec = json.loads(byte_level_bpe().to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\S+\s*"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert not cuts_before_space(_text_spec(Tokenizer.from_str(json.dumps(spec))))
    # the cut's premise, character by character: a space after any character that is not str.isspace() starts
    # a pretoken (checked for every code point once; a stride keeps the test fast)
    for pre, first in ((pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), "Ġa"),
                       (pre_tokenizers.Split(Regex(CL100K), "isolated"), " a")):
        for c in [*range(0x3100), *range(0x3100, 0x110000, 97)]:
            if not 0xD800 <= c < 0xE000 and not chr(c).isspace():
                assert pre.pre_tokenize_str(chr(c) + " a")[-1][0] == first, hex(c)
    assert cut_points("ab  cd ef", 1) == [2, 6] and cut_points("ab  cd ef", 3) == [6] and cut_points("a b", 5) == []


def unreachable_token_bpe(tmp_path):
    """The demo byte-level BPE plus the vocabulary entry ' zzzq', which no merge produces."""
    from tokenizers import Tokenizer

    spec = json.loads(byte_level_bpe().to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < 8192]   # sptok adds its SPs again
    spec["model"]["vocab"]["Ġzzzq"] = 8192
    (tmp_path / "zzzq.json").write_text(json.dumps(spec))
    return Tokenizer.from_file(str(tmp_path / "zzzq.json"))


def _mismatch_corpus(tmp_path):
    """fortunes, where every record past the first 64 KB (the start sample reads 32 KB) holds ' zzzq'."""
    recs = demo_records("fortunes")
    size = 0
    for r in recs:
        size += len(json.dumps(r))
        if size > 64 << 10:
            r["text"] += " zzzq"
    write_jsonl(tmp_path / "fortunes.jsonl", recs)
    m = tmp_path / "m.yaml"
    m.write_text("sources:\n  - {name: fortunes, paths: fortunes.jsonl, id_field: id}\n")
    return m


@pytest.mark.slow
def test_a_mismatch_mid_build_falls_back_to_hf_or_stops(tmp_path):
    """gigatoken gets ' zzzq' right; without it, riptoken or tiktoken runs and a spot check finds the mismatch.
    auto: every unit they built is built again by the Hugging Face tokenizer, giving its bytes exactly."""
    m = _mismatch_corpus(tmp_path)
    tok = unreachable_token_bpe(tmp_path)
    tok.save(str(tmp_path / "tok.json"))
    env = without_modules(tmp_path, "gigatoken")
    cmd = [sys.executable, "-m", "sptok", "build", str(m), "--tokenizer", str(tmp_path / "tok.json"), "--seq-len",
           "128", "--unit-size", "24KB", "--workers", "2"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "auto")], capture_output=True, text=True,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    assert any(f"encoder: hf (the {name} encoder gave other ids than the Hugging Face tokenizer on a document" in r.stderr
               for name in ("riptoken", "tiktoken")), r.stderr
    info = json.loads((tmp_path / "auto" / "sptok.json").read_text())
    assert info["encoder"] == {f"hf {version('tokenizers')}": info["units"]}
    subprocess.run(cmd + ["--out", str(tmp_path / "hf"), "--encoder", "hf"], check=True, capture_output=True)
    assert build_bytes(tmp_path / "auto") == build_bytes(tmp_path / "hf")
    r = subprocess.run(cmd + ["--out", str(tmp_path / "fast"), "--encoder", "fast"], capture_output=True, text=True,
                       env={**os.environ, **env})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "encoder gave other ids than the Hugging Face tokenizer" in r.stderr and "--encoder hf" in r.stderr


def test_build_imports_nothing_heavy(tmp_path, small_corpus, manifest):
    """The build path (main process and a worker's unit) never imports torch, transformers, datasets, streaming;
    nor, in a build of fewer documents than GIGATOKEN_BATCH_AFTER, awkward (~0.15 s: gigatoken's encode_batch)."""
    m = manifest([{"name": n, "paths": f"{n}.jsonl", "id_field": "id"} for n in SOURCES])
    code = ("import sys; from sptok.build import run_build\n"
            f"run_build({str(m)!r}, {str(tmp_path / 'o')!r}, dict(tokenizer={str(TOKENIZER)!r}, workers=1, "
            "quiet=True))\n"
            "print('HEAVY', [m for m in ('torch', 'streaming', 'datasets', 'transformers', 'awkward') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_a_worker_warms_up_with_the_first_fast_encoder_installed_only():
    """A worker imports, while the main process plans, the encoder the check tries first, not every candidate."""
    import importlib.util

    first = next((n for n in FAST if importlib.util.find_spec(n)), None)
    code = ("import sys; from sptok.build.runner import warm_up; warm_up(); "
            f"print('LOADED', [n for n in {FAST!r} if n in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"LOADED {[first] if first else []}" in out


def test_the_command_line_offers_every_encoder():
    from sptok.cli import build
    from sptok.build.options import ENCODERS as CHOICES

    option = next(p for p in build.params if p.name == "encoder")
    assert tuple(option.type.choices) == CHOICES


def test_truncation_and_padding_of_the_tokenizer_do_not_apply_to_documents():
    tok = byte_level_bpe()
    tok.enable_truncation(8)
    tok.enable_padding(length=64)
    texts = [demo_records("pydocs", 1)[0]["text"], "short"]
    name, why, _ = choose_encoder(tok, "fast", texts)
    assert name in FAST, why
    flat, lens = make_encoder(tok, name).encode(texts)
    assert lens[0] > 64 and lens.sum() == len(flat)
