"""The `sptok` command. Heavy libraries (torch, streaming, datasets, transformers) are imported only
inside the commands that need them, so `sptok --help` starts in a fraction of a second; a command whose
extra is not installed says which one in one line (``extras.require``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys

import click

from . import __version__
from .build.options import (ENCODERS, EXECUTORS, FORMATS as OUTPUT_FORMATS, POLICIES, POSITIONS, TAILS,
                            partition_of)
from .build.tokenizer import MODELS
from .errors import SptokError, Stopped
from .extras import available, require


class _Group(click.Group):
    """Turns user errors into one readable paragraph and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SptokError as e:
            click.echo(f"error: {e.message}", err=True)
            _exit(2)
        except Stopped as e:
            click.echo(e.message, err=True)
            _exit(128 + e.signum)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: committed work is kept; run the same command again to resume", err=True)
            _exit(130)
        except OSError as e:
            if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list):   # copytree's OSErrors,
                # gathered as text: their errno is lost
                full = [dst for _, dst, why in e.args[0] if os.strerror(errno.ENOSPC) in str(why)]
                if full:
                    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), full[0])
            if e.errno == errno.ENOSPC:
                where = getattr(e, "filename2", None) or e.filename   # a copy names its source, then its target
                click.echo(f"error: disk full ({where or ''}): free some space and run the same command again; "
                           f"committed work is kept", err=True)
                _exit(2)
            if e.filename is None:   # not about a path the user gave: a bug, keep the traceback
                raise
            # a path the user named or can fix (permission, read-only filesystem, a file where a directory goes)
            click.echo(f"error: {e.filename}: {e.strerror or e}", err=True)
            _exit(2)


def _exit(code: int) -> None:
    """Exit with ``code``, at once after a Ray build (``ray_executor.leave_now``)."""
    _leave_after_ray(code)
    sys.exit(code)


def _leave_after_ray(code: int) -> None:
    """End the process now, with ``code``, if it ran a build with ``--executor ray``; else return."""
    ray_build = sys.modules.get("sptok.build.ray_executor")
    if ray_build and ray_build.ran_here():
        ray_build.leave_now(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sptok")
def main():
    """Source-prompt tokenization of multi-source corpora (arXiv 2311.09732)."""


@main.command()
@click.argument("manifest", type=click.Path())
@click.option("--out", "-o", required=True, help="Output directory, or a remote such as s3://bucket/path (built in "
                                                "--local, then uploaded with streaming's uploaders).")
@click.option("--local", "local_dir", type=click.Path(), help="Local staging directory for a remote --out "
                                                               "[~/.cache/sptok/builds/...].")
@click.option("--tokenizer", help="tokenizer.json or a Hugging Face tokenizer directory (local).")
@click.option("--policy", type=click.Choice(POLICIES), help="SP naming policy [abbreviation].")
@click.option("--position", type=click.Choice(POSITIONS), help="Where the SP goes [prefix].")
@click.option("--delimiter", help="Between SP and text: a special token like <SPSEP> [default], or plain text "
                                  "like ': '; '' for none.")
@click.option("--insert-prob", type=float, help="Probability that a document gets its SP [1.0].")
@click.option("--msp-prob", type=float, help="Probability that an inserted SP is masked for MSP [0.0].")
@click.option("--seq-len", type=int, help="Tokens per sample [2048].")
@click.option("--seed", type=int, help="Seed of every random decision [0].")
@click.option("--tail", type=click.Choice(TAILS), help="Last short sample of a source [keep].")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), help="Shard format [mds].")
@click.option("--eos", help="End-of-document token [the tokenizer's eos, e.g. <|endoftext|>].")
@click.option("--unit-size", help="Input bytes per work unit [16MB].")
@click.option("--shard-size", help="Uncompressed bytes per MDS shard [64MiB].")
@click.option("--workers", type=int, help="Worker processes [one per CPU]; with --executor ray, the CPUs of a "
                                         "local Ray.")
@click.option("--executor", type=click.Choice(EXECUTORS),
              help="local: worker processes on this machine; ray: a Ray task per unit, on the cluster of "
                   "--ray-address or RAY_ADDRESS, else a local Ray [local].")
