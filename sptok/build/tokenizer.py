"""Load, train and extend tokenizers; encode text with SP strings kept ordinary.

Only Hugging Face ``tokenizers`` is used here (no ``transformers`` import: it costs seconds). SP tokens
and a special delimiter are added as *special* tokens, and text is encoded with
``encode_special_tokens = True``, so a literal ``<WIKI>`` inside a document is tokenized as ordinary text
and never becomes an SP id: SPs are only ever inserted by sptok.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import SptokError, shown
from ..layout import TOKENIZER_JSON
from .options import DEFAULT_DELIMITER, MAX_TOKEN_CHARS

PAD, UNK, CLS, SEP, MASK, EOS = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"
DEFAULT_SPECIALS = [PAD, UNK, CLS, SEP, MASK, EOS]
MAX_VOCAB = 1 << 24   # `tokenizer train --vocab-size`: 16,777,216, far above any real vocabulary
EOS_CANDIDATES = (EOS, "</s>", "<eos>", "[SEP]", "<|end_of_text|>")
MODELS = ("bpe", "wordpiece", "unigram")
_ROLE_KEYS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token", "eos_token", "bos_token")


def is_special_delimiter(delimiter: str) -> bool:
    """`<SPSEP>` or `[SEP]`-shaped delimiters are special tokens; anything else is plain text."""
    return bool(re.fullmatch(r"<[^<>\s]+>|\[[^\[\]\s]+\]", delimiter))


@dataclass
class LoadedTokenizer:
    tok: "object"            # tokenizers.Tokenizer
    path: str                # the tokenizer.json read
    roles: dict              # e.g. {"eos_token": "</s>", ...} from tokenizer_config.json / special_tokens_map.json


def tokenizer_file(path: str | os.PathLike) -> str:
    """The `tokenizer.json` that ``--tokenizer path`` names (the file, or the one in a directory), not yet read."""
    path = str(path)
    if os.path.isdir(path):
        file = os.path.join(path, TOKENIZER_JSON)
        if not os.path.exists(file):
            raise SptokError(f"--tokenizer {path}: the directory has no tokenizer.json; sptok needs a fast "
                             f"tokenizer (save one with transformers: AutoTokenizer.from_pretrained(dir)"
                             f".save_pretrained(dir), or train one with `sptok tokenizer train`)")
        return file
    if not os.path.exists(path):
        raise SptokError(f"--tokenizer {path}: no such file or directory (sptok never downloads tokenizers; "
                         f"give a local tokenizer.json or train one with `sptok tokenizer train`)")
    return path


def load_tokenizer(path: str | os.PathLike) -> LoadedTokenizer:
    """A local `tokenizer.json`, or a Hugging Face tokenizer directory holding one. Never a hub name."""
    from tokenizers import Tokenizer

    path = str(path)
    roles: dict = {}
    file = tokenizer_file(path)
    if os.path.isdir(path):
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = os.path.join(path, name)
            if os.path.exists(p):
                try:
                    cfg = json.loads(Path(p).read_text())
                except ValueError as e:
                    raise SptokError(f"{p}: invalid JSON ({e})") from None
                if not isinstance(cfg, dict):
                    raise SptokError(f"{p}: expected a JSON object of token roles (eos_token, pad_token, ...), got "
                                     f"{type(cfg).__name__}")
                for k in _ROLE_KEYS:
                    v = cfg.get(k)
                    if isinstance(v, dict):
                        v = v.get("content")
                    if isinstance(v, str):
                        roles.setdefault(k, v)
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise SptokError(f"--tokenizer {file}: not a Hugging Face tokenizer.json ({e})") from None
    return LoadedTokenizer(tok=tok, path=file, roles=roles)


def find_eos(lt: LoadedTokenizer, explicit: str | None = None) -> str:
    """The token that ends each document: --eos, the tokenizer's eos_token, or a well-known one."""
    tok = lt.tok
    for cand in ([explicit] if explicit else []) + [lt.roles.get("eos_token")] + list(EOS_CANDIDATES):
        if cand and tok.token_to_id(cand) is not None:
            return cand
        if explicit and cand == explicit:
            raise SptokError(f"--eos {explicit!r}: not a token of the tokenizer")
    raise SptokError("the tokenizer has no end-of-document token (tried eos_token, "
                     f"{', '.join(EOS_CANDIDATES)}); pass --eos TOKEN")


