"""`posttrain` command line: a thin layer over the Python API (posttrain.api)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from posttrain.stage import STEPS

DESCRIPTION = """\
posttrain runs the Llama 3 post-training loop. One round is five stages:
  rm       train a reward model on preference rankings (edited > chosen > rejected)
  sample   rejection sampling: K responses per prompt, scored by the reward, top-1 kept
  sft      fine-tune on the top-1 samples (prompt tokens masked)
  dpo      DPO with formatting tokens masked, plus an NLL term on chosen
  average  average the weights of the stage's variants (model soup)

Start with `posttrain demo` (six rounds on a tiny embedded model, no download), then
`posttrain validate RECIPE` and `posttrain run-round 1 --recipe RECIPE --run-dir DIR`.
"""


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe YAML path, or the name of a shipped recipe (e.g. general)")
    p.add_argument("--run-dir", required=True, type=Path, help="run folder (created if missing)")
    p.add_argument("--force", action="store_true",
                   help="rerun stages whose inputs changed since they finished (default: refuse)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after each round")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE", choices=STEPS,
                   help="run this stage again from scratch though it finished (its record and folder are "
                        "removed first; later stages rerun if their inputs change); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="show every stage's full output on the terminal (it always goes to the run's log)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="six rounds on the embedded world, then the report (no download)",
                       description="Build the embedded world (tiny model, synthetic task, simulated annotators) "
                                   "and run the loop on it, then write the report.")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="run folder (default: runs/<recipe>, with -world<S> for a world seed other than 0: "
                        "runs/demo, runs/demo_checker, runs/demo-world1)")
    p.add_argument("--rounds", default=None, help="rounds to run (default: the recipe's, six)")
    p.add_argument("--recipe", default="demo", help="recipe (default: the shipped demo recipe)")
    p.add_argument("--world-seed", type=int, default=0,
                   help="seed of the embedded world (another seed: other prompts, base model and annotations)")

    p = sub.add_parser("world", help="build (or rebuild) the embedded world and print where it is",
                       description="The embedded world (tiny base model, synthetic task, simulated annotations) "
                                   "is built once per machine and seed under $POSTTRAIN_CACHE/world; "
                                   "recipes name its files as world:<name>.")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--rebuild", action="store_true", help="delete the cached world and build it again")

    p = sub.add_parser("run-round", help="run one round's five stages (skipping finished ones)",
                       description="Run round N: rm, sample, sft, dpo, average, then evaluation. Finished stages "
                                   "are skipped; an interrupted stage resumes; changed inputs are refused.")
    p.add_argument("round", type=int, help="round number (1-based)")
    _add_common_run_args(p)

    p = sub.add_parser("run", help="run several rounds, e.g. --rounds 1-6",
                       description="Run rounds in order (each as run-round would), then print the status table.")
    p.add_argument("--rounds", default=None, help="rounds, e.g. 1-6 or 3 (default: 1 to the recipe's rounds)")
    _add_common_run_args(p)

    p = sub.add_parser("validate", help="check a recipe and print it resolved for a round",
                       description="Validate a recipe before any model loads; print the recipe a round runs with.")
    p.add_argument("recipe", help="recipe YAML path or shipped recipe name")
    p.add_argument("--round", type=int, default=1, help="round to resolve overrides for (default: 1)")
    p.add_argument("--skip-files", action="store_true",
                   help="do not check that the data files exist (a template whose data is not written yet)")

    p = sub.add_parser("validate-data", help="check a data file; report every problem with file, row and field",
                       description="Check a preference, SFT or prompts file (JSONL, Parquet or a datasets folder) "
                                   "with the loaders the stages use. Exit code 1 when there is a problem.")
    p.add_argument("file", type=Path)
    p.add_argument("--kind", required=True, choices=["preference", "sft", "prompts"])
    p.add_argument("--tokenizer", default=None, help="model or tokenizer folder, to check prompt lengths")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--all", action="store_true", help="list every problem (default: the first 50)")

    p = sub.add_parser("status", help="rounds x stages: state, key metrics, time",
                       description="Print a run folder's rounds x stages table: done (time, headline metric), "
                                   "partial (interrupted: run the same command to resume), failed, or not started.")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("verify", help="check every recorded output of a run folder against its record",
                       description="Check each stage record's files (size and mtime; the content where they "
                                   "differ) and print one line per missing or changed file, with the command that "
                                   "makes it again. Exit code 1 when there is a problem. Works while a run writes.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--full", action="store_true", help="hash every file's content, not only the changed ones")

    p = sub.add_parser("annotate", help="export a round's annotation requests / import labels (JSONL)",
                       description="For annotation in any tool: export a round's requests (two responses per "
                                   "prompt) as JSONL, and import the labels back; the next `posttrain run` picks "
                                   "them up. Row formats: posttrain/annotate/jsonl.py and the README.")
    asub = p.add_subparsers(dest="annotate_command", metavar="ACTION", required=True)
    a = asub.add_parser("export", help="write round N's requests to OUT.jsonl")
    a.add_argument("run_dir", type=Path)
    a.add_argument("round", type=int)
    a.add_argument("out", type=Path)
    a = asub.add_parser("import", help="check LABELS.jsonl against round N's requests and add the labels")
    a.add_argument("run_dir", type=Path)
    a.add_argument("round", type=int)
    a.add_argument("labels", type=Path)
    a = asub.add_parser("history", help="every label of each of round N's comparisons: who, when, from where")
    a.add_argument("run_dir", type=Path)
    a.add_argument("--round", type=int, required=True)

    p = sub.add_parser("eval", help="evaluate a round's final model (also runs after every round)",
                       description="Evaluate round N's final model on the recipe's held-out prompts: task score "
                                   "(with a checker), mean reward, win rates against the initial policy and round N-1.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--force", action="store_true", help="evaluate again even if a record exists")

    p = sub.add_parser("report", help="write RUN_DIR/report/report.md and plots",
                       description="Write RUN_DIR/report/report.md (per-round and per-stage tables) and PNG plots "
                                   "from the run's records.")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("import-gguf", help="turn a GGUF file into a safetensors checkpoint with its tokenizer",
                       description="Dequantise a GGUF file (llama.cpp's format; needs `pip install gguf`) into a "
                                   "safetensors checkpoint with its tokenizer and chat template, for models.base.")
    p.add_argument("file", type=Path, help="the .gguf file")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype of the checkpoint (default: float32)")

    p = sub.add_parser("make-prompts", help="write prompts with verifiable instructions (train, held-out)",
                       description="Write OUT/train.jsonl and OUT/heldout.jsonl (base requests x IFEval instructions "
                                   "x kwargs, no request shared between them; posttrain.instruct_prompts) and "
                                   "OUT/ordinary.jsonl (plain questions), deterministic from --seed.")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--train", type=int, default=112, help="training prompts (default: 112)")
    p.add_argument("--heldout", type=int, default=120, help="held-out prompts (default: 120)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("average", help="average the weights of checkpoints (model soup)",
                       description="Average checkpoints of one architecture, streaming one tensor at a time.")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("inputs", type=Path, nargs="+", help="checkpoint folders (safetensors; LoRA folders are merged first)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per input (normalised)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from posttrain import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    if args.verbose:
        os.environ["POSTTRAIN_VERBOSE"] = "1"
    from posttrain import api

    from posttrain.stage import StageWaiting

    try:
        return _dispatch(args, api)
    except StageWaiting as waiting:
        # Not a failure: the round waits for people; the same command continues later.
        print(f"posttrain {args.command}: {waiting}", file=sys.stderr)
        if getattr(args, "run_dir", None) is not None and args.run_dir.is_dir():
            print(api.status_table(args.run_dir, legend=False))
        return 0
    except api.USER_ERRORS as err:
        print(f"posttrain {args.command}: {_explained(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`posttrain validate-data ... | head`): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        print(f"posttrain {args.command}: {_disk_error(err, args)}", file=sys.stderr)
        return 1


def _explained(err: BaseException) -> str:
    """The error, plus whose fault it is when it names a file posttrain generated. A
    RoundError already says so (the orchestrator's `explain_failure`)."""
    from posttrain.rounds.orchestrator import RoundError
    from posttrain.world.build import world_error_hint

    text = str(err)
    hint = None if isinstance(err, RoundError) else world_error_hint(text)
    text = f"{text}\n{hint}" if hint else text
    return "\n".join([text, *getattr(err, "__notes__", ())])  # e.g. where a failed stage's traceback is


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
"""Write failures that are the machine's state, not a bug: one message, no traceback."""


def _disk_error(err: OSError, args) -> str:
    """Which file (or the command's output folder) could not be written, and what to do."""
    where = err.filename or getattr(args, "out", None) or getattr(args, "run_dir", None)
    what = os.strerror(err.errno) if err.errno else str(err)
    fix = ("free some space (or write to another disk) and run the same command again"
           if err.errno in (errno.ENOSPC, errno.EDQUOT) else "write somewhere writable and run the command again")
    return f"{where}: cannot write: {what}; {fix}" if where else f"cannot write: {what}; {fix}"


def _dispatch(args, api) -> int:
    cmd = args.command
    if cmd == "demo":
        return api.demo(run_dir=args.run_dir, rounds=args.rounds, recipe=args.recipe, world_seed=args.world_seed)
    if cmd == "world":
        print(api.world(seed=args.seed, rebuild=args.rebuild))
        return 0
    if cmd == "run-round":
        api.run_round(args.round, args.recipe, args.run_dir, force=args.force,
                      evaluate=False if args.no_eval else None, redo=args.redo)
        print(api.status_table(args.run_dir))
        return 0
    if cmd == "run":
        api.run(args.recipe, args.run_dir, rounds=args.rounds, force=args.force,
                evaluate=False if args.no_eval else None, redo=args.redo)
        print(api.status_table(args.run_dir))
        return 0
    if cmd == "validate":
        print(api.validate(args.recipe, round=args.round, files=not args.skip_files), end="")
        return 0
    if cmd == "validate-data":
        ok, text = api.validate_data(args.file, args.kind, tokenizer=args.tokenizer,
                                     max_prompt_tokens=args.max_prompt_tokens, show_all=args.all)
        print(text)
        return 0 if ok else 1
    if cmd == "status":
        if not args.run_dir.is_dir():
            print(f"posttrain status: {args.run_dir}: no such run folder", file=sys.stderr)
            return 1
        print(api.status_table(args.run_dir))
        return 0
    if cmd == "verify":
        records, files, problems = api.verify(args.run_dir, full=args.full)
        for line in problems:
            print(line)
        if problems:
            print(f"{args.run_dir}: {len(problems)} problem(s) in {records} records", file=sys.stderr)
            return 1
        print(f"{args.run_dir}: {records} records, {files} files: all match their records")
        return 0
    if cmd == "annotate":
        if args.annotate_command == "export":
            n = api.annotate_export(args.run_dir, args.round, args.out)
            print(f"wrote {n} requests to {args.out}")
            return 0
        if args.annotate_command == "history":
            print(api.annotate_history(args.run_dir, args.round))
            return 0
        got = api.annotate_import(args.run_dir, args.round, args.labels)
        print(f"imported {got['imported']} labels ({got['replaced']} relabelling requests labelled before, "
              f"{got['changed']} of them with the other response preferred; the latest label counts, "
              f"`posttrain annotate history {args.run_dir} --round {args.round}` shows all): "
              f"{got['labelled']}/{got['requests']} requests labelled; run the same `posttrain run` again to go on")
        return 0
    if cmd == "eval":
        record = api.evaluate(args.run_dir, args.round, force=args.force)
        print(api.format_metrics(record["metrics"]))
        return 0
    if cmd == "report":
        path = api.report(args.run_dir)
        print(f"report written to {path}")
        return 0
    if cmd == "import-gguf":
        from posttrain.modeling import import_gguf

        out = import_gguf(args.file, args.out, dtype=args.dtype)
        print(f"imported {args.file} into {out}")
        return 0
    if cmd == "make-prompts":
        from posttrain.instruct_prompts import write_prompt_files

        paths = write_prompt_files(args.out, args.train, args.heldout, seed=args.seed)
        print(f"wrote {args.train} training, {args.heldout} held-out prompts and the ordinary questions: "
              + ", ".join(paths.values()))
        return 0
    if cmd == "average":
        out = api.average(args.out, args.inputs, weights=args.weights)
        print(f"averaged {len(args.inputs)} checkpoints into {out}")
        return 0
    raise AssertionError(cmd)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