@click.option("--ray-address", help="The Ray cluster of --executor ray (host:port) [RAY_ADDRESS].")
@click.option("--encoder", type=click.Choice(ENCODERS),
              help="auto: the fastest exact encoder, else Hugging Face's; fast: the fastest exact one or stop; or "
                   "one by name [auto].")
@click.option("--partition", help="Build only slice i/N of the work units (then `sptok merge`).")
@click.option("--strict", is_flag=True, default=None, help="Stop at the first bad record instead of skipping it.")
@click.option("--holdout", help="Hold out this share of each source's documents as a validation build in "
                                "OUT/validation, e.g. 0.5% (chosen by the document's hash and --seed).")
@click.option("--holdout-docs", type=int, help="Or hold out this many documents of each source.")
@click.option("--metadata", metavar="FIELD[:FORM]",
              help="Each document's own metadata before its text: a record field, FORM value | host | url [value] "
                   "(e.g. url:host); its tokens are the meta_spans column.")
@click.option("--metadata-template", help="Where the value goes, {} once; \\n and \\t are escapes ['{}\\n\\n'].")
@click.option("--metadata-prob", type=float, help="Probability that a document with a value gets it [1.0].")
@click.option("--metadata-max-tokens", type=int, help="Metadata tokens kept per document [64].")
@click.option("--hash-inputs", is_flag=True, default=None, help="Fingerprint input files by content (xxh64) instead "
                                                                "of size + mtime: reads every input once more.")
@click.option("--overwrite", is_flag=True, help="Replace a complete build in --out.")
@click.option("--append", is_flag=True, help="Add the sources MANIFEST lists after the build's own to the complete "
                                             "build in --out; its files stay as they are.")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress output.")
def build(manifest, out, local_dir, fmt, overwrite, partition, append, **flags):
    """Tokenize the sources of MANIFEST into SP-tagged shards in --out."""
    from .build import run_build
    from .build.encoders import describe
    from .build.remote import check_remote, is_remote, staging_dir, upload_build
    from .stats import format_table, load_stats

    flags["format"] = fmt
    part = partition_of(partition, os.environ)
    remote = out if is_remote(out) else None
    if remote:
        require("remote", f"--out {remote}")
        if part:
            raise SptokError("--partition with a remote --out: give each partition a local --out, merge them, "
                             "then upload the merged build")
        if append:
            raise SptokError("--append with a remote --out: append to a local copy of the build, then upload it")
        check_remote(remote)
        out = local_dir or staging_dir(remote)
    elif local_dir:   # else ignored: the build would not be where the user looks for it
        raise SptokError(f"--local {local_dir}: the staging directory of a remote --out (s3://...); --out {out} is "
                         f"local and built in place: drop --local")
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if append:
        from .build.append import run_append
        res = run_append(manifest, out, flags, overwrite=overwrite, partition=part, log=log)
    else:
        # --executor ray: the tasks upload their units' shards themselves; upload_build sends the rest
        res = run_build(manifest, out, flags, overwrite=overwrite, partition=part, log=log, remote=remote)
    if remote and res.info is not None:
        upload_build(out, remote, log=log)
    if res.skipped and append:
        click.echo(f"{out} already holds every source of {manifest} (fingerprint {res.info['fingerprint'][:12]}); "
                   f"nothing to append.", err=True)
    elif res.skipped:
        click.echo(f"{out} already holds this exact build (fingerprint {res.info['fingerprint'][:12]}); nothing to "
                   f"do. Pass --overwrite to rebuild.", err=True)
    if res.info is None:
        click.echo(f"partition {part[0]}/{part[1]}: {res.committed} of {res.total_units} units of the build are "
                   f"committed in {out}; join the partitions with `sptok merge`", err=True)
        return
    info, stats = load_stats(out)
    click.echo(format_table(info, stats))
    if not res.skipped and not flags.get("quiet"):
        made = info.get("appended") if append else None   # an append built only these sources
        tokens = sum(stats["sources"][n]["sample_tokens"] for n in made) if made else stats["totals"]["sample_tokens"]
        click.echo(f"\n{'appended to' if made else 'built'} {out} in {res.seconds:.1f}s "
                   f"({tokens / max(res.seconds, 1e-9):,.0f} "
                   f"tokens/s, encoder: {describe(info['encoder'])})", err=True)
    _leave_after_ray(0)   # --executor ray: done, and Ray disconnected


