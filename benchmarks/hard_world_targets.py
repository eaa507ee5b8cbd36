"""Issue 18's committed targets on the ``--realism hard`` world, run end to end by the CLI.

Two runs, each over seeds 0-4, every step a ``clinfuse`` command in a child process
(what a researcher would type; nothing here reaches into the model):

``external``
    ``clinfuse synth --realism hard`` writes a training cohort (2,000 patients, seed
    S) and a fresh evaluation cohort (5,000 patients, seed 100 + S); ``clinfuse
    evaluate --train-manifest train/manifest.csv --manifest eval/manifest.csv`` trains
    the default fused model and every baseline on the first and scores the second.
    Targets: fused AUROC >= observable Bayes - 0.03; fused >= the best same-split
    baseline with the paired-CI lower bound > 0; ECE <= 0.03.
``small``
    A 200-patient cohort (seed 200 + S); ``clinfuse evaluate --cv 5``. Target: the
    default fused model within 0.01 of the best baseline or above it, mean over seeds.

The observable Bayes AUROC is read from the evaluation cohort's ``truth.yaml``
(``metrics.bayes_auroc_observable``): the posterior given the latent signal of what
was written for each patient, before rendering, measurement noise, site offsets and
JPEG compression, so an upper bound. Labels and latents in ``truth.*`` are read only
here, to judge; no clinfuse command sees them.

Run: ``python -m benchmarks.hard_world_targets external|small [--seeds 0 1 2 3 4]
[--work DIR] [--out docs/evaluation/hard-world]``. Each seed's ``cv.json`` and
``cv.html`` are copied to ``OUT/<run>/seed<S>/``; ``OUT/<run>/summary.json`` holds the
table ``docs/evaluation/README.md`` quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

EXTERNAL = {"n_train": 2000, "n_eval": 5000, "eval_seed_offset": 100}
SMALL = {"n": 200, "seed_offset": 200, "k": 5}
TARGETS = {"bayes_gap": -0.03, "ece": 0.03, "small_gap": -0.01}


def _clinfuse(*args: str) -> None:
    exe = Path(sys.executable).with_name("clinfuse")
    cmd = [str(exe) if exe.exists() else "clinfuse", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _synth(out: Path, n: int, seed: int) -> Path:
    if not (out / "manifest.csv").exists():
        _clinfuse("synth", "--realism", "hard", "--patients", str(n), "--seed", str(seed),
                  "--out", str(out), "--quiet")
    return out / "manifest.csv"


def _keep(src: Path, dst: Path) -> dict[str, Any]:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("cv.json", "cv.html"):
        shutil.copy2(src / name, dst / name)
    result: dict[str, Any] = json.loads((src / "cv.json").read_text())
    return result


def _row(cv: dict[str, Any]) -> dict[str, Any]:
    fused = cv["models"]["fused"]
    best = cv["best_baseline"]
    return {"fused_auroc": fused["auroc"], "fused_ci": fused["ci"], "fused_ece": fused["ece"],
            "best_baseline": best, "best_baseline_auroc": cv["models"][best]["auroc"],
            "fused_minus_best": cv["fused_minus_best"]["estimate"],
            "fused_minus_best_ci": cv["fused_minus_best"]["ci"],
            "baselines": {m: v["auroc"] for m, v in cv["models"].items() if m != "fused"},
            "wall_seconds": cv["wall_seconds"]}


def run_external(seeds: list[int], work: Path, out: Path) -> dict[str, Any]:
    rows = []
    for s in seeds:
        started = time.perf_counter()
        train = _synth(work / f"train{s}", EXTERNAL["n_train"], s)
        eval_seed = EXTERNAL["eval_seed_offset"] + s
        test = _synth(work / f"eval{eval_seed}", EXTERNAL["n_eval"], eval_seed)
        res = work / f"external{s}"
        _clinfuse("evaluate", "--train-manifest", str(train), "--manifest", str(test),
                  "--out", str(res), "--n-boot", "500", "--cache-dir", str(work / "cache"))
        cv = _keep(res, out / "external" / f"seed{s}")
        truth = yaml.safe_load((test.parent / "truth.yaml").read_text())
        bayes = float(truth["metrics"]["bayes_auroc_observable"])
        row = {"train_seed": s, "eval_seed": eval_seed, "bayes_observable": bayes,
               "oracle_auroc": truth["metrics"]["oracle_auroc"], **_row(cv),
               "seconds_with_synth": round(time.perf_counter() - started, 1),
               "load_average_1m": round(os.getloadavg()[0], 2)}
        row["fused_minus_bayes"] = row["fused_auroc"] - bayes
        row["met"] = {"bayes_gap": row["fused_minus_bayes"] >= TARGETS["bayes_gap"],
                      "beats_best_baseline": row["fused_minus_best_ci"][0] > 0,
                      "ece": row["fused_ece"] <= TARGETS["ece"]}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("train_seed", "fused_auroc", "bayes_observable",
                                              "best_baseline", "fused_minus_best",
                                              "fused_minus_best_ci", "fused_ece", "met")}),
              flush=True)
    return _summary("external", rows)


def run_small(seeds: list[int], work: Path, out: Path) -> dict[str, Any]:
    rows = []
    for s in seeds:
        seed = SMALL["seed_offset"] + s
        manifest = _synth(work / f"small{seed}", SMALL["n"], seed)
        res = work / f"small-cv{seed}"
        _clinfuse("evaluate", "--cv", str(SMALL["k"]), "--manifest", str(manifest),
                  "--out", str(res), "--n-boot", "500", "--seed", str(s),
                  "--cache-dir", str(work / "cache"))
        row = {"cohort_seed": seed, **_row(_keep(res, out / "small" / f"seed{seed}"))}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("cohort_seed", "fused_auroc", "best_baseline",
                                              "best_baseline_auroc", "fused_minus_best")}),
              flush=True)
    summary = _summary("small", rows)
    mean_gap = statistics.fmean(r["fused_minus_best"] for r in rows)
    summary["mean_fused_minus_best"] = mean_gap
    summary["met"] = mean_gap >= TARGETS["small_gap"]
    return summary


def _summary(run: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"run": run, "settings": EXTERNAL if run == "external" else SMALL,
            "targets": TARGETS, "rows": rows,
            "mean_fused_auroc": statistics.fmean(r["fused_auroc"] for r in rows),
            "machine": {"cores": os.cpu_count()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", choices=["external", "small"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--work", type=Path, default=Path("hard-world-work"))
    p.add_argument("--out", type=Path, default=Path("docs/evaluation/hard-world"))
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    fn = run_external if args.run == "external" else run_small
    summary = fn(args.seeds, args.work.resolve(), args.out)
    target = args.out / args.run / "summary.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
