#!/usr/bin/env python3
"""Tables (Markdown, to stdout) and a plot of what `scripts/bench-hosts.sh` measured beside what
`switchyard plan` predicted for each layout.

    python3 scripts/scaling_report.py OUT_DIR [OUT_DIR ...] [--plot docs/scaling.png]

Each OUT_DIR is one sitting of bench-hosts.sh. Measured decode rates: batch 1 (`bench`'s
median decode) and 32 streams' steady rate (32 tokens per median inter-token latency); the
aggregate over a whole 32-stream run, prompts included, is shown too. The plot needs
matplotlib (`pip install matplotlib`)."""
import json
import os
import sys

LAYOUTS = [("split", 1), ("split", 2), ("split", 4), ("replicated", 2), ("replicated", 4)]


def load(d, name):
    b, p = os.path.join(d, name, "bench.json"), os.path.join(d, name, "plan.json")
    if not os.path.exists(b):
        return None
    bench = json.load(open(b))
    plan = json.load(open(p))["plan"] if os.path.exists(p) else None
    m = bench["modes"][0]
    c = m["concurrency"][0]
    return {
        "agg": c["tok_s_median"],
        "steady": c["decode_tok_s_from_itl_p50"],
        "b1": m["decode_tok_s_median"],
        "p_steady": plan["at_streams"]["tok_s"] if plan else None,
        "p_b1": plan["batch1"]["tok_s"] if plan else None,
    }


def err(measured, predicted):
    return "–" if predicted is None else f"{(predicted / measured - 1) * 100:+.0f} %"


def num(v):
    return "–" if v is None else f"{v:.1f}"


def sitting(d):
    rows = {(l, n): load(d, f"{l}-{n}") for l, n in LAYOUTS}
    base = rows.get(("split", 1))
    print(f"\n{d}\n")
    print("| layout | 32 streams, whole run | steady | predicted | error | vs 1 worker | batch 1 | predicted | error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for (l, n), r in rows.items():
        if r is None:
            continue
        ratio = f"{r['agg'] / base['agg']:.2f}×" if base else ""
        print(f"| {n} {'worker' if n == 1 else 'workers'}, {'all experts each' if l == 'replicated' else 'split'} "
              f"| {r['agg']:.1f} | {r['steady']:.1f} | {num(r['p_steady'])} | {err(r['steady'], r['p_steady'])} "
              f"| {ratio} | {r['b1']:.1f} | {num(r['p_b1'])} | {err(r['b1'], r['p_b1'])} |")
        if r["p_steady"] is not None:
            worst = max(worst, abs(r["p_steady"] / r["steady"] - 1), abs(r["p_b1"] / r["b1"] - 1))
    shared = []
    for coalesce in ("on", "off"):
        for c in (1, 2):
            runs = []
            for k in range(1, c + 1):
                f = os.path.join(d, f"shared-{coalesce}-{c}-{k}", "bench.json")
                if os.path.exists(f):
                    runs.append(json.load(open(f))["modes"][0]["concurrency"][0])
            pf = os.path.join(d, f"shared-{coalesce}-{c}", "plan.json")
            if len(runs) == c and os.path.exists(pf):
                p = json.load(open(pf))["plan"]["at_streams"]
                steady = sum(r["decode_tok_s_from_itl_p50"] for r in runs)
                shared.append((coalesce, c, sum(r["tok_s_median"] for r in runs), steady, p["tok_s"]))
    if shared:
        one = {co: (agg, steady) for co, c, agg, steady, _ in shared if c == 1}
        print("\n| coordinators sharing 2 workers | coalescing | whole run | steady | predicted | error | vs 1, whole run / steady |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for coalesce, c, agg, steady, p in shared:
            base = one.get(coalesce)
            vs = f"{agg / base[0]:.2f}× / {steady / base[1]:.2f}×" if base else "–"
            print(f"| {c} | {coalesce} | {agg:.1f} | {steady:.1f} | {p:.1f} | {err(steady, p)} | {vs} |")
            worst = max(worst, abs(p / steady - 1))
    print(f"\nlargest prediction error: {worst * 100:.0f} %")
    return rows


def plot(sittings, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"split": "tab:blue", "replicated": "tab:orange"}
    for layout in ("split", "replicated"):
        ns = [1, 2, 4]
        first = True
        for i, rows in enumerate(sittings):
            pts = [(n, rows.get(("split", 1) if n == 1 else (layout, n))) for n in ns]
            pts = [(n, r) for n, r in pts if r]
            ax.plot([n for n, _ in pts], [r["steady"] for _, r in pts], "o-", color=colors[layout],
                    alpha=0.9 if i == 0 else 0.5, label=f"{layout}, measured" if first else None)
            if first and all(r["p_steady"] is not None for _, r in pts):
                ax.plot([n for n, _ in pts], [r["p_steady"] for _, r in pts], "x--", color=colors[layout],
                        label=f"{layout}, predicted by plan")
            first = False
    base = sittings[0].get(("split", 1))
    if base:
        ax.plot([1, 2, 4], [base["steady"] * n for n in (1, 2, 4)], ":", color="grey", label="linear")
    ax.set_xlabel("expert workers (0.25 CPU each)")
    ax.set_ylabel("decode tok/s, 32 streams (steady)")
    ax.set_xticks([1, 2, 4])
    ax.set_title("Throughput against workers, hosts smaller than the model\n(one line per sitting, later sittings lighter)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}", file=sys.stderr)


def main():
    args = sys.argv[1:]
    out = None
    if "--plot" in args:
        i = args.index("--plot")
        out = args[i + 1]
        del args[i:i + 2]
    if not args:
        sys.exit(__doc__)
    sittings = [sitting(d) for d in args]
    if out:
        plot(sittings, out)


if __name__ == "__main__":
    main()