def find_pad(lt: LoadedTokenizer) -> str | None:
    tok = lt.tok
    for cand in (lt.roles.get("pad_token"), PAD, "<pad>", "<|padding|>"):
        if cand and tok.token_to_id(cand) is not None:
            return cand
    return None


def reserved_tokens(lt: LoadedTokenizer) -> set[str]:
    """Special tokens with a role (pad, eos, mask, ...): an SP may never be one of them."""
    named = {v for v in lt.roles.values() if v}
    return named | {t for t in DEFAULT_SPECIALS + list(EOS_CANDIDATES) if lt.tok.token_to_id(t) is not None}


def extend(lt: LoadedTokenizer, sps: list[str], delimiter: str | None) -> dict[str, int]:
    """Add SP strings (and a special delimiter) as special tokens; return their ids.

    Refuses an SP that the tokenizer already produces from ordinary text (a vocabulary entry or a
    non-special added token): it could then arise from a document's text, and SPs must only ever be
    inserted by sptok.
    """
    from tokenizers import AddedToken

    tok = lt.tok
    base_vocab = tok.get_vocab(with_added_tokens=False)
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    reserved = reserved_tokens(lt)
    wanted = list(sps) + ([delimiter] if delimiter else [])
    for s in wanted:
        what = "delimiter" if s == delimiter and s not in sps else "SP"
        if len(s) > MAX_TOKEN_CHARS:
            raise SptokError(f"{what} {shown(s)} is {len(s):,} characters long; an SP or delimiter is one token of at "
                             f"most {MAX_TOKEN_CHARS} characters")
        problem = None
        if s in reserved:
            problem = "is the tokenizer's own special token"
        elif s in added and not added[s].special:
            problem = "is a non-special added token of the tokenizer"
        elif s in base_vocab and s not in added:
            problem = f"is an ordinary token of the tokenizer (id {base_vocab[s]}), so it could arise from text"
        if problem and s == delimiter and s not in sps:
            raise SptokError(f"delimiter clash: --delimiter {s} {problem}; choose another delimiter (the default "
                             f"<SPSEP>, another <...> token, or plain text such as ': ')")
        if problem:
            advice = " (--policy alphabet, or a custom `sp:`)" if s in reserved else ""
            raise SptokError(f"SP token clash: SP {s} {problem}; choose another name{advice}")
    new = [AddedToken(s, special=True, normalized=False) for s in wanted if s not in added]
    if new:
        tok.add_special_tokens(new)
    ids = {s: tok.token_to_id(s) for s in wanted}
    with literal_specials(tok) as enc:
        for s in wanted:   # the property that matters: the literal string, as text, never yields the SP id
            if ids[s] in enc.encode(f"{s} x{s}", add_special_tokens=False).ids:
                raise SptokError(f"SP token clash: the tokenizer turns the text {s!r} into the SP's own id "
                                 f"{ids[s]}; choose another name")
    return ids


def encoding_problem(tok, texts: list[str], unk: str | None) -> str | None:
    """Why ``tok`` cannot be what a source is built with, judged on a sample of its ``texts``: most of their
    characters (whitespace aside) become the unknown token or no token at all, or one and the same token (a
    vocabulary such as {"a": 0} turns a corpus into runs of one id). None when it encodes them."""
    from collections import Counter

    import numpy as np

    unk_id = tok.token_to_id(unk) if unk else None
    with literal_specials(tok) as enc:
        encs = enc.encode_batch(texts, add_special_tokens=False)
    text = "".join(texts)   # the texts back to back, their tokens' offsets shifted to match: one pass for all
    shift = np.repeat(np.cumsum([0] + [len(t) for t in texts])[:-1], [len(e.ids) for e in encs])
    offsets = np.array([o for e in encs for o in e.offsets], np.int64).reshape(-1, 2) + shift[:, None]
    owner = char_owners(len(text), np.array([i for e in encs for i in e.ids], np.int64), offsets)
    chars, at = np.unique(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32), return_inverse=True)
    visible = ~np.fromiter((chr(c).isspace() for c in chars.tolist()), bool, len(chars))[at]   # once per character
    owners = Counter(dict(zip(*(x.tolist() for x in np.unique(owner[visible], return_counts=True)))))
    total = sum(owners.values())
    if total < 64:
        return None
    lost = owners.pop(-1, 0) + (owners.pop(unk_id, 0) if unk_id is not None else 0)
    if lost > total / 2:
        return f"{100 * lost / total:.0f}% of the characters of its first documents " + \
            (f"become {unk} or no token" if unk else "become no token (dropped)")
    top, n = max(owners.items(), key=lambda kv: kv[1], default=(None, 0))
    if n > total / 2:
        return f"{100 * n / total:.0f}% of the characters of its first documents become one token, id {top} " \
               f"({tok.id_to_token(top)!r})"
    return None


