"""sptok show / stats --plot / report on real small builds: SPs printed exactly where the shards put them,
figures drawn from exactly the numbers of stats.json, a report that a real headless browser renders cleanly,
and one-line errors for directories that are not complete builds."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from conftest import SOURCES, small_sources, write_jsonl
from shards import mds_samples, table_samples

from sptok.cli import main
from sptok.inspect import plot
from sptok.inspect.figures import ORDER, figure_data
from sptok.inspect.show import pick, printable


def sptok(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


def ok(*args) -> str:
    """stdout of a command that must succeed (stderr has the progress notes)."""
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def load(out):
    return (json.load(open(os.path.join(out, "sptok.json"))), json.load(open(os.path.join(out, "stats.json"))))


@pytest.fixture
def small_build(small_corpus, manifest, build, tmp_path):
    """small_build(name="out", **flags) -> OUT: the small real corpus (4 sources) built with these flags."""
    def make(name="out", **flags):
        flags.setdefault("seq_len", 128)
        return build(manifest(small_sources(tmp_path), name=f"{name}.yaml"), out=tmp_path / name, **flags)[0]
    return make


# ------------------------------------------------------------------------------------------------- show

HEAD = re.compile(r"=== sample (\d+)/(\d+): (\S+) #(\d+) of (\d+) \(build index (\d+)\), SP (\S+), (\d+) tokens, "
                  r"(\d+) segments? ===")
DOC = re.compile(r"--- doc (\d+) of (\d+), tokens (\d+)-(\d+)(.*) ---")
PAD = re.compile(r"\[PAD x(\d+)\]")


def parse_show(text: str) -> list[dict]:
    """Samples of `sptok show` output: header fields, then (start, end, notes, body) per document segment."""
    samples, seg = [], None
    for line in text[:-1].split("\n") if text.endswith("\n") else text.split("\n"):
        if m := HEAD.fullmatch(line):
            samples.append({"source": m[3], "index": int(m[4]), "global": int(m[6]), "sp": m[7],
                            "length": int(m[8]), "segments": [], "padding": 0})
            seg = None
        elif m := DOC.fullmatch(line):
            seg = {"start": int(m[3]), "end": int(m[4]) + 1, "notes": m[5], "lines": []}
            samples[-1]["segments"].append(seg)
        elif samples and (m := PAD.fullmatch(line)):
            samples[-1]["padding"], seg = int(m[1]), None
        elif seg is not None:
            seg["lines"].append(line)
    for s in samples:
        for g in s["segments"]:
            g["body"] = "\n".join(g.pop("lines"))
    return samples


def expected_body(s: dict, a: int, e: int, tok, sp_of: dict, delim: str | None, eos_id: int) -> str:
    """A segment as `show` must print it, built from the raw ids and sp_positions / msp_mask alone
    (``delim``: the special delimiter token, marked wherever its id is; None: a plain-text delimiter)."""
    sp_at = {int(p): bool(m) for p, m in zip(s["sp_positions"], s["msp_mask"])}
    delim_id = tok.token_to_id(delim) if delim else None
    parts, run = [], []

    def flush():
        if run:
            parts.append(printable(tok.decode(run, skip_special_tokens=False)))
            run.clear()
    for p in range(a, e):
        t = int(s["input_ids"][p])
        mark = (f"[{'MSP' if sp_at[p] else 'SP'} {sp_of[t]}]" if p in sp_at else f"[DELIM {delim}]"
                if t == delim_id else "[EOS]" if t == eos_id and p == e - 1 else None)
        if mark:
            flush()
            parts.append(mark)
        else:
            run.append(t)
    flush()
    return "".join(parts)


def read_independently(out: str, fmt: str) -> dict:
    """(source, index) -> sample, read with streaming / datasets directly (not through sptok.inspect)."""
    info = json.load(open(os.path.join(out, "sptok.json")))
    names = [e["source"] for e in info["sp_table"]]
    if fmt == "mds":
        return {(n, i): s for n in names for i, s in enumerate(mds_samples(os.path.join(out, n)))}
    rows, got = table_samples(out, fmt), {}
    for n in names:
        for i in range(info["counts"][n]["samples"]):
            got[(n, i)] = rows[len(got)]
    return got


TEXT_DELIM = {"position": "both", "delimiter": ": ", "tail": "pad"}


@pytest.mark.parametrize("fmt,flags", [("mds", {}), ("parquet", {}), ("arrow", {}), ("mds", TEXT_DELIM)],
                         ids=["mds", "parquet", "arrow", "both-text-delimiter-pad"])
def test_show_prints_sps_exactly_where_sp_positions_says(small_build, small_corpus, fmt, flags):
    from tokenizers import Tokenizer

    from sptok.inspect.show import SampleReader, render

    out = small_build(format=fmt, msp_prob=0.4, insert_prob=0.8, seq_len=256, **flags)
    info, _ = load(out)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer", "tokenizer.json"))
    sp_of = {e["token_id"]: e["sp"] for e in info["sp_table"]}
    own_sp = {e["source"]: e["token_id"] for e in info["sp_table"]}
    delim = None if flags else "<SPSEP>"
    truth = read_independently(out, fmt)
    texts = {printable(r["text"]) for recs in small_corpus.values() for r in recs}
    shown = parse_show(ok("show", out, "--n", "8", "--seed", "1", "--no-color")) + \
        parse_show(ok("show", out, "--source", "fortunes", "-n", "4", "--no-color"))
    assert len(shown) == 12 and {s["source"] for s in shown[8:]} == {"fortunes"}
    whole_docs = sps = delims = 0
    for s in shown:
        raw = truth[(s["source"], s["index"])]
        assert s["sp"] == sp_of[own_sp[s["source"]]] and s["length"] == len(raw["input_ids"])
        assert [g["start"] for g in s["segments"]] == raw["doc_offsets"].tolist()   # boundaries: doc_offsets
        assert [g["end"] for g in s["segments"]] == raw["doc_offsets"][1:].tolist() + [s["length"] - s["padding"]]
        assert all(raw["input_ids"][p] == own_sp[s["source"]] for p in raw["sp_positions"])
        for k, g in enumerate(s["segments"]):
            body = g["body"]
            if not delim:   # a plain-text delimiter is marked around its SP; as text it must read the same
                delims += body.count("[DELIM ': ']")
                body = body.replace("[DELIM ': ']", ": ")
            assert body == expected_body(raw, g["start"], g["end"], tok, sp_of, delim, info["eos"]["id"])
            sps += body.count("[SP <") + body.count("[MSP <")
            if k and "cut" not in g["notes"]:   # a whole document: its text is one record's text
                text = re.sub(r"^\[M?SP <[A-Z]+>\]\[DELIM [^]]+\]|(\[DELIM [^]]+\]\[M?SP <[A-Z]+>\])?\[EOS\]$", "",
                              g["body"])
                assert g["body"].endswith("[EOS]") and text in texts
                whole_docs += 1
    assert sps == sum(len(truth[(s["source"], s["index"])]["sp_positions"]) for s in shown) > 10
    assert whole_docs > 8 and "[MSP <" in "".join(g["body"] for s in shown for g in s["segments"])
    if flags:   # the delimiter sits next to each SP; the source's last sample is padded with [PAD]
        assert sps - 4 <= delims <= sps
        r, stats = SampleReader(out), load(out)[1]
        assert stats["totals"]["padding_tokens"] > 0
        for name in SOURCES:
            last = r.counts[name] - 1
            ids = truth[(name, last)]["input_ids"].tolist()
            pads = next(i for i, t in enumerate(reversed(ids)) if t != info["pad"]["id"])
            v = r.view(name, last)
            assert v.padding == pads == stats["sources"][name]["padding_tokens"]
            assert render(v, 1, 1).endswith(f"[PAD x{pads}]\n" if pads else "[EOS]\n")


def test_show_ids_json_color_and_choice(small_build):
    out = small_build(msp_prob=0.5)
    info, _ = load(out)
    truth = read_independently(out, "mds")
    text = ok("show", out, "--source", "code", "-n", "1", "--ids", "--no-color")
    (s,) = parse_show(text)
    raw = truth[("code", s["index"])]
    rows = [re.fullmatch(r"\s*(\d+)\s+(\d+)  (.*)", line) for g in s["segments"] for line in g["body"].split("\n")]
    assert [int(r[1]) for r in rows] == list(range(len(raw["input_ids"])))
    assert [int(r[2]) for r in rows] == raw["input_ids"].tolist()
    assert [r[3] for r in rows if r[3].startswith(("[SP", "[MSP"))] == \
        [f"[{'MSP' if m else 'SP'} <CODE>]" for m in raw["msp_mask"]]
    assert [int(r[1]) for r in rows if r[3].startswith(("[SP", "[MSP"))] == raw["sp_positions"].tolist()

    doc = json.loads(ok("show", out, "-n", "5", "--seed", "3", "--json"))
    assert [(v["source"], v["index"]) for v in doc["samples"]] == pick(
        {n: info["counts"][n]["samples"] for n in SOURCES}, 5, 3)
    for v in doc["samples"]:
        raw = truth[(v["source"], v["index"])]
        pieces = [p for g in v["segments"] for p in g["pieces"]]
        assert [p["start"] for p in pieces[1:]] == [p["end"] for p in pieces[:-1]] and pieces[0]["start"] == 0
        sp = [p for p in pieces if p["kind"] in ("sp", "msp")]
        assert [p["start"] for p in sp] == raw["sp_positions"].tolist()
        assert [p["kind"] == "msp" for p in sp] == raw["msp_mask"].astype(bool).tolist()

    plain = ok("show", out, "-n", "4", "--no-color")
    colored = ok("show", out, "-n", "4", "--color")
    assert "\x1b" not in plain   # no escape code, not even the ones inside the Chinese source's text
    assert "\x1b[1;32m<" in colored or "\x1b[1;97;45m<" in colored
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored).count("<SPSEP>") == plain.count("[DELIM <SPSEP>]")
    assert ok("show", out, "-n", "4", "--seed", "9") == ok("show", out, "-n", "4", "--seed", "9")
    assert pick({"a": 100}, 4, 1) != pick({"a": 100}, 4, 2)
    assert len(pick({"a": 3, "b": 2}, 50, 0)) == 5
    code, msg = sptok("show", out, "--source", "web")
    assert code == 2 and msg.startswith("error: --source 'web'") and "pydocs" in msg
    for cmd in (("show", out), ("report", out, "-o", out + ".html")):   # was numpy's traceback
        code, msg = sptok(*cmd, "--seed", "-1")
        assert (code, msg) == (2, "error: --seed: must be 0 or more, got -1\n")


def test_stats_run_refuses_a_log_lacking_what_pretrain_writes_in_one_line(small_build, tmp_path):
    """A run.json or metrics.jsonl that is JSON but not the records sptok pretrain writes (edited, another
    tool's): one line naming --run, where a KeyError, TypeError or AttributeError ended the command."""
    out = small_build()
    log = tmp_path / "log"
    log.mkdir()
    fingerprint = load(out)[0]["fingerprint"]
    for run, metrics, why in (("{}", '{"step": 1}', "KeyError: 'fingerprint'"),
                              ("[]", '{"step": 1}', "TypeError: "),
                              (json.dumps({"fingerprint": fingerprint}), "[1]", "AttributeError: ")):
        (log / "run.json").write_text(run)
        (log / "metrics.jsonl").write_text(metrics + "\n")
        code, msg = sptok("stats", out, "--run", log)
        assert code == 2 and msg.startswith(f"error: --run {log}: not a training log of sptok pretrain") \
            and why in msg and msg.count("\n") == 1, msg
    (log / "metrics.jsonl").write_text("")   # a run that has not logged a step yet: was "list index out of range"
    code, msg = sptok("stats", out, "--run", log)
    assert (code, msg) == (2, f"error: --run {log}: metrics.jsonl holds no training record yet (a run writes one "
                              f"every log.every steps)\n")


def test_a_stats_json_that_is_not_what_sptok_writes_is_named_in_one_line(small_build, tmp_path):
    """Valid JSON of another shape (edited, cut by hand, another build's sources) ended stats and report in a
    KeyError or TypeError."""
    out = small_build()
    good = (tmp_path / "out" / "stats.json").read_text()
    for text, why in (("{}", "(top level): 'sources' is a required property"),
                      ('{"sources": {}, "totals": {}}', "totals: 'docs' is a required property")):
        (tmp_path / "out" / "stats.json").write_text(text)
        for cmd in (("stats", out), ("report", out, "-o", tmp_path / "r.html")):
            code, msg = sptok(*cmd)
            assert (code, msg) == (2, f"error: {out}/stats.json: not the statistics sptok writes ({why})\n"), msg
    info = load(out)[0]
    (tmp_path / "out" / "stats.json").write_text(good)
    (tmp_path / "out" / "sptok.json").write_text(json.dumps({k: v for k, v in info.items() if k != "counts"}))
    code, msg = sptok("show", out)   # an sptok.json without its counts: was a KeyError
    assert (code, msg) == (2, f"error: {out}/sptok.json: no sample count of every source (KeyError: 'counts'), as "
                              f"a build writes it: the file was edited\n"), msg
    (tmp_path / "out" / "sptok.json").write_text(json.dumps(info))
    doc = json.loads(good)
    del doc["sources"][SOURCES[1]]
    (tmp_path / "out" / "stats.json").write_text(json.dumps(doc))
    code, msg = sptok("stats", out)
    assert (code, msg) == (2, f"error: {out}/stats.json: no statistics of source {SOURCES[1]!r}, a source of the "
                              f"build\n"), msg


# ---------------------------------------------------------------------------------------------- figures

def test_figure_data_equals_stats_json(small_corpus, manifest, build, tmp_path):
    srcs = [dict(s, weight=w) for s, w in zip(small_sources(tmp_path), (2.0, 1.0, 0.5, 0.5))]
    m = manifest(srcs)
    for flags in ({"position": "both", "tail": "pad", "msp_prob": 0.3, "insert_prob": 0.6, "seq_len": 64},
                  {"position": "post", "tail": "drop", "msp_prob": 0.0, "insert_prob": 1.0, "seq_len": 100}):
        out, _ = build(m, out=tmp_path / flags["tail"], **flags)
        info, stats = load(out)
        st = [stats["sources"][n] for n in SOURCES]
        d = figure_data(info, stats)
        assert list(d) == list(ORDER)
        for fig in d.values():
            assert fig["sources"] == list(SOURCES) and fig["title"] and fig["xlabel"] and fig["ylabel"]
        real = [s["sample_tokens"] - s["padding_tokens"] for s in st]   # padding is not data
        assert d["token_share"]["tokens"] == real
        assert d["token_share"]["built_share"] == pytest.approx([100 * t / sum(real) for t in real])
        assert d["token_share"]["weight_share"] == pytest.approx([100 * w / 4.0 for w in (2.0, 1.0, 0.5, 0.5)])
        dl = d["doc_lengths"]
        for s, counts in zip(st, dl["counts"]):
            hist = s["doc_length_hist"]["counts"]
            assert hist[0] == 0 and counts == hist[1:len(counts) + 1] and not any(hist[len(counts) + 1:])
            assert sum(counts) == s["docs"]
        assert dl["edges"] == [2 ** b for b in range(len(dl["counts"][0]) + 1)]
        sites = 2 if flags["position"] == "both" else 1
        sr = d["sp_rates"]
        assert sr["insert_rate"] == pytest.approx([100 * s["sp_inserted"] / (sites * s["docs"]) for s in st])
        assert sr["msp_rate"] == pytest.approx([100 * s["sp_masked"] / s["sp_inserted"] for s in st])
        assert (sr["insert_prob"], sr["msp_prob"]) == (100 * flags["insert_prob"], 100 * flags["msp_prob"])
        assert d["packing"]["padding_tokens"] == [s["padding_tokens"] for s in st]
        assert d["packing"]["dropped_tokens"] == [s["dropped_tokens"] for s in st]
        lost, none = ("padding_tokens", "dropped_tokens")[:: 1 if flags["tail"] == "pad" else -1]
        assert sum(d["packing"][lost]) > 0 and sum(d["packing"][none]) == 0


def test_stats_plot_draws_exactly_that_data(small_corpus, manifest, build, tmp_path, monkeypatch):
    from PIL import Image

    out, _ = build(manifest(small_sources(tmp_path)), position="both", tail="pad", msp_prob=0.3, seq_len=64)
    info, stats = load(out)
    drawn = {}
    for name, fn in list(plot.DRAW.items()):
        monkeypatch.setitem(plot.DRAW, name, lambda d, fn=fn, name=name: drawn.setdefault(name, (d, fn(d)))[1])
    doc = json.loads(ok("stats", out, "--plot", tmp_path / "figs", "--json"))
    assert {n: d for n, (d, _) in drawn.items()} == figure_data(info, stats)   # handed exactly these numbers
    assert doc["figures"] == [str(tmp_path / "figs" / f"{n}.png") for n in ORDER]
    for path in doc["figures"]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (750, 420)
            im.verify()
    for name, (d, fig) in drawn.items():
        assert fig.get_suptitle() == d["title"]
        for ax in fig.axes:
            assert ax.get_xlabel() and re.search(r"\(%\)|tokens", ax.get_ylabel()), (name, ax.get_ylabel())
            names = [t.get_text() for t in ax.get_xticklabels()] + \
                [t.get_text().split(" (")[0] for t in (ax.get_legend().get_texts() if name == "doc_lengths" else [])]
            assert set(SOURCES) <= set(names), name
    ax = drawn["token_share"][1].axes[0]
    d = drawn["token_share"][0]
    assert [b.get_height() for b in ax.containers[0]] == pytest.approx(d["weight_share"])
    assert [b.get_height() for b in ax.containers[1]] == pytest.approx(d["built_share"])
    d, fig = drawn["sp_rates"]
    for ax, rate, req in zip(fig.axes, (d["insert_rate"], d["msp_rate"]), (d["insert_prob"], d["msp_prob"])):
        assert [b.get_height() for b in ax.containers[0]] == pytest.approx(rate)
        assert ax.lines[0].get_ydata()[0] == pytest.approx(req)
    d, fig = drawn["doc_lengths"]
    steps = [p for p in fig.axes[0].patches if type(p).__name__ == "StepPatch"]
    assert len(steps) == len(d["percent"])
    for p, pct in zip(steps, d["percent"]):
        assert list(p.get_data().values) == pytest.approx(pct) and list(p.get_data().edges) == d["edges"]
    d, fig = drawn["packing"]
    assert [b.get_height() for b in fig.axes[0].containers[1]] == d["padding_tokens"]


def test_plot_without_matplotlib_says_what_to_install(small_build, monkeypatch, tmp_path):
    out = small_build()
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` now raises ImportError
    code, msg = sptok("stats", out, "--plot", tmp_path / "figs")
    assert code == 2 and msg.strip().count("\n") == 0 and "pip install 'sptok[plot]'" in msg
    code, msg = sptok("report", out, "-o", tmp_path / "r.html", "--samples", "0")
    assert code == 0 and "pip install 'sptok[plot]'" in msg
    assert "No figures" in (tmp_path / "r.html").read_text()


# ----------------------------------------------------------------------------------------------- report

class Chromium:
    """A headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no port, no network.

    It can never hang the suite: every wait has a deadline (``poll`` on the pipe, not a check between blocking
    reads), and a watchdog kills Chromium's whole process group once ``LIFETIME`` seconds have passed, whatever
    the test is doing (a read then sees the pipe close)."""

    LIFETIME = 180

    def __init__(self, binary: str, profile: str):
        their_r, self.w = os.pipe()    # commands: we write, the browser reads its fd 3
        self.r, their_w = os.pipe()    # replies and events: the browser writes its fd 4

        def fds():
            os.dup2(their_r, 3)
            os.dup2(their_w, 4)
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"], pass_fds=(3, 4), preexec_fn=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)   # its own process group: killed as one
        os.close(their_r)
        os.close(their_w)
        self.buf, self.n, self.events = b"", 0, []
        self.poll = select.poll()       # not select.select: a long test session's fds pass FD_SETSIZE
        self.poll.register(self.r, select.POLLIN)
        self.watchdog = threading.Timer(self.LIFETIME, self.kill)
        self.watchdog.daemon = True
        self.watchdog.start()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self.n += 1
        n = self.n
        os.write(self.w, json.dumps({"id": n, "method": method, "params": params,
                                     **({"sessionId": session} if session else {})}).encode() + b"\0")
        reply = self.until(lambda m: m.get("id") == n, timeout)
        assert "error" not in reply, reply
        return reply.get("result", {})

    def until(self, pred, timeout: float = 60) -> dict:
        end = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "method" in msg:
                    self.events.append(msg)
                if pred(msg):
                    return msg
            left = end - time.time()
            if left <= 0 or not self.poll.poll(left * 1000):
                self.kill()
                raise AssertionError(f"the browser did not answer in {timeout:g} s (killed)")
            chunk = os.read(self.r, 1 << 16)
            assert chunk, f"the browser exited (or was killed after {self.LIFETIME} s)"
            self.buf += chunk

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.watchdog.cancel()
            self.kill()        # whatever of its process group is left
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)


def render_in_browser(html_path: str, profile: str) -> tuple[dict, list[dict]]:
    """Load the page in headless Chromium; return what the page shows and the events it produced."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        pytest.skip("no Chromium binary (`chromium` / `chromium-browser`) on PATH: .ci/run installs Debian's "
                    "`chromium`; without it the report cannot be rendered in a real browser here")
    b = Chromium(binary, profile)
    try:
        page = next(t for t in b.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        s = b.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            b.call(f"{domain}.enable", s)
        b.call("Page.navigate", s, url="file://" + os.path.abspath(html_path))
        b.until(lambda m: m.get("method") == "Page.loadEventFired")
        js = """JSON.stringify({
            text: document.body.innerText,
            images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
            sources: [...document.querySelectorAll('#sources tr td:first-child')]
                .filter(td => td.checkVisibility() && td.getBoundingClientRect().width > 0).map(td => td.innerText),
            marks: document.querySelectorAll('span.sp, span.msp').length,
            scripts: document.scripts.length})"""
        got = json.loads(b.call("Runtime.evaluate", s, expression=js, returnByValue=True)["result"]["value"])
        return got, b.events
    finally:
        b.close()


def test_report_renders_in_a_real_browser(small_corpus, manifest, build, tmp_path):
    hostile = [{"id": "h1", "text": "<script>alert('x')</script> & <b>not bold</b> <img src=http://example.com/x>"},
               {"id": "h2", "text": "plain words " * 30}]
    write_jsonl(tmp_path / "web.jsonl", hostile)
    (tmp_path / "web-bad.jsonl").write_text('{"id": "ok", "text": "fine"}\n{"id": "broken"\n')
    srcs = small_sources(tmp_path) + [{"name": "web", "paths": ["web.jsonl", "web-bad.jsonl"], "id_field": "id"}]
    out, info = build(manifest(srcs), seq_len=128, msp_prob=0.5)
    code, msg = sptok("report", out, "-o", tmp_path / "report.html", "--samples", "2")
    assert code == 0 and "report.html" in msg
    html = (tmp_path / "report.html").read_text()
    names = [e["source"] for e in info["sp_table"]]
    # self-contained: no script, every image inlined, nothing fetched from anywhere
    assert "<script" not in html.lower() and "&lt;script&gt;" in html
    assert re.findall(r'<img src="([^"]{0,22})', html) == ["data:image/png;base64,"] * 4
    assert not re.search(r'(src|href)="(?!data:)', html)
    for fact in (info["fingerprint"], info["sptok_version"], info["tokenizer"]["sha256"][:16], "demo/tokenizer",
                 "msp_prob", "seq_len", "malformed_json"):
        assert fact in html, fact

    page, events = render_in_browser(str(tmp_path / "report.html"), str(tmp_path / "chromium-profile"))
    errors = [e for e in events if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls
    assert page["scripts"] == 0 and page["marks"] > 0
    assert page["images"] == [[True, 750, 420]] * 4       # every figure decoded by the browser
    assert page["sources"] == names + ["total"]           # every source name visible in the table
    for name in names:
        assert name in page["text"]
    assert "<script>alert('x')</script>" in page["text"]  # corpus text shown as text, never run


# ----------------------------------------------------------------------------------------------- errors

def _commands(tmp_path):
    return [["show"], ["stats", "--plot", str(tmp_path / "figs")], ["report", "-o", str(tmp_path / "r.html")]]


def test_not_a_build_is_a_one_line_error(tmp_path, small_build):
    (tmp_path / "half" / ".sptok").mkdir(parents=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "sptok.json").write_text('{"name": "something else"}')
    cases = {"missing": "no such build directory", "half": "the build is incomplete", "foreign": "not an sptok build",
             "alien": "not an sptok build description"}
    for cmd in _commands(tmp_path):
        for d, why in cases.items():
            code, msg = sptok(cmd[0], tmp_path / d, *cmd[1:])
            assert code == 2 and "Traceback" not in msg, msg
            assert msg.startswith("error: ") and msg.strip().count("\n") == 0 and why in msg, msg
            assert str(tmp_path / d) in msg
    out = small_build()
    for shard in (tmp_path / "out" / "code").glob("shard.*"):
        shard.unlink()     # a damaged build: shards gone
    code, msg = sptok("show", out, "--source", "code")
    assert code == 2 and msg.startswith("error: ") and msg.strip().count("\n") == 0 and out in msg, msg
    os.remove(os.path.join(out, "stats.json"))
    code, msg = sptok("report", out, "-o", tmp_path / "r.html")
    assert code == 2 and "stats.json" in msg and msg.strip().count("\n") == 0, msg
    assert not (tmp_path / "r.html").exists()


# ------------------------------------------------------------------------------------- hostile or large builds

def test_report_sums_up_many_files_and_shows_the_validation_split(small_corpus, manifest, build, tmp_path):
    """Forty input files are a count and three names, not forty names in one cell; the validation split has
    its own table, per source, from its own stats.json."""
    from conftest import demo_records

    (tmp_path / "many").mkdir()
    for i, r in enumerate(demo_records("fortunes", 40)):
        (tmp_path / "many" / f"f{i:03}.txt").write_text(r["text"])
    srcs = small_sources(tmp_path) + [{"name": "many", "paths": "many"}]
    out, info = build(manifest(srcs), seq_len=64, holdout_docs=2)
    ok("report", out, "-o", tmp_path / "r.html", "--samples", "0")
    html = (tmp_path / "r.html").read_text()
    assert "40 files matched by many: many/f000.txt, many/f001.txt, many/f002.txt, …" in html
    assert "many/f003.txt" not in html and "code.jsonl" in html          # few files: every one named
    table = html.split("<h2>Validation split</h2>", 1)[1].split("</table>", 1)[0]
    val = json.load(open(os.path.join(out, "validation", "stats.json")))["sources"]
    for name in [e["source"] for e in info["sp_table"]]:
        tokens = val[name]["sample_tokens"] - val[name]["padding_tokens"]
        assert f"<td>{name}</td><td class=n>2</td><td class=n>{tokens:,}</td>" in table, (name, table)
    assert "2 documents of each source held out" in html


def test_bidi_and_control_characters_are_shown_escaped(manifest, build, tmp_path):
    """A right-to-left override makes "\\u202eevil\\u202c" read as "live": show and report write such characters
    as visible escapes (and file names in the report too), never raw."""
    hostile = "\u202eevil\u202c zero\u200bwidth bell\x07 return\r"
    write_jsonl(tmp_path / "h.jsonl", [{"id": "a", "text": hostile}, {"id": "b", "text": "plain words " * 10}])
    out, _ = build(manifest([{"name": "h", "paths": "h.jsonl", "id_field": "id"}]), seq_len=256)
    shown = ok("show", out, "--no-color", "-n", "1")
    ok("report", out, "-o", tmp_path / "r.html", "--samples", "1")
    html = (tmp_path / "r.html").read_text()
    for text in (shown, html):
        assert r"\u202eevil\u202c zero\u200bwidth bell\x07 return\r" in text
        assert not set("\u202e\u202c\u200b\x07\r") & set(text)


def test_report_refuses_a_mixture_searched_on_another_build(small_build, tmp_path):
    out = small_build()
    mix = tmp_path / "search"
    mix.mkdir()
    (mix / "mixture.json").write_text(json.dumps({"sources": [], "predicted": {}}))
    (mix / "plan.json").write_text(json.dumps({"fingerprint": "ab" * 32}))
    fingerprint = load(out)[0]["fingerprint"]
    code, msg = sptok("report", out, "-o", tmp_path / "r.html", "--mixture", mix)
    assert code == 2 and msg.strip().count("\n") == 0, msg
    assert f"that search ran on build abababababab, not on this one ({fingerprint[:12]})" in msg
    assert not (tmp_path / "r.html").exists()
    (mix / "plan.json").unlink()
    code, msg = sptok("report", out, "-o", tmp_path / "r.html", "--mixture", mix)
    assert code == 2 and "not the --out directory of a finished `sptok mix`" in msg and "Traceback" not in msg
    (mix / "plan.json").write_text(json.dumps({"fingerprint": fingerprint}))   # this build's, its result cut
    code, msg = sptok("report", out, "-o", tmp_path / "r.html", "--mixture", mix)
    assert code == 2 and msg == (f"error: --mixture {mix}: mixture.json or confirmation.json is not what `sptok mix` "
                                 f"writes (KeyError: 'left_out')\n"), msg