@main.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="Directory of the joined build.")
@click.option("--overwrite", is_flag=True, help="Replace a complete build in --out.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (no table).")
def merge(parts, out, overwrite, quiet):
    """Join the partition directories PARTS of one build (built with --partition i/N) into --out."""
    from .build import run_merge
    from .stats import format_table, load_stats

    res = run_merge(list(parts), out, overwrite=overwrite, log=lambda m: click.echo(m, err=True))
    if res.skipped:
        click.echo(f"{out} already holds this exact build (fingerprint {res.info['fingerprint'][:12]}); nothing to "
                   f"do. Pass --overwrite to merge again.", err=True)
    if not quiet:
        click.echo(format_table(*load_stats(out)))


@main.command()
@click.argument("out", type=click.Path())
@click.option("--source", "sources", multiple=True, help="Only this source (repeatable).")
@click.option("--reason", "reasons", multiple=True, help="Only this reason, e.g. malformed_json (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line, raw text in full.")
@click.option("--limit", type=click.IntRange(min=0), help="Show at most N records [all].")
def rejects(out, sources, reasons, as_json, limit):
    """List the records the build in OUT skipped: source, reason, location, detail and raw text."""
    from .rejects import expected, format_reject, iter_rejects, select

    names, why, st = select(out, sources, reasons)
    shown = 0
    try:
        for rec in iter_rejects(out, names, why, st):
            if limit is not None and shown >= limit:
                break
            click.echo(json.dumps(rec, ensure_ascii=False, sort_keys=True) if as_json else format_reject(rec))
            shown += 1
    except BrokenPipeError:   # `sptok rejects OUT | head`
        sys.stdout = open(os.devnull, "w")
        return
    if not as_json:
        total = expected(st, names, why)
        click.echo(f"{shown:,} of {total:,} rejected records shown" if total else "no rejected records", err=True)


@main.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--inputs", "inputs_root", type=click.Path(), help="The manifest's directory, where the inputs are "
                                                                 "now [where they were at build time].")
@click.option("--outputs-only", is_flag=True, help="Check the shards only, not the inputs.")
def verify(out, as_json, inputs_root, outputs_only):
    """Re-hash OUT's shards against their indexes and its inputs against the build fingerprint.

    Exit code 0 when everything matches, 2 naming each shard or input file that changed, went missing
    or is new."""
    from .verify import verify_build

    rep = verify_build(out, inputs_root=inputs_root, check_inputs=not outputs_only)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=1, sort_keys=True))
        if not rep.ok:
            sys.exit(2)
    elif not rep.ok:
        raise SptokError(rep.text())
    else:
        click.echo(rep.text())


@main.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--plot", "plot_dir", type=click.Path(), help="Also write PNG figures into this directory "
                                                              "(needs matplotlib: pip install 'sptok[plot]').")
@click.option("--run", "run_dir", type=click.Path(), help="A training log dir (sptok pretrain's log.dir): show the "
                                                          "requested source proportions next to the delivered ones "
                                                          "(per phase, for a run with data.phases).")
def stats(out, as_json, plot_dir, run_dir):
    """Per-source statistics of the build in OUT."""
    from .stats import format_accounting, format_table, load_stats, run_accounting, table_rows

    info, st = load_stats(out)
    if run_dir:
        rows = run_accounting(info, st, run_dir)
        click.echo(json.dumps(rows, indent=1) if as_json else format_accounting(rows))
        return
    figures = None
    if plot_dir:
        from .inspect.plot import write_figures

        figures = write_figures(info, st, plot_dir)
    if as_json:
        doc = {"sources": table_rows(info, st), "stats": st}
        if figures is not None:
            doc["figures"] = figures
        click.echo(json.dumps(doc, indent=1, sort_keys=True))
    else:
        click.echo(format_table(info, st))
    if figures:
        click.echo(f"wrote {len(figures)} figures to {plot_dir}: " + ", ".join(os.path.basename(f) for f in figures),
                   err=True)