def char_owners(n: int, ids, offsets):
    """The token id covering each of ``n`` characters (int64), -1 where none does; where tokens share a character
    (the bytes of one character in byte-level BPE), the last. ``offsets``: (start, end) characters per token."""
    import numpy as np

    widths = offsets[:, 1] - offsets[:, 0]
    at = np.repeat(offsets[:, 0] - np.cumsum(widths) + widths, widths) + np.arange(int(widths.sum()))
    last = np.full(n, -1, np.int64)   # index of the last token on each character
    np.maximum.at(last, at, np.repeat(np.arange(len(ids)), widths))
    return np.append(ids, -1)[last]   # index -1: none


def sp_tokens(manifest, opts) -> tuple[list[str], str | None]:
    """The SP strings of the manifest's sources, and the delimiter when it is a special token (else None): the
    tokens sptok adds to a tokenizer for builds of ``manifest`` with ``opts`` (a ``BuildOptions``)."""
    from ..sp import sp_strings

    sps = sp_strings([s.name for s in manifest.sources], opts.policy, opts.seed, [s.sp for s in manifest.sources])
    if opts.delimiter in sps:
        raise SptokError(f"delimiter clash: --delimiter {opts.delimiter} is also the SP of a source; choose another "
                         f"delimiter")
    return sps, (opts.delimiter if opts.delimiter and is_special_delimiter(opts.delimiter) else None)


def manifest_sp_tokens(manifest_path: str, policy: str | None, delimiter: str | None, seed: int | None):
    """(manifest, SP strings, special delimiter or None) as a build of the manifest would have them: flags
    given (not None) over the manifest's ``build:`` values over the defaults, as ``sptok build`` resolves them."""
    from .manifest import load_manifest
    from .options import BuildOptions

    m = load_manifest(manifest_path)
    opts = BuildOptions.resolve(m.build, {"policy": policy, "delimiter": delimiter, "seed": seed})
    return (m, *sp_tokens(m, opts))


def train_for_manifest(manifest_path: str, out: str, model: str, vocab_size: int, max_bytes,
                       policy: str | None = None, delimiter: str | None = None, seed: int | None = None,
                       log=None):
    """`sptok tokenizer train`: train on at most ``max_bytes`` of the manifest's text (shared out between its
    sources), add its SPs and special delimiter, write the tokenizer to ``out``. Returns (tokenizer, SPs,
    delimiter or None). The records skipped while reading are told through ``log`` (default: stderr)."""
    from .options import parse_size

    m, sps, delim = manifest_sp_tokens(manifest_path, policy, delimiter, seed)
    budget = parse_size(max_bytes, "--max-bytes")
    if vocab_size < 64:
        raise SptokError(f"--vocab-size: {vocab_size} is too small (at least 64)")
    if vocab_size > MAX_VOCAB:   # the trainers reserve memory for the vocabulary asked for: far above, they abort
        raise SptokError(f"--vocab-size: {vocab_size:,} is too large (at most {MAX_VOCAB:,})")
    added = sps + ([delim] if delim else [])
    tok = train(training_texts(m, budget, log or (lambda msg: print(msg, file=sys.stderr))), model, vocab_size,
                added)
    save_tokenizer_dir(tok, out, default_roles(tok), added)
    return tok, sps, delim


def training_texts(manifest, budget: int, log) -> Iterator[str]:
    """The first texts of every source, about ``budget / sources`` characters of each, source after source:
    every source is represented even under a small budget (what `sptok tokenizer train` learns from). A source
    that gives no text stops the training, as it stops a build; the records skipped are told through ``log``."""
    from .manifest import plan_units
    from .readers import Rejects, iter_texts

    units = plan_units(manifest, 64 << 20)
    per_source = budget // max(1, len(manifest.sources))
    for src in manifest.sources:
        used, rejects = 0, Rejects(source=src.name)
        for u in (u for u in units if u.source == src.name):
            for t in iter_texts(u, src.text_field, rejects):
                yield t
                used += len(t)
                if used >= per_source:
                    break
            if used >= per_source:
                break
        why = ", ".join(f"{k} {v}" for k, v in sorted(rejects.counts.items()))
        first = f"; first: {next(iter(rejects.examples.values()))}" if rejects.examples else ""
        if not used:
            raise SptokError(f"source {src.name!r} gave no text to train on: "
                             + (f"every record read was skipped ({why}{first})" if why else
                                "its files hold no records")
                             + "; fix its records or its text_field, or remove the source from the manifest")
        if why:
            log(f"note: source {src.name!r}: skipped records, not trained on: {why}{first}")


