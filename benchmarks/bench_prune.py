"""Pruning benchmark (issue 7): structured (magnitude, Taylor, Diff-Pruning, random) and unstructured
(L1, random, global) pruning of zoo:mnist-tiny at p ∈ {0.3, 0.5, 0.7}, before and after fine-tuning,
in the shape of L-Diff Tables 1 and 5 and MiniDiff Table 3.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prune.py --out runs/bench/prune

Every model is made by a recipe (``leandiff.recipe.apply_recipe``) into OUT/models/<label> and
resumes where it stopped; every evaluation is one row of the evaluation harness appended to
OUT/rows.jsonl as soon as it is done (done rows are skipped on a rerun).

Protocol: the common compression protocol (dpmpp-2m-sde, NFE 20, N=1024, seed 0, batch 256);
quality relative to the base row of the same run. Latency: one ``measure_latency`` run with the
default LatencyConfig (batch 1/16/64, alternating rounds, medians) over the base network and one
network per pruned architecture (structured pruning at a given p yields the same shapes for every
importance — checked — and fine-tuning does not change shapes), plus one unstructured network to
show that zeros save no time. Fine-tuning: ``finetune(steps=S, batch_size=128, bf16=true)`` (plain MSE,
AdamW with cosine warm restarts, EMA) — S as a % of the base model's 4,000 × 128 training steps.
Rows "M+rc" (``--rc-methods``, at the fine-tuned ratios) prune with importance M and then refit every
layer by least squares to the unpruned network's outputs (``prune(..., reconstruct=N)``) before the
same fine-tuning.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402
from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.cost import LatencyConfig, measure_latency  # noqa: E402
from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint, load_classifier, read_rows  # noqa: E402
from leandiff.recipe import apply_recipe  # noqa: E402

BASE = "zoo:mnist-tiny"
BASE_STEPS = 4000  # the base model's training steps (batch 128): leandiff/zoo/mnist-tiny/CARD.md
STRUCTURED = ("magnitude", "taylor", "diff", "random")
UNSTRUCTURED = ("l1", "random", "global")
RATIOS = (0.3, 0.5, 0.7)


def prune_args(method: str, p: float, a, reconstruct: int = 0) -> str:
    extra = {"taylor": f",t_stride={a.t_stride}", "diff": f",threshold={a.threshold},t_stride={a.t_stride}"}
    rc = f",reconstruct={reconstruct}" if reconstruct else ""
    return f"prune(method={method},ratio={p}{extra.get(method, '')}{rc})"


def rc_methods(a) -> list[str]:
    """The importances repeated with layer-wise reconstruction, as row methods "M+rc"."""
    return [f"{m}+rc" for m in a.rc_methods.split(",") if m] if a.reconstruct else []


def methods(a) -> list[str]:
    """Row methods: the four importances, then the reconstructed ones."""
    return list(STRUCTURED) + rc_methods(a)


def make(base, label: str, recipe: str, out: Path) -> Path:
    d = out / "models" / label
    if not (d / "leandiff.json").is_file():
        t0 = time.perf_counter()
        print(f"== {label}: {recipe}", flush=True)
        apply_recipe(base, recipe, d, dataset="mnist", progress=False, log=lambda s: print("  " + s, flush=True))
        print(f"   {label} made in {time.perf_counter() - t0:.0f}s", flush=True)
    return d


def open_rows(out: Path) -> tuple[Path, dict]:
    """OUT (created) -> (OUT/rows.jsonl, the rows already in it by key: a rerun skips them)."""
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    return rows_path, ({r["key"]: r for r in read_rows([rows_path])} if rows_path.is_file() else {})


def run_row(rows_path: Path, done: dict, label: str, path: Path, clf, n: int, extra: dict | None = None) -> dict:
    if label in done:
        return done[label]
    cfg = EvalConfig(solver="dpmpp-2m-sde", nfe=20, n=n, seed=0, batch_size=256, latency=None, inception=False)
    t0 = time.perf_counter()
    row = evaluate_checkpoint(load_checkpoint(path), cfg, classifier=clf, log=lambda s: None)
    row.update({"key": label, "label": label, "wall_seconds": time.perf_counter() - t0, **(extra or {})})
    append_row(rows_path, row)
    done[label] = row
    print(f"{label:24s} FID-dom {row['quality']['fid_dom']:8.3f}  params {row['cost']['params']:,}  "
          f"MAC {row['cost']['macs_per_image'] / 1e6:.1f}M  ({row['wall_seconds']:.0f}s)", flush=True)
    return row


def _shapes(path: Path) -> dict:
    surgery = json.loads((path / "leandiff.json").read_text())["architecture"].get("surgery", [])
    return surgery[-1]["shapes"] if surgery else {}


def latency_table(paths: dict[str, Path], out: Path) -> dict:
    """One alternating-rounds latency run over the base and one network per architecture."""
    f = out / "latency.json"
    if f.is_file() and set(json.loads(f.read_text())) == set(paths):
        return json.loads(f.read_text())
    nets = {k: load_checkpoint(p).net.eval() for k, p in paths.items()}
    res = measure_latency(nets, (1, 28, 28), LatencyConfig())
    rec = {k: {str(b): v["median_ms"] for b, v in d.items()} for k, d in res.items()}
    f.write_text(json.dumps(rec, indent=1))
    return rec


def eps_mse_by_t(paths: dict[str, Path], ts=(0, 50, 200, 500, 800, 999), n: int = 256) -> dict:
    """ε-MSE of each network at fixed timesteps on the first n test images (one fixed noise draw):
    where in t a pruned / fine-tuned network lost its accuracy."""
    import torch

    from leandiff.data import load_dataset
    from leandiff.schedule import q_sample

    x0 = load_dataset("mnist", "test", None, shape=(1, 28, 28)).images[:n].float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rec = {}
    for name, path in paths.items():
        ck = load_checkpoint(path)
        d = ck.denoiser()
        rec[name] = {}
        for t in ts:
            tt = torch.full((n,), t)
            with torch.no_grad():
                out = d(q_sample(ck.schedule, x0, tt, noise), tt)
            rec[name][str(t)] = float(((out - noise) ** 2).mean())
    return rec


def _f(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/prune")
    p.add_argument("--n", type=int, default=1024, help="samples for the base and fine-tuned rows")
    p.add_argument("--n-pre", type=int, default=256,
                   help="samples for rows not fine-tuned (pre-FT structured, unstructured), against a base row at the same N")
    p.add_argument("--ft-steps", type=int, default=600)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--ft-ratios", default="0.3,0.5", help="ratios whose pruned models are fine-tuned")
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--t-stride", type=int, default=10, help="Taylor/Diff-Pruning gradient timesteps 0, s, 2s, ...")
    p.add_argument("--reconstruct", type=int, default=1024,
                   help="calibration samples of the M+rc rows (prune(..., reconstruct=N)); 0: no such rows")
    p.add_argument("--rc-methods", default="magnitude,diff", help="importances repeated with reconstruction")
    p.add_argument("--skip-unstructured", action="store_true")
    p.add_argument("--report-only", action="store_true", help="write the tables from the rows done so far")
    a = p.parse_args(argv)
    out = Path(a.out)
    rows_path, done = open_rows(out)
    clf = load_classifier("mnist")
    base = load_checkpoint(BASE)
    t_start = time.perf_counter()
    ft_ratios = [float(x) for x in a.ft_ratios.split(",") if x]
    ft = f"finetune(steps={a.ft_steps},batch_size=128,lr={a.ft_lr},bf16=true)"

    models: dict[str, Path] = {}
    if a.report_only:
        models = {d.name: d for d in (out / "models").iterdir() if (d / "leandiff.json").is_file()}
        return report(a, out, base, models, done, t_start)
    run_row(rows_path, done, "base", base.path, clf, a.n)
    run_row(rows_path, done, "base-pre", base.path, clf, a.n_pre)
    # 1. structured: prune at each ratio (rows before fine-tuning), then fine-tune the pruned
    #    checkpoints (lineage: prune, then finetune), the ratios to fine-tune first
    for ratio in sorted(RATIOS, key=lambda r: (r not in ft_ratios, r)):
        for m in STRUCTURED:
            label = f"s-{m}-{ratio}"
            models[label] = make(base, label, prune_args(m, ratio, a), out)
            info = json.loads((models[label] / "leandiff.json").read_text()).get("prune", {})
            run_row(rows_path, done, label, models[label], clf, a.n_pre, {"prune_log": info})
        if ratio not in ft_ratios:
            continue
        for m in rc_methods(a):  # the reconstructed rows: only at the fine-tuned ratios
            label = f"s-{m}-{ratio}"
            models[label] = make(base, label, prune_args(m[:-3], ratio, a, a.reconstruct), out)
            info = json.loads((models[label] / "leandiff.json").read_text()).get("prune", {})
            run_row(rows_path, done, label, models[label], clf, a.n_pre, {"prune_log": info})
        for m in methods(a):
            label = f"s-{m}-{ratio}"
            d = make(load_checkpoint(models[label]), label + "-ft", ft, out)
            models[label + "-ft"] = d
            train = json.loads((d / "leandiff.json").read_text()).get("train", {})
            run_row(rows_path, done, label + "-ft", d, clf, a.n,
                    {"ft_steps": a.ft_steps, "ft_wall_seconds": train.get("wall_seconds")})
    # 3. unstructured
    if not a.skip_unstructured:
        for ratio in RATIOS:
            for m in UNSTRUCTURED:
                label = f"u-{m}-{ratio}"
                d = make(base, label, f"prune(method={m},ratio={ratio},structured=false)", out)
                models[label] = d
                info = json.loads((d / "leandiff.json").read_text()).get("prune", {})
                run_row(rows_path, done, label, d, clf, a.n_pre, {"prune_log": info})
    report(a, out, base, models, done, t_start)


def report(a, out: Path, base, models: dict, done: dict, t_start: float):
    # 4. latency: same shapes for every importance at one ratio (checked), fine-tuning keeps shapes
    ratios = [r for r in RATIOS if all(f"s-{m}-{r}" in models for m in STRUCTURED)]
    for ratio in ratios:
        ref = _shapes(models[f"s-magnitude-{ratio}"])
        for m in STRUCTURED:
            if _shapes(models[f"s-{m}-{ratio}"]) != ref:
                raise SystemExit(f"s-{m}-{ratio} has other shapes than s-magnitude-{ratio}: time it separately")
    lat_nets = {"base": base.path, **{f"p{r}": models[f"s-magnitude-{r}"] for r in ratios}}
    if "u-l1-0.5" in models:
        lat_nets["unstructured-l1-0.5"] = models["u-l1-0.5"]
    lat = latency_table(lat_nets, out)
    mse_nets = {"base": base.path}
    for ratio in RATIOS:
        for suffix in ("", "-ft"):
            if f"s-magnitude-{ratio}{suffix}" in models:
                mse_nets[f"s-magnitude-{ratio}{suffix}"] = models[f"s-magnitude-{ratio}{suffix}"]
    for m in methods(a):
        if f"s-{m}-0.3-ft" in models:
            mse_nets[f"s-{m}-0.3-ft"] = models[f"s-{m}-0.3-ft"]
    for label in ("s-magnitude+rc-0.3", "s-magnitude+rc-0.5"):
        if label in models:
            mse_nets[label] = models[label]
    mse = eps_mse_by_t(mse_nets)
    write_report(a, out, done, lat, time.perf_counter() - t_start, mse)


def write_report(a, out: Path, done: dict, lat: dict, seconds: float, mse: dict):
    base = done["base"]
    fid0, mac0, par0 = base["quality"]["fid_dom"], base["cost"]["macs_per_image"], base["cost"]["params"]
    fid0_pre = done["base-pre"]["quality"]["fid_dom"] if "base-pre" in done else float("nan")
    bytes0 = base["cost"]["weights_bytes"]

    def speed(ratio, b):
        return lat["base"][b] / lat[f"p{ratio}"][b] if f"p{ratio}" in lat else float("nan")

    rec = {"base": {"fid_dom": fid0, "fid_dom_at_n_pre": fid0_pre, "macs_per_image": mac0, "params": par0, "weights_bytes": bytes0,
                    "latency_ms": lat["base"]}, "structured": {}, "unstructured": {}, "latency_ms": lat,
           "settings": vars(a)}
    lines = ["### Structured pruning (channels), zoo:mnist-tiny — L-Diff Table 5 / MiniDiff Table 3 shape", "",
             f"Base: FID-dom {fid0:.3f} at N={a.n} ({fid0_pre:.3f} at N={a.n_pre}), {par0:,} params, "
             f"{mac0 / 1e6:.1f} M MAC/image, {bytes0 / 1e6:.2f} MB. p = fraction of channels removed per prunable "
             f"layer. Pre-FT FID-dom at N={a.n_pre} (÷ the base at N={a.n_pre}); post-FT at N={a.n} (÷ the base at "
             f"N={a.n}).", "",
             "| method | p | params | MACs (removed) | size MB | speedup b1 / b16 / b64 | FID-dom pre-FT (÷ base) | "
             "FID-dom post-FT (÷ base) | FT steps (% of base) | FT s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ratio in RATIOS:
        for m in methods(a):
            label = f"s-{m}-{ratio}"
            r = done.get(label)
            if r is None:
                continue
            c = r["cost"]
            f_pre = r["quality"]["fid_dom"]
            rf = done.get(label + "-ft")
            f_post = rf["quality"]["fid_dom"] if rf else None
            sp = [speed(ratio, b) for b in ("1", "16", "64")]
            rec["structured"][label] = {
                "method": m, "ratio": ratio, "params": c["params"], "macs_per_image": c["macs_per_image"],
                "macs_removed": 1 - c["macs_per_image"] / mac0, "params_removed": 1 - c["params"] / par0,
                "weights_bytes": c["weights_bytes"], "speedup": dict(zip(("1", "16", "64"), sp)),
                "fid_dom_pre": f_pre, "fid_dom_post": f_post, "ratio_pre": f_pre / fid0_pre,
                "ratio_post": f_post / fid0 if f_post else None, "ft_steps": a.ft_steps if rf else 0,
                "ft_wall_seconds": rf.get("ft_wall_seconds") if rf else None,
                "prune_log": r.get("prune_log", {})}
            e = rec["structured"][label]
            lines.append(
                f"| {m.replace('+rc', ' + reconstruct')} | {ratio} | {c['params']:,} | {c['macs_per_image'] / 1e6:.1f} M ({e['macs_removed']:.0%}) | "
                f"{c['weights_bytes'] / 1e6:.2f} | {sp[0]:.2f}× / {sp[1]:.2f}× / {sp[2]:.2f}× | "
                f"{f_pre:.2f} ({f_pre / fid0_pre:.1f}×) | "
                + (f"{f_post:.3f} ({f_post / fid0:.2f}×)" if f_post else "not fine-tuned") + " | "
                + (f"{a.ft_steps} ({a.ft_steps / BASE_STEPS:.0%})" if rf else "—") + " | "
                + _f(e["ft_wall_seconds"], "{:.0f}") + " |")
    lines += ["", f"### Unstructured pruning (zeros stored densely) — L-Diff Table 1 shape (FID-dom at N={a.n_pre})", "",
              "| method | p | sparsity (prunable / all) | params (non-zero) | MACs | dense MB | CSR MB | bitmask MB | "
              "FID-dom (÷ base) |", "|---|---|---|---|---|---|---|---|---|"]
    for ratio in RATIOS:
        for m in UNSTRUCTURED:
            r = done.get(f"u-{m}-{ratio}")
            if r is None:
                continue
            pl = r.get("prune_log", {})
            f = r["quality"]["fid_dom"]
            rec["unstructured"][f"u-{m}-{ratio}"] = {"method": m, "ratio": ratio, "fid_dom": f, "ratio_to_base": f / fid0_pre,
                                                     "macs_per_image": r["cost"]["macs_per_image"], **pl}
            lines.append(f"| {m} | {ratio} | {pl['sparsity_prunable']:.1%} / {pl['sparsity_all']:.1%} | "
                         f"{pl['params']:,} ({pl['params_nonzero']:,}) | {r['cost']['macs_per_image'] / 1e6:.1f} M | "
                         f"{pl['bytes_dense'] / 1e6:.2f} | {pl['bytes_csr'] / 1e6:.2f} | {pl['bytes_bitmask'] / 1e6:.2f} | "
                         f"{f:.2f} ({f / fid0_pre:.1f}×) |")
    lines += ["", "### Latency per network evaluation (ms, median of alternating rounds, fp32 eager)", "",
              "| network | b1 | b16 | b64 |", "|---|---|---|---|"]
    for k, v in lat.items():
        lines.append(f"| {k} | {v['1']:.2f} | {v['16']:.2f} | {v['64']:.2f} |")
    ts = list(next(iter(mse.values())))
    lines += ["", "### ε-MSE by timestep (256 test images, one noise draw): where the accuracy went", "",
              "| network | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for k, v in mse.items():
        lines.append(f"| {k} | " + " | ".join(f"{v[t]:.4f}" for t in ts) + " |")
    rec["eps_mse_by_t"] = mse
    lines += ["", "### Targets and verdicts (computed from the rows above)", ""]
    rec["targets"] = {}
    for label, e in rec["structured"].items():
        if e["fid_dom_post"] is None:
            continue
        checks = {"macs_removed>=50%": e["macs_removed"] >= 0.5,
                  "speedup>=1.6x (b16 and b64)": min(e["speedup"]["16"], e["speedup"]["64"]) >= 1.6,
                  "speedup>=1.6x (b1)": e["speedup"]["1"] >= 1.6,
                  "fid_dom<=1.10x base": e["ratio_post"] <= 1.10,
                  "ft_steps<=15%": e["ft_steps"] / BASE_STEPS <= 0.15}
        rec["targets"][label] = checks
        lines.append(f"- {label}: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in checks.items()))
    for ratio in RATIOS:
        post = {m: rec["structured"].get(f"s-{m}-{ratio}", {}).get("fid_dom_post") for m in STRUCTURED}
        if post["diff"] is None or post["magnitude"] is None or post["taylor"] is None:
            continue
        order = sorted((v, m) for m, v in post.items() if v is not None)
        beats = post["diff"] < min(post["magnitude"], post["taylor"])
        lines.append(f"- p={ratio} after fine-tuning, best to worst: " + ", ".join(f"{m} {v:.3f}" for v, m in order)
                     + f". Diff-Pruning {'beats' if beats else 'does not beat'} both magnitude and Taylor here "
                     f"(one seed, N={a.n}: differences of a few % are within sampling noise).")
        rec.setdefault("diff_beats_magnitude_and_taylor", {})[str(ratio)] = beats
        for m in rc_methods(a):
            e = rec["structured"].get(f"s-{m}-{ratio}", {})
            if e.get("fid_dom_post") is not None and post.get(m[:-3]) is not None:
                lines.append(f"- p={ratio}, {m[:-3]} with layer-wise reconstruction ({a.reconstruct} calibration samples): "
                             f"before fine-tuning {e['fid_dom_pre']:.2f} against {rec['structured'][f's-{m[:-3]}-{ratio}']['fid_dom_pre']:.2f} "
                             f"without; after {e['fid_dom_post']:.3f} ({e['ratio_post']:.2f}× base) against {post[m[:-3]]:.3f}.")
    lines += ["", "What was cut to fit the shared 2-core CPU (other benchmarks ran beside this one; latency rounds alternate between networks, so the load is shared fairly): rows that are not fine-tuned "
              f"(structured before fine-tuning, unstructured) use N={a.n_pre} samples against a base row at the same N "
              f"(the protocol's N={a.n} is used for the base and every fine-tuned row); only p ∈ {{{a.ft_ratios}}} is "
              f"fine-tuned ({a.ft_steps} steps × 128 = {a.ft_steps / BASE_STEPS:.0%} of the base training, plain MSE, "
              f"lr {a.ft_lr}, no KD; the +rc rows refit layers on {a.reconstruct} calibration samples first); Taylor / Diff-Pruning gradients on one batch of 32 at every "
              f"{a.t_stride}th timestep (threshold {a.threshold}); latency is measured once per architecture "
              "(all importances give the same shapes at one p, and fine-tuning keeps them)."]
    if a.report_only:
        lines += ["", "The rows and models were made by the same command without `--report-only` (which resumes "
                  "them); this file was then written from them."]
    rec["seconds"] = seconds
    md = "\n".join(lines)
    print(md)
    write_results("prune", rec, md)


if __name__ == "__main__":
    main()