@main.command()
@click.argument("out", type=click.Path())
@click.option("--source", "sources", multiple=True, help="Only samples of this source (repeatable) [all].")
@click.option("--n", "-n", "n", type=int, default=3, show_default=True, help="How many samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the choice of samples.")
@click.option("--ids", is_flag=True, help="One row per token: position, token id, decoded token.")
@click.option("--color/--no-color", default=None, help="Colour the marks [when printing to a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (pieces with positions).")
def show(out, sources, n, seed, ids, color, as_json):
    """Print N decoded samples of the build in OUT, SPs, delimiters and MSP-masked SPs marked."""
    from .inspect.show import legend, render, show as show_samples

    reader, views = show_samples(out, list(sources) or None, n, seed)
    if color is None:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    try:
        if as_json:
            click.echo(json.dumps({"build": out, "seed": seed, "samples": [v.to_json(ids) for v in views]},
                                  indent=1, ensure_ascii=False))
            return
        click.echo(legend(color, bool(reader.build.raw["options"].get("metadata"))), color=color)
        for k, v in enumerate(views, 1):
            click.echo(render(v, k, len(views), color=color, tok=reader.tok if ids else None), color=color, nl=False)
    except BrokenPipeError:   # `sptok show ... | head`
        sys.stdout = open(os.devnull, "w")


@main.command()
@click.argument("out", type=click.Path())
@click.option("--out", "-o", "path", required=True, type=click.Path(), help="The HTML file to write.")
@click.option("--samples", type=int, default=2, show_default=True, help="Decoded samples per source.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the choice of samples.")
@click.option("--mixture", type=click.Path(), help="Include the result of `sptok mix` (its --out directory).")
def report(out, path, samples, seed, mixture):
    """Write one self-contained HTML page about the build in OUT (identity, table, figures, samples)."""
    from .inspect.report import write_report

    if not available("plot"):
        click.echo("warning: matplotlib is not installed, so the report has no figures: "
                   "pip install 'sptok[plot]'", err=True)
    write_report(out, path, samples, seed, mixture)
    click.echo(f"wrote {path}: open it in a browser (file://{os.path.abspath(path)})", err=True)


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.steps=100 (repeatable).")
def pretrain(config, overrides):
    """Pre-train a model (BERT, T5 or Llama, built from config) on an sptok build.

    One process, or many under torchrun: torchrun --nproc_per_node=8 -m sptok pretrain CONFIG
    """
    require("train", "sptok pretrain")
    from .train.config import load_config
    from .train.loop import end_distributed, pretrain as run

    run(load_config(config, list(overrides)), log=lambda m: click.echo(m, err=True))
    end_distributed()


@main.command()
@click.argument("config", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="Directory of the search (plan, proxies, result).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value of CONFIG.")
@click.option("--proxies", type=int, default=16, show_default=True, help="Proxy runs on random mixtures.")
@click.option("--concentration", type=float, default=5.0, show_default=True,
              help="Dirichlet concentration around the prior: smaller spreads the mixtures wider.")
@click.option("--prior", type=click.Choice(["natural", "manifest"]), default="natural", show_default=True,
              help="Mixtures are drawn around the build's token shares (natural) or the manifest weights.")
@click.option("--objective", help="Weights of the sources' validation losses, e.g. code=2,pydocs=1 [equal]; "
                                  "used by the fit only, so --collect refits a search under another objective.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the mixtures and the check.")
@click.option("--plan", "plan_only", is_flag=True, help="Only write the plan and the proxies' configs (for a Slurm "
                                                          "array or torchrun: --proxy K), then stop.")