def extend_for(tokenizer_path: str, out: str, extra: list[str], manifest_path: str | None = None,
               policy: str | None = None, delimiter: str | None = None, seed: int | None = None) -> dict[str, int]:
    """`sptok tokenizer extend`: add the SPs of a manifest (and ``extra`` ones) and a special delimiter to a
    tokenizer, written to ``out``; returns the added tokens' ids."""
    sps, delim = list(extra), None
    if manifest_path:
        _, msps, delim = manifest_sp_tokens(manifest_path, policy, delimiter, seed)
        sps = msps + [s for s in sps if s not in msps]
    elif delimiter is None or is_special_delimiter(delimiter or ""):
        delim = delimiter if delimiter is not None else DEFAULT_DELIMITER
    if not sps:
        raise SptokError("nothing to add: give --manifest or --sp")
    lt = load_tokenizer(tokenizer_path)
    ids = extend(lt, sps, delim)
    save_tokenizer_dir(lt.tok, out, {**default_roles(lt.tok), **lt.roles}, sps + ([delim] if delim else []))
    return ids


def train(texts: Iterable[str], model: str, vocab_size: int, extra_specials: list[str]):
    """Train a tokenizer: byte-level BPE (decoders), WordPiece (BERT-style) or Unigram (T5-style).

    SP and delimiter tokens (``extra_specials``) are added after training as special added tokens, never
    given to the trainer: a trainer puts its specials into the model's vocabulary, and a Unigram model
    would then segment a literal ``<WIKI>`` in text into that very piece.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trained = [UNK] if model == "unigram" else DEFAULT_SPECIALS
    if model == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=trained, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    elif model == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=trained, show_progress=False)
    elif model == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=trained, unk_token=UNK,
                                          show_progress=False)
    else:
        raise SptokError(f"--model: unknown tokenizer model {model!r}; expected one of {', '.join(MODELS)}")
    tok.train_from_iterator(texts, trainer=trainer)
    later = [t for t in DEFAULT_SPECIALS if t not in trained] + list(dict.fromkeys(extra_specials))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in later])
    return tok


def save_tokenizer_dir(tok, out_dir: str | os.PathLike, roles: dict, extra_specials: list[str],
                       model_max_length: int | None = None) -> None:
    """Write tokenizer.json plus the config files `transformers.AutoTokenizer` reads offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        tok.save(str(out / TOKENIZER_JSON))
    except Exception as e:  # the Rust side raises a bare Exception carrying the OS error
        if "os error 28" in str(e):
            raise OSError(28, "No space left on device", str(out / TOKENIZER_JSON)) from None
        raise SptokError(f"cannot write {out / TOKENIZER_JSON}: {e}") from None
    special_map = {k: v for k, v in roles.items() if v}
    if extra_specials:
        special_map["additional_special_tokens"] = list(extra_specials)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special_map}
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def default_roles(tok) -> dict:
    """Role -> token for the specials sptok's trained tokenizers carry."""
    pairs = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK,
             "eos_token": EOS}
    return {k: v for k, v in pairs.items() if tok.token_to_id(v) is not None}


def text_encoder(tok):
    """A copy of ``tok`` that encodes special-token strings found in text as ordinary text."""
    from tokenizers import Tokenizer

    enc = Tokenizer.from_str(tok.to_str())
    return as_text_encoder(enc)


def as_text_encoder(tok):
    """Set ``tok`` to encode special-token strings found in text as ordinary text; no padding or truncation."""
    tok.encode_special_tokens = True
    tok.no_padding()
    tok.no_truncation()
    return tok


@contextmanager
def literal_specials(tok):
    """Encode with ``tok`` as ``text_encoder`` would, without the cost of a copy."""
    old = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        yield tok
    finally:
        tok.encode_special_tokens = old