@click.option("--proxy", type=int, help="Run only proxy K of the plan in --out (resumes it), then stop.")
@click.option("--collect", is_flag=True, help="Only fit the finished proxies and propose the mixture.")
def mix(config, out, overrides, proxies, concentration, prior, objective, seed, plan_only, proxy, collect):
    """Search the source mixture: K short proxy trainings of CONFIG on random mixtures of its build, a
    regression from mixture to per-source validation loss, and the mixture it predicts best.

    Needs a validation split (build with --holdout / --holdout-docs) and an `eval:` section. Resumable:
    finished proxies are kept. Writes OUT/mixture.json, OUT/proportion.txt and OUT/predicted_vs_actual.png."""
    steps = [name for name, given in (("--plan", plan_only), ("--proxy", proxy is not None), ("--collect", collect))
             if given]
    if len(steps) > 1:   # each is one step of a search: together, one ran and the other was ignored
        raise SptokError(f"give one of --plan, --proxy K and --collect, not {' and '.join(steps)}")
    require("train", "sptok mix")
    from .mix import fit_search, objective_weights, plan_search, run_proxy
    from .train.loop import end_distributed

    say = lambda m: click.echo(m, err=True)  # noqa: E731
    if proxy is not None:
        run_proxy(out, proxy, log=say)
        return end_distributed()
    weights = None
    if objective:
        try:
            weights = {k.strip(): float(v) for k, v in (p.split("=") for p in objective.split(","))}
        except ValueError:
            raise SptokError(f"--objective: expected source=weight,... such as code=2,pydocs=1, got "
                             f"{objective!r}") from None
    if not collect:
        plan = plan_search(config, list(overrides), out, proxies, concentration, prior, seed, log=say)
        objective_weights(weights, plan["sources"])        # a misspelt source stops here, not after the proxies
        k = len(plan["mixtures"])
        if plan_only:
            again = f" --objective {objective}" if objective else ""
            say(f"planned {k} proxies in {out}: run each with `sptok mix {config} --out {out} --proxy K` (K = 0 .. "
                f"{k - 1}; e.g. a Slurm array: sbatch --array=0-{k - 1}, or under torchrun), then collect with "
                f"`sptok mix {config} --out {out} --collect{again}`")
            return
        for i in range(k):
            say(f"proxy {i + 1}/{k}")
            run_proxy(out, i, log=lambda m: None)
    fit_search(out, weights, log=say)
    end_distributed()


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="Directory for the exported model.")
def export(checkpoint, out):
    """Export CHECKPOINT (a step directory, or the checkpoint root for the newest) as a transformers model."""
    require("train", "sptok export")
    from .train.export import export as run

    click.echo(f"exported {run(checkpoint, out)}")


@main.command()
@click.option("--model", "-m", required=True, type=click.Path(), help="A model directory written by `sptok export` "
                                                                    "(weights, tokenizer, sptok.json).")
@click.option("--input", "-i", "input_path", required=True, type=click.Path(),
              help="Rows to label: JSONL (.jsonl, also .gz / .zst), Parquet or CSV.")
@click.option("--out", "-o", required=True, type=click.Path(),
              help="Labelled rows: .jsonl, .parquet or .csv [the input's format for other names].")
@click.option("--text-field", default="text", show_default=True, help="The field holding the text.")
@click.option("--pair-field", help="A second text field: the document is text + --pair-sep + pair.")
@click.option("--pair-sep", default="\n", help="Joins --text-field and --pair-field [a newline].")
@click.option("--source-field", help="The field naming each row's source (name or SP): for --mode manual, --eval.")
# The label choices are written out here: sptok.label, where they live (MODES, DEVICES, PRECISIONS, FORMATS), needs
# the train extra, and `sptok label --help` must work without it; tests/test_cli.py holds the two to each other.
@click.option("--mode", type=click.Choice(["manual", "auto", "random", "none"]),
              help="Also write the fine-tuning input sp_input with this SP: the given source's (manual), the "
                   "predicted (auto), a seeded random one (random) or none.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --mode random.")
@click.option("--ids", is_flag=True, help="With --mode: also write sp_input_ids, the token ids as a build lays out a "
                                          "document, EOS included (literal SP strings in the text stay text).")
@click.option("--predict/--no-predict", default=True, show_default=True,
              help="--no-predict skips the model (for --mode manual, random, none).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Sources listed in sp_topk (at most the model's).")
@click.option("--max-tokens", type=click.IntRange(min=1),
              help="Score the first N text tokens [what the build's seq_len leaves].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--input-format", type=click.Choice(["jsonl", "parquet", "csv"]),
              help="The input's format [from its extension].")
@click.option("--eval", "do_eval", is_flag=True,
              help="Compare the predictions with --source-field: accuracy, per-source precision / recall, confusion "
                   "matrix, calibration (ECE).")
@click.option("--eval-out", type=click.Path(), help="Directory for eval.json and confusion.png [OUT without its "
                                                    "extension + .eval].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary line.")
def label(model, input_path, out, **kw):
    """Predict the source of every row of --input with an MSP-trained model, and write fine-tuning inputs.

    Every input row is written unchanged, plus sp_pred (the source), sp_prob and sp_topk ([{source, prob}]).
    Encoders fill a [MASK] in the SP slot; decoders (post SP) score the K SPs after the text and delimiter."""
    require("train", "sptok label")
    from .label import run_label

    res = run_label(model, input_path, out, log=lambda m: click.echo(m, err=True), **kw)
    if res["report"]:
        click.echo(res["report"])
        click.echo("wrote " + ", ".join(res["files"][1:]), err=True)


@main.group()
def tokenizer():
    """Train or extend tokenizers with SP tokens."""


@tokenizer.command("train")
@click.argument("manifest", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="Directory for tokenizer.json and configs.")
@click.option("--vocab-size", type=int, default=32000, show_default=True)
@click.option("--model", type=click.Choice(MODELS), default="bpe", show_default=True,
              help="bpe: byte-level BPE (decoders); wordpiece: BERT-style; unigram: T5-style.")
@click.option("--policy", type=click.Choice(POLICIES),
              help="SP naming policy whose SP tokens to add [manifest's, else abbreviation].")
@click.option("--delimiter", help="Delimiter to add when it is a special token [<SPSEP>].")
@click.option("--seed", type=int, default=None)
@click.option("--max-bytes", default="200MB", show_default=True, help="Train on at most this much text.")
def tokenizer_train(manifest, out, vocab_size, model, policy, delimiter, seed, max_bytes):
    """Train a tokenizer on MANIFEST's text, with SP, delimiter and the usual special tokens."""
    from .build.tokenizer import train_for_manifest

    tok, sps, delim = train_for_manifest(manifest, out, model, vocab_size, max_bytes, policy, delimiter, seed,
                                         log=lambda msg: click.echo(msg, err=True))
    got = tok.get_vocab_size()
    click.echo(f"wrote {os.path.join(out, 'tokenizer.json')}: {model}, vocab {got}, "
               f"SPs {' '.join(sps)}" + (f", delimiter {delim}" if delim else ""))
    if got < vocab_size:
        click.echo(f"note: the vocabulary has {got:,} tokens, not the {vocab_size:,} asked for: the text read "
                   f"({max_bytes} at most) holds no more pieces worth a token; give more text (--max-bytes, more "
                   f"sources) for a larger vocabulary", err=True)


@tokenizer.command("extend")
@click.argument("tokenizer_path", type=click.Path())
@click.option("--manifest", type=click.Path(), help="Add the SPs of this manifest's sources.")
@click.option("--sp", "extra", multiple=True, help="An SP string to add (repeatable).")
@click.option("--out", "-o", required=True, type=click.Path())
@click.option("--policy", type=click.Choice(POLICIES))
@click.option("--delimiter", help="Delimiter to add when it is a special token [<SPSEP>].")
@click.option("--seed", type=int, default=None)
def tokenizer_extend(tokenizer_path, manifest, extra, out, policy, delimiter, seed):
    """Add SP tokens (and a special delimiter) to an existing tokenizer as special tokens."""
    from .build.tokenizer import extend_for

    ids = extend_for(tokenizer_path, out, list(extra), manifest, policy, delimiter, seed)
    click.echo(f"wrote {os.path.join(out, 'tokenizer.json')}: " + ", ".join(f"{k}={v}" for k, v in ids.items()))


if __name__ == "__main__":  # pragma: no cover
    main()
